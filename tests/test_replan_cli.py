"""`fastplan diff` and `fastplan plan --previous`: what moves between two plan files, as text and PNG."""

from types import SimpleNamespace

import pytest
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import Topology

from fastplan import FastShardingPlanner
from fastplan.models import ebc, report_tables
from fastplan.planner.tables import collect_tables
from fastplan.replan_cli import diff_plan_files, plot_diff, table_states

SHARDERS = [EmbeddingBagCollectionSharder()]


def _plan_file(tables, previous=None):
    planner = FastShardingPlanner(topology=Topology(world_size=4, compute_device="cuda"), cache=None, debug=False)
    if previous is None:
        plan = planner.plan(ebc(tables), SHARDERS)
    else:
        plan, _ = planner.replan(ebc(tables), SHARDERS, previous.plan, max_moved_bytes=10**6)
    # What a plan file records of its inputs: each table's shape, dtype and the sharder's fused params.
    inputs = {"tables": [[t.name, {"shape": [t.rows, t.dim], "dtype": str(t.tensor.dtype), "fused_params": t.fused_params}]
                         for t in collect_tables(ebc(tables), SHARDERS, "cuda")]}
    return SimpleNamespace(plan=plan, report=planner.last_report, inputs=inputs, estimates=None)


def test_diff_of_two_plan_files_lists_moves_and_draws_them(tmp_path):
    base = report_tables(40)
    old = _plan_file(base)
    new = _plan_file([t for i, t in enumerate(base) if i % 8 != 2] + report_tables(42)[40:], previous=old)
    diff = diff_plan_files(old, new)
    counts = diff.counts()
    assert counts["added"] == 2 and counts["removed"] == 5
    assert diff.previous_rank_perf == [r.perf for r in old.report.ranks]
    text = diff.table()
    assert "table_40" in text and "removed" in text and "received" in text
    png = tmp_path / "moves.png"
    plot_diff(diff, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_data_parallel_table_without_recorded_shape_is_named():
    pf = _plan_file(report_tables(30))
    pf.inputs = None
    dp = [k for k, mp in pf.plan.plan.items() for k, ps in mp.items() if ps.sharding_type == "data_parallel"]
    assert dp
    with pytest.raises(ValueError, match=dp[0]):
        table_states(pf)


def test_shapes_and_optimizer_come_from_the_recorded_inputs():
    old = _plan_file(report_tables(6))
    inputs = {"tables": [[key, {"shape": [1000, 16], "dtype": "torch.float16",
                                "fused_params": {"optimizer": "EmbOptimType.EXACT_ROWWISE_ADAGRAD"}}]
                         for key in ("table_0", "table_1")]}
    states = table_states(SimpleNamespace(plan=old.plan, inputs=inputs, estimates=None), strict=False)
    assert (states["table_0"].rows, states["table_0"].element_size) == (1000, 2)
    assert (states["table_0"].optimizer, states["table_0"].optimizer_row_bytes) == ("exact_row_wise_adagrad", 4)


def test_plan_previous_then_diff_on_plan_files(tmp_path):
    pytest.importorskip("fastplan.planfile")
    from fastplan.cli import main

    spec = tmp_path / "tables.yaml"
    grown = tmp_path / "grown.yaml"
    rows = [f"- {{name: t{i}, num_embeddings: {100 + i}, embedding_dim: 8}}" for i in range(12)]
    spec.write_text("tables:\n" + "\n".join(rows) + "\n")
    grown.write_text("tables:\n" + "\n".join(rows + ["- {name: extra, num_embeddings: 50, embedding_dim: 8}"]) + "\n")
    old, new, png = tmp_path / "old.plan", tmp_path / "new.plan", tmp_path / "diff.png"
    assert main(["plan", "--tables", str(spec), "--world-size", "4", "--out", str(old), "--cache-dir", str(tmp_path / "c")]) == 0
    assert main(["plan", "--tables", str(grown), "--world-size", "4", "--previous", str(old), "--out", str(new),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    assert main(["diff", str(old), str(new), "--plot", str(png)]) == 0
    assert png.exists()
