"""`timeout_seconds` bounds planning time without making the plan depend on machine speed: a process
slowed down by a competing thread returns the same plan as an idle one."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLAN = """
import sys, threading, time
if sys.argv[1] == "throttled":  # a busy thread takes the GIL about half the time
    threading.Thread(target=lambda: [None for _ in iter(int, 1)], daemon=True).start()
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import Topology
from fastplan import FastShardingPlanner, SearchConfig
from fastplan.cache.agreement import plan_hash, table_digests
from fastplan.models import ebc, report_tables
planner = FastShardingPlanner(topology=Topology(world_size=8, compute_device="cuda"),
                              timeout_seconds=3, cache=None, debug=False,
                              search_config=SearchConfig(time_per_cell=2e-4))
plan = planner.plan(ebc(report_tables(100)), [EmbeddingBagCollectionSharder()])
print(plan_hash(table_digests(plan)), planner.last_report.planning_seconds)
"""


def test_a_throttled_process_returns_the_same_plan_under_a_timeout():
    out = {}
    for mode in ("idle", "throttled"):
        run = subprocess.run([sys.executable, "-c", PLAN, mode], capture_output=True, text=True, timeout=300, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": ROOT})
        assert run.returncode == 0, run.stderr[-2000:]
        digest, seconds = run.stdout.split()[-2:]
        out[mode] = (digest, float(seconds))
    assert out["throttled"][1] > 1.3 * out["idle"][1], out  # the throttle really slowed planning down
    assert out["throttled"][0] == out["idle"][0], out
