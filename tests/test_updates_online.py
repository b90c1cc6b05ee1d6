"""Online updates end to end: a DMP training loop (2 gloo ranks) feeds replicas that serve while the
updates land, and end byte-equal to the trainers with equal outputs."""

import json

import pytest
import torch

from fastplan.comm.updates.layout import Layout, ShardSpec
from fastplan.comm.updates.online import layout_from_json, layout_to_json
from fastplan.comm.updates.online_stream import OnlineConfig, run_online, step_latencies


def test_trained_rows_reach_every_replica_which_serves_throughout_and_ends_equal_to_the_trainer():
    cfg = OnlineConfig(replicas=2, rows=2000, steps=15, batch_size=64)
    r = run_online(cfg, timeout_s=240)
    trainers, replicas = r["trainer"].values(), r["replicas"].values()
    assert all(t["losses"][-1] < t["losses"][0] for t in trainers)  # it really trains
    assert all(t["tracker_missed"] == [] for t in trainers)  # the tracker saw every row the optimizer moved
    assert all(sum(n for *_, n in t["steps"]) > 0 for t in trainers)
    for rep in replicas:
        assert rep["converged"] and rep["missing"] == []
        assert rep["outputs_equal"], rep["max_abs_diff"]
        assert rep["errors"] == []
        t_first, t_last = min(t for *_, t in rep["applied"]), max(t for *_, t in rep["applied"])
        assert sum(t_first <= t <= t_last for t, _ in rep["served"]) > 0  # answered while updates landed
    assert len(step_latencies(r)) == sum(len(t["steps"]) for t in trainers)


def test_layout_travels_as_checked_json_not_objects():
    layout = Layout([ShardSpec("t0", 0, 10, 4, torch.float32), ShardSpec("t0", 1, 10, 4, torch.float32, 10, 0)])
    assert layout_from_json(layout_to_json(layout)).digest == layout.digest
    entry = json.loads(layout_to_json(layout))
    entry[1][4] = "__import__('os')"
    with pytest.raises(ValueError, match="table 't0'.*unknown dtype"):
        layout_from_json(json.dumps(entry))
    with pytest.raises(ValueError, match="entry 0: wrong field types"):
        layout_from_json(json.dumps([["t0", "0", 10, 4, "float32", 0, 0]]))
