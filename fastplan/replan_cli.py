"""The command line's re-planning parts: `fastplan plan ... --previous old.plan` and
`fastplan diff old.plan new.plan` (what moves where, bytes per rank, a PNG).

Plan files are read with `fastplan.planfile.load_plan` (`PlanFile`: `.plan`, `.report`, `.inputs`,
`.estimates`). Table shapes and optimizers come from the new file's recorded inputs; without them,
from its shard metadata and per-shard estimates (no optimizer state counted then).
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

if TYPE_CHECKING:  # torch and TorchRec load with the commands, so `fastplan --help` stays fast
    from fastplan.planner.diff import PlanDiff, TableState

_ELEMENT_SIZE = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "int8": 1, "uint8": 1,
                 "float64": 8, "double": 8}


def add_replan_arguments(plan_parser: argparse.ArgumentParser) -> None:
    plan_parser.add_argument("--previous", help="re-plan starting from this plan file (moves few shards)")
    plan_parser.add_argument("--max-moved-bytes", type=int,
                             help="with --previous: best perf moving at most this many bytes (default: fewest bytes)")
    plan_parser.add_argument("--max-slowdown", type=float, default=0.01,
                             help="with --previous: max-rank perf allowed above a from-scratch plan (default 0.01)")


def add_diff_command(subparsers, error: type) -> None:
    d = subparsers.add_parser("diff", help="what moves between two plan files",
                              epilog="example: fastplan diff old.plan new.plan --plot moves.png")
    d.add_argument("old")
    d.add_argument("new")
    d.add_argument("--plot", help="write a PNG: moved bytes per rank, per-rank perf before / after")
    d.add_argument("--all", action="store_true", help="list every changed table (default: the first 50)")
    d.set_defaults(fn=lambda args: cmd_diff(args, error))


def _load(path: str, error: type):
    try:
        from fastplan.planfile import PlanFileError, load_plan
    except ImportError as e:  # the plan file format (fastplan.planfile) is not in this build
        raise error(f"reading plan files needs fastplan.planfile ({e})") from e
    try:
        return load_plan(path)
    except (OSError, PlanFileError) as e:
        raise error(f"{path}: {e}") from e


def replan_previous(planner, module, sharders, args, error: type) -> Tuple[Any, PlanDiff]:
    """`fastplan plan --previous`: replan from the previous plan file."""
    if args.max_moved_bytes is not None and args.max_moved_bytes < 0:
        raise error(f"--max-moved-bytes must be >= 0, got {args.max_moved_bytes}")
    if not (args.max_slowdown >= 0 and math.isfinite(args.max_slowdown)):
        raise error(f"--max-slowdown must be a finite number >= 0, got {args.max_slowdown}")
    previous = _load(args.previous, error).plan
    return planner.replan(module, sharders, previous, max_moved_bytes=args.max_moved_bytes,
                          max_slowdown=args.max_slowdown)


def table_states(plan_file, strict: bool = True) -> Dict[str, TableState]:
    """Each table's `TableState` from a plan file: its recorded inputs, else its shard metadata
    (and, for data-parallel tables, its per-shard estimates). `strict=False` skips tables whose
    shape the file does not record."""
    from fastplan.planner.diff import TableState, shardings

    recorded = _states_from_inputs(getattr(plan_file, "inputs", None))
    out = {}
    estimates = getattr(plan_file, "estimates", None) or {}
    for key, ps in shardings(plan_file.plan).items():
        if key in recorded:
            out[key] = recorded[key]
            continue
        boxes = [(list(m.shard_offsets), list(m.shard_sizes)) for m in ps.sharding_spec.shards] if ps.sharding_spec else []
        if not boxes:
            path, _, name = key.rpartition(".")
            e = estimates.get(path, {}).get(name)
            boxes = [(offset, size) for _, size, offset, *_ in e.rows()] if e is not None else []
        if not boxes:
            if not strict:
                continue
            raise ValueError(f"table '{key}': the plan file records neither its inputs nor its shape")
        out[key] = TableState(max(o[0] + s[0] for o, s in boxes), max(o[1] + s[1] for o, s in boxes), 4)
    return out


def _states_from_inputs(inputs: Optional[Dict[str, Any]]) -> Dict[str, TableState]:
    from fastplan.planner.diff import OPTIMIZER_STATE_BYTES, TableState

    out = {}
    try:
        fused = {m["path"]: m.get("fused_params") or {} for m in inputs["shared"]["modules"]}
    except (TypeError, KeyError):
        fused = {}
    for doc in (inputs or {}).get("tables") or []:
        try:
            key = doc["fqn"]
            rows, dim = (int(v) for v in doc["shape"])
        except (TypeError, ValueError, KeyError):
            continue
        dtype = str(doc.get("dtype", "float32")).rsplit(".", 1)[-1].strip('"')
        module_path = key.rsplit(".", 1)[0] if "." in key else ""
        optimizer = _optimizer(fused.get(module_path, {}).get("optimizer"))
        per_element, per_row = OPTIMIZER_STATE_BYTES.get(optimizer, (0, 0))
        out[key] = TableState(rows, dim, _ELEMENT_SIZE.get(dtype, 4), optimizer, per_element, per_row)
    return out


def _optimizer(value: Any) -> str:
    """An optimizer as recorded (enum value, "EmbOptimType.NAME", or a canonical object) -> its value."""
    if value is None:
        return "none"
    text = str(value.get("__type__", value) if isinstance(value, dict) else value).rsplit(".", 1)[-1]
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    by_name = {m.name: m.value for m in EmbOptimType}
    return by_name.get(text, text.lower() if text.upper() in by_name else text)


def diff_plan_files(old, new) -> PlanDiff:
    """The `PlanDiff` between two loaded plan files, with their reports' per-rank perf."""
    from fastplan.planner.diff import diff_plans

    old_shapes = {k: (s.rows, s.dim) for k, s in table_states(old, strict=False).items()}
    diff = diff_plans(old.plan, new.plan, table_states(new), old_shapes=old_shapes,
                      world_size=len(new.report.ranks) if new.report else None,
                      old_world_size=len(old.report.ranks) if old.report else None)
    if new.report:
        diff.rank_perf = [r.perf for r in new.report.ranks]
    if old.report:
        diff.previous_rank_perf = [r.perf for r in old.report.ranks]
    return diff


def plot_diff(diff: PlanDiff, path: str) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    ranks = np.arange(max(len(diff.received), len(diff.sent)))
    mib = 2.0**20
    got = np.pad(np.array(diff.received, float), (0, len(ranks) - len(diff.received))) / mib
    gone = np.pad(np.array(diff.sent, float), (0, len(ranks) - len(diff.sent))) / mib
    a.bar(ranks - 0.2, got, width=0.4, label="received")
    a.bar(ranks + 0.2, gone, width=0.4, label="sent")
    a.set(title=f"moved bytes per rank ({diff.moved_bytes / mib:.1f} MiB in all)", xlabel="rank", ylabel="MiB")
    a.legend()
    if diff.previous_rank_perf:
        b.bar(np.arange(len(diff.previous_rank_perf)) - 0.2, diff.previous_rank_perf, width=0.4, label="before")
    if diff.rank_perf:
        b.bar(np.arange(len(diff.rank_perf)) + 0.2, diff.rank_perf, width=0.4, label="after")
    if diff.scratch_max_rank_perf:
        b.axhline(diff.scratch_max_rank_perf, color="red", linestyle="--", label="from-scratch max")
    b.set(title="per-rank perf (ms)", xlabel="rank")
    if diff.previous_rank_perf or diff.rank_perf:
        b.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def cmd_diff(args, error: type) -> int:
    old, new = _load(args.old, error), _load(args.new, error)
    try:
        diff = diff_plan_files(old, new)
    except (KeyError, ValueError) as e:
        raise error(str(e)) from e
    print(diff.table(limit=None if args.all else 50))
    if args.plot:
        plot_diff(diff, args.plot)
        print(f"wrote {args.plot}")
    return 0
