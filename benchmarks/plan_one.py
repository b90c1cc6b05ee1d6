"""One planner on one table spec, in this process (run by benchmarks/plan_time.py): times plan()
and writes the timings and the plan as JSON, so each run's peak RSS is its own process's.

    python benchmarks/plan_one.py {fastplan,torchrec,dp} SPEC.json WORLD_SIZE OUT.json [--local-world-size N] [--no-lp-after]

Baselines import only TorchRec, so fastplan's modules do not count in their memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, Optional

PLANNERS = ("fastplan", "torchrec", "dp")


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS")


def load_module(spec_path: str):
    """The EmbeddingBagCollection of a `{"tables": [{name, num_embeddings, embedding_dim, feature_names}]}` file."""
    import torch
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    rows = json.loads(Path(spec_path).read_text())["tables"]
    tables = [
        EmbeddingBagConfig(name=r["name"], feature_names=r["feature_names"], embedding_dim=r["embedding_dim"],
                           num_embeddings=r["num_embeddings"])
        for r in rows
    ]
    return EmbeddingBagCollection(tables=tables, device=torch.device("meta"))


def plan_to_dict(plan) -> Dict[str, Dict[str, dict]]:
    """module path -> table -> sharding type, kernel, ranks, shard offsets (None for data parallel)."""
    return {
        path: {
            name: {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": list(ps.ranks),
                "offsets": [list(m.shard_offsets) for m in ps.sharding_spec.shards] if ps.sharding_spec else None,
            }
            for name, ps in module_plan.items()
        }
        for path, module_plan in plan.plan.items()
    }


def lp_after_plan(fast, module, sharders, makespan: float) -> dict:
    """The LP bound of the problem `fast` just planned (shard limits included), outside the timed plan()."""
    from fastplan.planner.bound import LP, plan_bound

    space = fast._enumerator.search_space(module, sharders)
    bound = plan_bound(space, fast._reserve(module, sharders), time_limit_s=120.0, makespan=makespan,
                       always_lp=True)
    return {"lp_bound": bound.value if bound.kind == LP else None, "lp_seconds": bound.seconds}


def run(planner: str, spec_path: str, world_size: int, local_world_size: Optional[int] = None,
        lp_after: bool = True) -> dict:
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner.types import Topology

    module = load_module(spec_path)
    topology = Topology(world_size=world_size, local_world_size=local_world_size, compute_device="cuda")
    sharders = [EmbeddingBagCollectionSharder()]
    out = {"rss_before_plan_mb": rss_mb()}
    if planner == "fastplan":
        from fastplan import FastShardingPlanner, PlanCache

        with tempfile.TemporaryDirectory() as d:
            cache = PlanCache(d)
            fast = FastShardingPlanner(topology=topology, cache=cache, debug=False)
            start = time.perf_counter()
            plan = fast.plan(module, sharders)
            out["seconds"] = time.perf_counter() - start
            report = fast.last_report
            out.update(lower_bound=report.lower_bound, cheap_bound=report.cheap_bound, model_perf=report.makespan,
                       lp_in_plan=report.bound == "LP", lp_bound=report.lower_bound if report.bound == "LP" else None,
                       lp_seconds=report.bound_seconds)
            # plan() skipped the LP or ran out of its budget: solve it untimed
            if lp_after and (report.bound != "LP" or "out of time" in report.bound_note):
                out.update(lp_in_plan=False, **lp_after_plan(fast, module, sharders, report.makespan))
            start = time.perf_counter()
            fast.plan(module, sharders)
            out["warm_seconds"] = time.perf_counter() - start
            if fast.last_report.source != "cache":
                raise RuntimeError("the second plan() did not come from the cache")
            cache.close()
    else:
        from torchrec.distributed.planner import EmbeddingShardingPlanner

        kwargs = {}
        if planner == "dp":
            from torchrec.distributed.planner.proposers import DynamicProgrammingProposer

            kwargs["proposer"] = DynamicProgrammingProposer()
        theirs = EmbeddingShardingPlanner(topology=topology, debug=False, **kwargs)
        start = time.perf_counter()
        plan = theirs.plan(module, sharders)
        out["seconds"] = time.perf_counter() - start
    out["plan"] = plan_to_dict(plan)
    return out


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("planner", choices=PLANNERS)
    ap.add_argument("spec")
    ap.add_argument("world_size", type=int)
    ap.add_argument("out")
    ap.add_argument("--local-world-size", type=int, help="ranks per host (default: all ranks on one host)")
    ap.add_argument("--no-lp-after", action="store_true", help="fastplan: do not solve the LP after plan() when it skipped it")
    args = ap.parse_args(argv)
    result = run(args.planner, args.spec, args.world_size, args.local_world_size, not args.no_lp_after)
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
