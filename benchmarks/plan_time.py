"""Planning time and plan quality: fastplan vs TorchRec's EmbeddingShardingPlanner, in one run.

Tables as in the planner-timeout report (seeded). For each size: fastplan cold time (no cache),
warm time (cache hit), TorchRec's time where it runs (up to --torchrec-max tables), the ratio,
and both plans' max-rank perf scored with TorchRec's own estimators.

    python benchmarks/plan_time.py                       # 50..5000 tables, 8 and 64 ranks
    python benchmarks/plan_time.py --sizes 50 500 --world-sizes 8 --torchrec-max 100
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from typing import Dict, List, Optional

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder  # noqa: E402
from torchrec.distributed.planner import EmbeddingShardingPlanner  # noqa: E402
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator  # noqa: E402
from torchrec.distributed.planner.types import Topology  # noqa: E402

from fastplan import FastShardingPlanner, PlanCache  # noqa: E402
from fastplan.models import ebc, report_tables  # noqa: E402


def torchrec_score(module, plan, topology: Topology, batch_size: int = 512) -> float:
    """Max over ranks of summed Perf.total, re-estimating every shard with TorchRec's estimators."""
    options = EmbeddingEnumerator(topology, batch_size=batch_size).enumerate(module, [EmbeddingBagCollectionSharder()])
    loads = [0.0] * topology.world_size
    for so in sorted(options, key=lambda s: (s.path, s.name)):
        ps = plan.plan[so.path][so.name]
        if (ps.sharding_type, ps.compute_kernel) != (so.sharding_type, so.compute_kernel):
            continue
        offsets = [list(m.shard_offsets) for m in ps.sharding_spec.shards] if ps.sharding_spec else None
        if offsets is not None and offsets != [list(s.offset) for s in so.shards]:
            raise AssertionError(f"{so.name}: shard layout differs from TorchRec's")
        for shard, rank in zip(so.shards, ps.ranks):
            loads[rank] += shard.perf.total
    return max(loads)


def run(sizes: List[int], world_sizes: List[int], torchrec_max: int, progress=None) -> List[Dict[str, Optional[float]]]:
    rows = []
    sharders = [EmbeddingBagCollectionSharder()]
    for world in world_sizes:
        for n in sizes:
            topology = Topology(world_size=world, compute_device="cuda")
            module = ebc(report_tables(n, seed=0))
            with tempfile.TemporaryDirectory() as d:
                cache = PlanCache(d)
                planner = FastShardingPlanner(topology=topology, cache=cache, debug=False)
                t = time.perf_counter()
                ours = planner.plan(module, sharders)
                cold = time.perf_counter() - t
                gap = planner.last_report.gap
                t = time.perf_counter()
                planner.plan(module, sharders)
                warm = time.perf_counter() - t
                cache.close()
            row = {"tables": n, "world": world, "fast_cold_s": cold, "fast_warm_s": warm, "gap": gap,
                   "fast_perf": torchrec_score(module, ours, topology) if n <= 1000 else None,
                   "torchrec_s": None, "torchrec_perf": None}
            if n <= torchrec_max:
                t = time.perf_counter()
                theirs = EmbeddingShardingPlanner(topology=topology, debug=False).plan(module, sharders)
                row["torchrec_s"] = time.perf_counter() - t
                row["torchrec_perf"] = torchrec_score(module, theirs, topology)
            rows.append(row)
            if progress:
                progress(row)
    return rows


def format_row(r) -> str:
    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    speedup = r["torchrec_s"] / r["fast_cold_s"] if r["torchrec_s"] else None
    quality = "-"
    if r["torchrec_perf"] is not None:  # within 1e-12 relative counts as equal (float summation order)
        diff = (r["fast_perf"] - r["torchrec_perf"]) / r["torchrec_perf"]
        quality = "better" if diff < -1e-12 else "equal" if diff <= 1e-12 else "WORSE"
    return (
        f"{r['tables']:>6} {r['world']:>5} {f(r['fast_cold_s'], '10.3f')} {r['fast_warm_s'] * 1000:>9.1f} "
        f"{f(r['torchrec_s'], '10.1f')} {f(speedup, '9.0f')} {f(r['fast_perf'], '14.9f')} {f(r['torchrec_perf'], '14.9f')} "
        f"{r['gap'] * 100:>7.3f} {quality:>7}"
    )


HEADER = (
    f"{'tables':>6} {'ranks':>5} {'fast cold':>10} {'warm (ms)':>9} {'torchrec':>10} {'speedup':>9} "
    f"{'fast perf':>14} {'torchrec perf':>14} {'gap %':>7} {'quality':>7}"
)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 500, 1000, 2000, 5000])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--torchrec-max", type=int, default=200, help="largest table count TorchRec is run for")
    args = ap.parse_args(argv)
    print(HEADER, flush=True)
    run(args.sizes, args.world_sizes, args.torchrec_max, progress=lambda r: print(format_row(r), flush=True))


if __name__ == "__main__":
    main()
