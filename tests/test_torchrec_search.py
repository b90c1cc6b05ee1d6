"""Replaying TorchRec's default search (its proposers and greedy partitioner) on the vectorized
model finds exactly the plan quality TorchRec's own planner finds: that replay is the start that
keeps fastplan from ever being worse than TorchRec."""

import sys
from pathlib import Path

import pytest
from torchrec.distributed.planner import EmbeddingShardingPlanner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import fuzz  # noqa: E402

from fastplan import FastShardingPlanner  # noqa: E402
from fastplan.planner.torchrec_search import replay  # noqa: E402


def test_replay_reaches_torchrecs_max_rank_perf():
    compared = 0
    for seed in range(1000, 1014):
        case = fuzz.make_case(seed, max_world=16, max_tables=12)
        kw = dict(topology=case.topology, batch_size=case.batch_size, constraints=case.constraints, debug=False)
        try:
            theirs = EmbeddingShardingPlanner(**kw).plan(case.module, fuzz._sharders())
        except Exception:  # noqa: BLE001 - TorchRec rejects this case: nothing to compare
            continue
        _, their_perf, _ = fuzz.score(case, theirs)
        planner = FastShardingPlanner(cache=None, **kw)
        cap = planner._reserve(case.module, fuzz._sharders())
        space = planner._search_space(case.module, fuzz._sharders(), None)
        replayed = replay(space, cap, budget=10**9)
        assert replayed.complete
        assert replayed.makespan == pytest.approx(their_perf, rel=1e-9), f"seed {seed}: {case.describe()}"
        compared += 1
    assert compared >= 8
