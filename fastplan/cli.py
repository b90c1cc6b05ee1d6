"""`fastplan` command line: plan offline, manage the plan cache, explain a plan, benchmark."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import List, Optional

EPILOG = {
    "plan": "example: fastplan plan --model fastplan.models:report_model --world-size 8 --out plan.pt --json plan.json",
    "cache": "example: fastplan cache list; fastplan cache export /shared/plans; fastplan cache import /shared/plans",
    "explain": "example: fastplan explain plan.pt --plot plan.png",
    "bench": "example: fastplan bench --sizes 50 500 --world-sizes 8 --torchrec-max 50 --plot bench.png",
}  # re-planning: fastplan plan ... --previous old.plan --out new.plan; fastplan diff old.plan new.plan


class CliError(Exception):
    """A bad argument or input file; printed as one line, exit status 2."""


def _load_model(spec: str):
    if ":" not in spec:
        raise CliError(f"--model: expected 'package.module:factory', got '{spec}'")
    mod_name, attr = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise CliError(f"--model: cannot load '{spec}' ({e})") from e
    return factory() if callable(factory) else factory


def _load_constraints(path: Optional[str]):
    if not path:
        return None
    from torchrec.distributed.planner.types import ParameterConstraints

    from fastplan.models import SpecError, load_spec

    try:
        doc = load_spec(path)
    except SpecError as e:
        raise CliError(f"--constraints: {e}") from e
    fields = set(ParameterConstraints.__dataclass_fields__)
    out = {}
    for table, c in doc.items():
        if not isinstance(c, dict):
            raise CliError(f"--constraints: {path}: '{table}' must map field names to values")
        unknown = sorted(set(c) - fields)
        if unknown:
            raise CliError(f"--constraints: {path}: table '{table}': unknown field(s) {unknown}")
        out[table] = ParameterConstraints(**c)
    return out


def cmd_plan(args) -> int:
    import torch
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner.types import Topology

    from fastplan import FastShardingPlanner, PlanCache
    from fastplan.models import SpecError, ebc, tables_from_spec

    if bool(args.tables) == bool(args.model):
        raise CliError("give exactly one of --tables FILE or --model pkg.module:factory")
    if args.world_size <= 0:
        raise CliError(f"--world-size must be positive, got {args.world_size}")
    try:
        module = ebc(tables_from_spec(args.tables)) if args.tables else _load_model(args.model)
    except SpecError as e:
        raise CliError(f"--tables: {e}") from e
    topo_kwargs = {}
    if args.hbm_gb is not None:
        topo_kwargs["hbm_cap"] = int(args.hbm_gb * 1024**3)
    if args.ddr_gb is not None:
        topo_kwargs["ddr_cap"] = int(args.ddr_gb * 1024**3)
    topology = Topology(world_size=args.world_size, compute_device=args.compute_device, **topo_kwargs)
    planner = FastShardingPlanner(
        topology=topology, batch_size=args.batch_size, constraints=_load_constraints(args.constraints),
        cache=PlanCache(args.cache_dir) if args.cache_dir else PlanCache.default(), debug=False,
    )
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    # ---- re-planning (fastplan.replan_cli) --------------------------------------------------
    diff = None
    if args.previous:
        from fastplan.replan_cli import replan_previous

        plan, diff = replan_previous(planner, module, sharders, args, CliError)
    else:
        plan = planner.plan(module, sharders)
    # ---- end re-planning ----------------------------------------------------------------------
    report = planner.last_report
    print(report.table() if report else "empty plan: the module has no shardable tables")
    if diff is not None:
        print(diff.table())
    if args.show_tables:
        print(plan)
    if args.out:
        plan.fastplan_report = report  # travels with the pickle; `fastplan explain` reads it
        torch.save(plan, args.out)
        print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(plan_to_json(plan), indent=1))
        print(f"wrote {args.json}")
    return 0


def plan_to_json(plan) -> dict:
    out = {}
    for path, module_plan in sorted(plan.plan.items()):
        for name, ps in sorted(module_plan.items()):
            shards = None
            if ps.sharding_spec is not None:
                shards = [
                    {"offsets": list(m.shard_offsets), "sizes": list(m.shard_sizes), "placement": str(m.placement)}
                    for m in ps.sharding_spec.shards
                ]
            out.setdefault(path or "<root>", {})[name] = {
                "sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel, "ranks": ps.ranks, "shards": shards,
            }
    return out


def cmd_cache(args) -> int:
    from fastplan import PlanCache

    cache = PlanCache(args.cache_dir) if args.cache_dir else PlanCache.default()
    if not cache.enabled:
        raise CliError(f"cache directory {cache.directory} is not usable")
    if args.action == "list":
        for key in cache.keys():
            hit = cache.get(key)
            desc = f"{hit[1].num_tables} tables, {len(hit[1].ranks)} ranks" if hit and hit[1] else "?"
            print(f"{key}  {desc}")
        print(f"{len(cache.keys())} plan(s) in {cache.directory}")
    elif args.action == "show":
        if not args.arg:
            raise CliError("cache show needs a KEY (see 'fastplan cache list')")
        matches = [k for k in cache.keys() if k.startswith(args.arg)]
        if len(matches) != 1:
            raise CliError(f"cache show: {len(matches)} keys start with '{args.arg}'")
        hit = cache.get(matches[0])
        if hit is None:
            raise CliError(f"cache show: entry {matches[0][:12]} was corrupt and has been removed")
        print(hit[1].table() if hit[1] else "")
        print(json.dumps(plan_to_json(hit[0]), indent=1))
    elif args.action == "clear":
        print(f"removed {cache.clear()} entries from {cache.directory}")
    elif args.action in ("export", "import"):
        if not args.arg:
            raise CliError(f"cache {args.action} needs a DIR")
        if args.action == "import" and not Path(args.arg).is_dir():
            raise CliError(f"cache import: {args.arg} is not a directory")
        n = cache.export_to(args.arg) if args.action == "export" else cache.import_from(args.arg)
        print(f"{args.action}ed {n} plan(s) {'to' if args.action == 'export' else 'from'} {args.arg}")
    return 0


def cmd_explain(args) -> int:
    import torch

    try:
        plan = torch.load(args.plan, weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"{args.plan}: not a plan written by 'fastplan plan --out' ({e})") from e
    report = getattr(plan, "fastplan_report", None)
    if report is None:
        raise CliError(f"{args.plan}: has no fastplan report; write it with 'fastplan plan --out'")
    print(report.table())
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ranks = [r.rank for r in report.ranks]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
        a.bar(ranks, [r.perf for r in report.ranks])
        a.axhline(report.lower_bound, color="red", linestyle="--", label="lower bound")
        a.set(title="per-rank perf (ms)", xlabel="rank")
        a.legend()
        b.bar(ranks, [r.hbm / 1024**3 for r in report.ranks], label="HBM")
        b.bar(ranks, [r.ddr / 1024**3 for r in report.ranks], bottom=[r.hbm / 1024**3 for r in report.ranks], label="DDR")
        b.set(title="per-rank memory (GB)", xlabel="rank")
        b.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_bench(args) -> int:
    from tqdm import tqdm

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import plan_time
    except ImportError as e:
        raise CliError("fastplan bench needs the repository's benchmarks/ folder") from e
    total = len(args.sizes) * len(args.world_sizes)
    with tqdm(total=total, desc="planning") as bar:
        rows = plan_time.run(args.sizes, args.world_sizes, args.torchrec_max, progress=lambda r: bar.update(1))
    print(plan_time.HEADER)
    for r in rows:
        print(plan_time.format_row(r))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for world in args.world_sizes:
            mine = [r for r in rows if r["world"] == world]
            ax.plot([r["tables"] for r in mine], [r["fast_cold_s"] for r in mine], "o-", label=f"fastplan, {world} ranks")
            theirs = [r for r in mine if r["torchrec_s"] is not None]
            if theirs:
                ax.plot([r["tables"] for r in theirs], [r["torchrec_s"] for r in theirs], "s--", label=f"TorchRec, {world} ranks")
        ax.set(xscale="log", yscale="log", xlabel="tables", ylabel="planning time (s)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastplan", description="Fast, cached TorchRec sharding plans.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="plan a model and fill the cache", epilog=EPILOG["plan"])
    p.add_argument("--tables", help="YAML/JSON table spec: tables: [{name, num_embeddings, embedding_dim}]")
    p.add_argument("--model", help="pkg.module:factory returning an nn.Module")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--compute-device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--hbm-gb", type=float)
    p.add_argument("--ddr-gb", type=float)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--constraints", help="YAML/JSON: table name -> ParameterConstraints fields")
    p.add_argument("--out", help="write the ShardingPlan (torch.load-able)")
    p.add_argument("--json", help="write a readable JSON of the plan")
    p.add_argument("--show-tables", action="store_true", help="also print TorchRec's per-table plan")
    p.add_argument("--cache-dir")
    p.set_defaults(fn=cmd_plan)
    # ---- re-planning (fastplan.replan_cli): plan --previous, diff -----------------------------
    from fastplan.replan_cli import add_diff_command, add_replan_arguments

    add_replan_arguments(p)
    add_diff_command(sub, CliError)
    # ---- end re-planning ----------------------------------------------------------------------

    c = sub.add_parser("cache", help="list/show/clear/export/import cached plans", epilog=EPILOG["cache"])
    c.add_argument("action", choices=["list", "show", "clear", "export", "import"])
    c.add_argument("arg", nargs="?", help="KEY for show, DIR for export/import")
    c.add_argument("--cache-dir")
    c.set_defaults(fn=cmd_cache)

    e = sub.add_parser("explain", help="per-rank load of a saved plan", epilog=EPILOG["explain"])
    e.add_argument("plan")
    e.add_argument("--plot", help="write a PNG bar chart of per-rank perf and memory")
    e.set_defaults(fn=cmd_explain)

    b = sub.add_parser("bench", help="planning time vs TorchRec", epilog=EPILOG["bench"])
    b.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 500, 1000])
    b.add_argument("--world-sizes", type=int, nargs="+", default=[8])
    b.add_argument("--torchrec-max", type=int, default=100)
    b.add_argument("--plot", default="bench.png")
    b.set_defaults(fn=cmd_bench)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except CliError as e:
        print(f"fastplan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # planner errors name their table/rank already
        from torchrec.distributed.planner.types import PlannerError

        if isinstance(e, PlannerError):
            print(f"fastplan {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
