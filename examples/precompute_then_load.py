"""Precompute a plan offline into a shipped cache directory, then load it at job start in milliseconds.

    .venv/bin/python examples/precompute_then_load.py /tmp/fastplan-plans
"""

import sys
import tempfile
import time

from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import Topology

from fastplan import FastShardingPlanner, PlanCache
from fastplan.models import report_model


def main(ship_dir: str) -> None:
    sharders = [EmbeddingBagCollectionSharder()]
    topology = Topology(world_size=8, compute_device="cuda")

    # Offline (a build machine): plan, then export the cache entry to a directory you ship.
    with tempfile.TemporaryDirectory() as build_cache:
        offline = FastShardingPlanner(topology=topology, cache=PlanCache(build_cache), debug=False)
        model = report_model(500)
        t = time.perf_counter()
        offline.plan(model, sharders)
        print(f"offline: planned 500 tables in {time.perf_counter() - t:.3f} s")
        print(f"exported {PlanCache(build_cache).export_to(ship_dir)} plan(s) to {ship_dir}")

    # At job start (every rank): import the shipped plans, then plan as usual: it is a cache hit.
    with tempfile.TemporaryDirectory() as job_cache:
        cache = PlanCache(job_cache)
        cache.import_from(ship_dir)  # (count, problems): invalid files are skipped, never executed
        online = FastShardingPlanner(topology=topology, cache=cache, debug=False)
        model = report_model(500)
        t = time.perf_counter()
        plan = online.plan(model, sharders)
        print(f"job start: {online.last_report.source} hit in {(time.perf_counter() - t) * 1000:.1f} ms, "
              f"{sum(len(m) for m in plan.plan.values())} tables")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
