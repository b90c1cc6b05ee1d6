"""benchmarks/plan_time.py: every planner runs in its own process, plans are scored with TorchRec's
estimators, and the table keeps its columns when a baseline is skipped or killed at its time cap."""

import argparse
import importlib.util
import io
import sys
from pathlib import Path

import pytest
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import Topology

from fastplan import FastShardingPlanner
from fastplan.models import ebc, report_tables

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plan_time = load("plan_time")
plan_one = load("plan_one")


def bench_args(*argv):
    ap = argparse.ArgumentParser()
    plan_time.add_arguments(ap)
    return ap.parse_args(list(argv))


def test_table_keeps_its_columns_when_a_baseline_is_skipped_or_killed(tmp_path):
    args = bench_args("--sizes", "6", "--world-sizes", "2", "--repeats", "1", "--torchrec-max", "0",
                      "--dp-timeout", "0.5", "--plot", str(tmp_path / "bench.png"))
    out = io.StringIO()
    [row] = plan_time.execute(args, out=out)
    groups_line, titles, data = out.getvalue().splitlines()[:3]

    assert len(groups_line) == len(titles) == len(data)
    for name in ("fastplan", "TorchRec default", "TorchRec DP"):
        assert name in groups_line
    ids, fast, torchrec, dp = (cell.strip() for cell in data.split(" | "))
    assert ids.split() == ["6", "2"]
    assert torchrec == "skipped (cap 0 tables)"
    assert dp.startswith("timeout > 0.5 s, RSS ")
    assert titles.split(" | ")[1].split() == ["cold", "s", "warm", "ms", "CLI", "s", "RSS", "MB", "perf/LB",
                                              "gap%cheap", "gap%LP", "LP", "s"]
    cold, warm_ms, cli, rss, perf_over_bound, gap_cheap, gap_lp = map(float, fast.split()[:7])
    assert 0 <= gap_lp <= gap_cheap
    assert 0 < cold < cli and warm_ms > 0 and rss > 100
    assert perf_over_bound >= 1 - 1e-9  # TorchRec's estimate of fastplan's plan is not below fastplan's bound
    assert row.fastplan.perf == pytest.approx(perf_over_bound * row.lower_bound, rel=1e-5)
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_scores_from_the_options_plans_use_equal_a_full_enumeration():
    tables, world = 12, 4
    fast = FastShardingPlanner(topology=Topology(world_size=world, compute_device="cuda"), cache=None, debug=False)
    ours = plan_one.plan_to_dict(fast.plan(ebc(report_tables(tables, seed=0)), [EmbeddingBagCollectionSharder()]))
    other = {"": dict(ours[""])}
    other[""]["table_0"] = {"sharding_type": "data_parallel", "compute_kernel": "dense", "ranks": list(range(world)), "offsets": None}
    other[""]["table_1"] = {"sharding_type": "table_wise", "compute_kernel": "fused", "ranks": [3], "offsets": [[0, 0]]}
    plans = {"fastplan": ours, "other": other}

    scores = plan_time.torchrec_perf(tables, world, plans)
    assert scores == plan_time.torchrec_perf(tables, world, plans, full=True)
    assert scores["fastplan"] == pytest.approx(fast.last_report.makespan, rel=1e-9)
    assert scores["other"] != scores["fastplan"]


def test_a_plan_missing_a_table_is_not_scored():
    plan = {"": {"table_0": {"sharding_type": "table_wise", "compute_kernel": "fused", "ranks": [0], "offsets": [[0, 0]]}}}
    with pytest.raises(ValueError, match="places 1 of 2 tables"):
        plan_time.torchrec_perf(2, 2, {"broken": plan})
