"""`fastplan` command line: plan (or re-plan) offline, manage the plan cache, explain or diff plan files, benchmark.

Only the standard library is imported up front (`fastplan --help` stays fast); torch and TorchRec are
imported by the commands that need them.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import List, Optional

EPILOG = {
    "plan": "example: fastplan plan --model fastplan.models:report_model --world-size 8 --out model.plan",
    "cache": "example: fastplan cache list; fastplan cache verify; fastplan cache export /shared/plans; "
             "fastplan cache import /shared/plans",
    "explain": "example: fastplan explain model.plan --plot plan.png",
    "bench": "example: fastplan bench --sizes 20 50 500 --world-sizes 8 --torchrec-max 50 --dp-timeout 120 --plot bench.png",
    "diff": "example: fastplan plan --model fastplan.models:report_model --previous old.plan --out new.plan; "
            "fastplan diff old.plan new.plan --plot moves.png",
}


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
    """Table name -> ParameterConstraints, every field (nested ones too) checked against its type."""
    if not path:
        return None
    import msgspec
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
        try:
            out[str(table)] = msgspec.convert(c, ParameterConstraints, dec_hook=_refuse_type)
        except msgspec.ValidationError as e:
            field = str(e).rsplit("at `$", 1)[-1].rstrip("`")
            raise CliError(f"--constraints: {path}: table '{table}': field '{field.lstrip('.')}': {str(e).split(' - at ')[0]}") from e
    return out


def _refuse_type(tp, obj):
    raise TypeError(f"a {getattr(tp, '__name__', tp)} cannot be given in a constraints file")


def _positive(name: str, value, integer: bool = False):
    if value is None:
        return None
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise CliError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value}")
    return value


def _output(flag: str, path: Optional[str]) -> None:
    """Fail before planning if `path` cannot be written."""
    if not path:
        return
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise CliError(f"{flag}: {path} is a directory")
    if not parent.is_dir():
        raise CliError(f"{flag}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CliError(f"{flag}: directory {parent} is not writable")


def _cache(args):
    from fastplan.cache.store import PlanCache

    return PlanCache(args.cache_dir) if args.cache_dir else PlanCache.default()


def cmd_plan(args) -> int:
    if bool(args.tables) == bool(args.model):
        raise CliError("give exactly one of --tables FILE or --model pkg.module:factory")
    _positive("--world-size", args.world_size, integer=True)
    if args.local_world_size is not None:
        _positive("--local-world-size", args.local_world_size, integer=True)
        if args.world_size % args.local_world_size:
            raise CliError(f"--local-world-size: {args.local_world_size} does not divide --world-size {args.world_size}")
    _positive("--batch-size", args.batch_size, integer=True)
    _positive("--hbm-gb", args.hbm_gb)
    _positive("--ddr-gb", args.ddr_gb)
    _output("--out", args.out)
    _output("--json", args.json)

    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner.types import PlannerError, Topology

    from fastplan.models import SpecError, ebc, tables_from_spec
    from fastplan.planfile import dump_plan, plan_to_dict
    from fastplan.planner import FastShardingPlanner

    constraints = _load_constraints(args.constraints)
    try:
        module = ebc(tables_from_spec(args.tables)) if args.tables else _load_model(args.model)
    except SpecError as e:
        raise CliError(f"--tables: {e}") from e
    topo_kwargs = {}
    if args.hbm_gb is not None:
        topo_kwargs["hbm_cap"] = int(args.hbm_gb * 1024**3)
    if args.ddr_gb is not None:
        topo_kwargs["ddr_cap"] = int(args.ddr_gb * 1024**3)
    topology = Topology(world_size=args.world_size, local_world_size=args.local_world_size,
                        compute_device=args.compute_device, **topo_kwargs)
    planner = FastShardingPlanner(topology=topology, batch_size=args.batch_size, constraints=constraints,
                                  cache=_cache(args), debug=False)
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    diff = None
    try:
        if args.previous:
            from fastplan.replan_cli import replan_previous

            plan, diff = replan_previous(planner, module, sharders, args, CliError)
        else:
            plan = planner.plan(module, sharders)
    except PlannerError as e:
        if str(e).startswith("The reserved topology"):  # TorchRec's storage reservation left nothing per rank
            memory = "--hbm-gb" if args.compute_device == "cuda" else "--ddr-gb"
            left = re.search(r"Storage\([^)]*\)", str(e))
            raise CliError(f"{memory}: nothing is left per rank after TorchRec's storage reservation "
                           f"({left.group(0) if left else 'negative'} per rank); give each rank more memory") from e
        raise
    report = planner.last_report
    print(report.table() if report else "empty plan: the module has no shardable tables")
    if diff is not None:
        print(diff.table())
    if args.show_tables:
        print(plan)
    if args.out:
        if planner.last_plan_file is not None:
            planner.last_plan_file.dump(args.out)
        else:
            dump_plan(plan, args.out, report=report)
        print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(plan_to_dict(plan), indent=1))
        print(f"wrote {args.json}")
    return 0


def cmd_cache(args) -> int:
    from fastplan.planfile import plan_to_dict

    cache = _cache(args)
    if args.action == "list":
        keys = cache.keys()
        shown = 0
        for key in keys:
            entry = cache.get(key)
            if entry is None:
                print(f"{key}  corrupt: removed")
                continue
            r = entry.report
            print(f"{key}  {f'{r.num_tables} tables, {len(r.ranks)} ranks' if r else 'no report'}")
            shown += 1
        print(f"{shown} plan(s) in {cache.directory}")
    elif args.action == "show":
        if not args.arg:
            raise CliError("cache show needs a KEY (see 'fastplan cache list')")
        matches = [k for k in cache.keys() if k.startswith(args.arg)]
        if len(matches) != 1:
            raise CliError(f"cache show: {len(matches)} keys start with '{args.arg}'")
        entry = cache.get(matches[0])
        if entry is None:
            state = "could not be removed" if matches[0] in cache else "has been removed"
            raise CliError(f"cache show: entry {matches[0][:12]} is corrupt and {state} (see the warning above)")
        print(entry.report.table() if entry.report else "(no report)")
        print(json.dumps(plan_to_dict(entry.plan), indent=1))
    elif args.action == "verify":
        keys = cache.keys()
        problems = cache.verify()
        for key, problem in problems:
            print(f"{key[:12]}: {problem}")
        print(f"{len(keys) - len(problems)} of {len(keys)} plan(s) in {cache.directory} are valid")
        return 1 if problems else 0
    elif args.action == "clear":
        print(f"removed {cache.clear()} entries from {cache.directory}")
    elif args.action == "export":
        if not args.arg:
            raise CliError("cache export needs a DIR")
        target = Path(args.arg)
        if not target.is_dir():
            _output("cache export", args.arg)  # it will be created: its parent must exist and be writable
        print(f"exported {cache.export_to(args.arg)} plan(s) to {args.arg}")
    elif args.action == "import":
        if not args.arg or not Path(args.arg).is_dir():
            raise CliError(f"cache import: {args.arg or 'DIR'} is not a directory")
        n, problems = cache.import_from(args.arg)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"imported {n} plan(s) from {args.arg}")
    return 0


def cmd_explain(args) -> int:
    from fastplan.planfile import PlanFileError, load_plan

    _output("--plot", args.plot)
    try:
        report = load_plan(args.plan).report
    except PlanFileError as e:
        raise CliError(str(e)) from e
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


@functools.lru_cache(maxsize=1)
def _plan_time():
    """benchmarks/plan_time.py of the repository checkout (not part of the installed package), or None."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "plan_time.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("plan_time", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def cmd_bench(args) -> int:
    plan_time = _plan_time()
    if plan_time is None:
        raise CliError("fastplan bench needs the repository's benchmarks/ folder")
    plan_time.execute(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastplan", description="Fast, cached TorchRec sharding plans.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="plan a model and fill the cache", epilog=EPILOG["plan"])
    p.add_argument("--tables", help="YAML/JSON table spec: tables: [{name, num_embeddings, embedding_dim}]")
    p.add_argument("--model", help="pkg.module:factory returning an nn.Module")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--local-world-size", type=int, help="ranks per host (default: all ranks on one host)")
    p.add_argument("--compute-device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--hbm-gb", type=float)
    p.add_argument("--ddr-gb", type=float)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--constraints", help="YAML/JSON: table name -> ParameterConstraints fields")
    p.add_argument("--out", help="write a plan file (JSON: plan, report, inputs, estimates; see fastplan.load_plan)")
    p.add_argument("--json", help="write only the plan, as JSON {module: {table: sharding}}")
    p.add_argument("--show-tables", action="store_true", help="also print TorchRec's per-table plan")
    p.add_argument("--cache-dir")
    p.set_defaults(fn=cmd_plan)
    from fastplan.replan_cli import add_diff_command, add_replan_arguments  # standard library and numpy only

    add_replan_arguments(p)
    add_diff_command(sub, CliError)

    c = sub.add_parser("cache", help="list/show/verify/clear/export/import cached plans", epilog=EPILOG["cache"])
    c.add_argument("action", choices=["list", "show", "verify", "clear", "export", "import"])
    c.add_argument("arg", nargs="?", help="KEY for show, DIR for export/import")
    c.add_argument("--cache-dir")
    c.set_defaults(fn=cmd_cache)

    e = sub.add_parser("explain", help="per-rank load of a plan file", epilog=EPILOG["explain"])
    e.add_argument("plan")
    e.add_argument("--plot", help="write a PNG bar chart of per-rank perf and memory")
    e.set_defaults(fn=cmd_explain)

    b = sub.add_parser("bench", help="planning time, quality and memory vs TorchRec (default and DP)", epilog=EPILOG["bench"])
    plan_time = _plan_time()
    if plan_time is not None:
        plan_time.add_arguments(b)
    b.set_defaults(fn=cmd_bench)
    return ap


_NAMED_ERRORS = (("torchrec.distributed.planner.types", "PlannerError"), ("fastplan.planfile", "PlanFileError"))


def main(argv: Optional[List[str]] = None) -> int:
    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except CliError as e:
        print(f"fastplan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # planner and plan-file errors name their table, rank or field already
        known = tuple(getattr(sys.modules[m], name) for m, name in _NAMED_ERRORS if m in sys.modules)
        if isinstance(e, known):
            print(f"fastplan {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
