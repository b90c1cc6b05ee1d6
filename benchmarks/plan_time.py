"""Planning time, plan quality and peak memory, in one run: fastplan vs TorchRec's default planner
vs TorchRec with DynamicProgrammingProposer, each run in its own process (benchmarks/plan_one.py).

Tables (seed 0): `--table-set report` (default) as in the planner-timeout report (fastplan.models.report_tables:
dims 4-16, rows 2-1000), `scale` as in issue 13 (fastplan.models.scale_tables: dims 4-128, rows 10-1e7
log-uniform). Ranks: `--local-world-size` per host (default 8 when there are more than 8 ranks). Per size: fastplan's
cold and warm plan() time, the time a CLI user waits (`fastplan plan --tables SPEC --out FILE`, process
start to exit), each baseline's time up to its table cap and time cap, peak RSS of every planning
process, and each plan's max-rank perf scored with TorchRec's own estimators.

    python benchmarks/plan_time.py --sizes 20 50 100 500 1000 --world-sizes 8 16
    python benchmarks/plan_time.py --sizes 20000 --world-sizes 256 --torchrec-max 0 --dp-max 0 --score-max 0
    python benchmarks/plan_time.py --table-set scale --sizes 1000 --world-sizes 1024 --torchrec-max 0 --dp-max 0
    python benchmarks/plan_time.py --table-set scale --pairs 1000:1024 2000:512 20000:256 --torchrec-max 0 --dp-max 0
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

CHILD = Path(__file__).resolve().with_name("plan_one.py")
BASELINES = {"torchrec": "TorchRec default", "dp": "TorchRec DP"}


@dataclass
class Run:
    """One planner on one instance. `status` is "ok", "skipped (cap N tables)", "timeout > N s" or "failed (...)"."""

    status: str = "ok"
    seconds: Optional[float] = None  # plan() wall time; fastplan: median over --repeats fresh processes
    peak_rss_mb: Optional[float] = None  # peak RSS of the planning process (max over repeats)
    perf: Optional[float] = None  # max-rank perf, TorchRec's estimators


@dataclass
class Row:
    tables: int
    ranks: int
    fastplan: Run
    torchrec: Run
    dp: Run
    warm_ms: Optional[float] = None
    cli_seconds: Optional[float] = None
    cli_status: str = "ok"
    lower_bound: Optional[float] = None  # the bound fastplan's report prints (LP or cheap)
    cheap_bound: Optional[float] = None  # total work / ranks, largest unavoidable shard
    lp_bound: Optional[float] = None  # the LP relaxation's (None: not solved in 120 s)
    lp_seconds: Optional[float] = None  # time it took
    lp_in_plan: Optional[bool] = None  # plan() computed it (else the benchmark did, untimed)
    model_perf: Optional[float] = None  # fastplan's max-rank perf on its own cost model
    rss_before_plan_mb: Optional[float] = None  # fastplan process after imports and model, before plan()
    deterministic: Optional[bool] = None  # the same fastplan plan in every repeat
    plans: Dict[str, dict] = field(default_factory=dict, repr=False)
    table_set: str = "report"


# ---- processes ----------------------------------------------------------------------------------
@dataclass
class Exit:
    status: str
    wall_s: float
    peak_rss_mb: float


def run_process(cmd: List[str], timeout_s: float, log_path: Path) -> Exit:
    """Run `cmd`, kill it at `timeout_s`, and read its own peak RSS from wait4 (not its siblings')."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(fastplan_root()), os.environ.get("PYTHONPATH")])))
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        exited = False
        try:
            pidfd = os.pidfd_open(proc.pid)
            try:
                exited = bool(select.select([pidfd], [], [], timeout_s)[0])
            finally:
                os.close(pidfd)
        finally:  # also on Ctrl-C: no child outlives the benchmark
            if not exited:
                proc.kill()  # not reaped yet, so the pid is still this child's
            _, wait_status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(wait_status)
    if code == 0:
        status = "ok"
    elif not exited:
        status = f"timeout > {timeout_s:g} s"
    else:  # a signal we did not send is most often the OOM killer's
        status = f"failed (signal {-code})" if code < 0 else f"failed (exit {code})"
    if status.startswith("failed"):
        tail = log_path.read_text(errors="replace")[-2000:]
        print(f"plan_time: {' '.join(map(str, cmd))} {status}:\n{tail}", file=sys.stderr)
    return Exit(status, wall, usage.ru_maxrss / 1024)


def fastplan_root() -> Path:
    """The directory holding the `fastplan` package this benchmark imports; children import the same one."""
    return Path(importlib.util.find_spec("fastplan").origin).parent.parent


def local_world_size(world: int, given: Optional[int]) -> int:
    """Ranks per host: `given`, else 8 per host past 8 ranks (TorchRec names devices cuda:<rank % local size>)."""
    return given if given else min(world, 8)


def plan_in_process(planner: str, spec: Path, world: int, timeout_s: float, work: Path,
                    local: Optional[int] = None, lp_after: bool = True) -> Tuple[Run, Optional[dict]]:
    out = work / f"{planner}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(CHILD), planner, str(spec), str(world), str(out), "--local-world-size", str(local_world_size(world, local))]
    cmd += [] if lp_after else ["--no-lp-after"]
    done = run_process(cmd, timeout_s, work / "child.log")
    if done.status != "ok":
        return Run(status=done.status, peak_rss_mb=done.peak_rss_mb), None
    result = json.loads(out.read_text())
    return Run(seconds=result["seconds"], peak_rss_mb=done.peak_rss_mb), result


def time_cli(spec: Path, world: int, timeout_s: float, work: Path, local: Optional[int] = None) -> Exit:
    """What a CLI user waits for: `fastplan plan` from process start to exit, with an empty cache."""
    plan_file = work / "cli_plan.pt"
    plan_file.unlink(missing_ok=True)
    cache_dir = tempfile.mkdtemp(dir=work)
    cmd = [sys.executable, "-m", "fastplan.cli", "plan", "--tables", str(spec), "--world-size", str(world),
           "--local-world-size", str(local_world_size(world, local)), "--out", str(plan_file), "--cache-dir", cache_dir]
    done = run_process(cmd, timeout_s, work / "cli.log")
    if done.status == "ok" and not plan_file.is_file():
        done.status = "failed (no plan written)"
    return done


def write_spec(tables: int, path: Path, table_set: str = "report") -> None:
    """A table set's random tables as a `fastplan plan --tables` spec (JSON)."""
    from fastplan.models import TABLE_SETS

    rows = [
        {"name": t.name, "num_embeddings": t.num_embeddings, "embedding_dim": t.embedding_dim, "feature_names": t.feature_names}
        for t in TABLE_SETS[table_set](tables, seed=0)
    ]
    path.write_text(json.dumps({"tables": rows}))


# ---- scoring ------------------------------------------------------------------------------------
def torchrec_perf(tables: int, world: int, plans: Dict[str, dict], full: bool = False, local: Optional[int] = None,
                  table_set: str = "report") -> Dict[str, float]:
    """Max over ranks of each plan's summed shard Perf.total, as TorchRec's EmbeddingEnumerator estimates it.

    Only the (sharding type, kernel) pairs some plan uses are enumerated (constraints): an option's
    estimate does not depend on the other options, so the scores equal a full enumeration's (`full=True`,
    checked in tests) at a fraction of its time."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner.constants import BATCH_SIZE
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.types import ParameterConstraints, Topology

    from fastplan.models import TABLE_SETS, ebc

    configs = TABLE_SETS[table_set](tables, seed=0)
    constraints = None
    if not full:
        used = {t.name: (set(), set()) for t in configs}
        for plan in plans.values():
            for module_plan in plan.values():
                for name, ps in module_plan.items():
                    used[name][0].add(ps["sharding_type"])
                    used[name][1].add(ps["compute_kernel"])
        constraints = {n: ParameterConstraints(sharding_types=sorted(s), compute_kernels=sorted(k)) for n, (s, k) in used.items()}
    topology = Topology(world_size=world, local_world_size=local_world_size(world, local), compute_device="cuda")
    options = EmbeddingEnumerator(topology, batch_size=BATCH_SIZE, constraints=constraints).enumerate(
        ebc(configs), [EmbeddingBagCollectionSharder()]
    )
    by_key = {(so.path, so.name, so.sharding_type, so.compute_kernel): so for so in options}
    scores = {}
    for planner, plan in plans.items():
        loads = [0.0] * world
        placed = 0
        for path, module_plan in plan.items():
            for name, ps in module_plan.items():
                so = by_key.get((path, name, ps["sharding_type"], ps["compute_kernel"]))
                if so is None:
                    raise ValueError(f"{planner}: table {name}: TorchRec has no option {ps['sharding_type']}/{ps['compute_kernel']}")
                if ps["offsets"] is not None and ps["offsets"] != [list(s.offset) for s in so.shards]:
                    raise ValueError(f"{planner}: table {name}: shard layout differs from TorchRec's")
                if len(ps["ranks"]) != len(so.shards):
                    raise ValueError(f"{planner}: table {name}: {len(ps['ranks'])} ranks for {len(so.shards)} shards")
                for shard, rank in zip(so.shards, ps["ranks"]):
                    loads[rank] += shard.perf.total
                placed += 1
        if placed != len(configs):
            raise ValueError(f"{planner}: plan places {placed} of {len(configs)} tables")
        scores[planner] = max(loads)
    return scores


# ---- one instance -------------------------------------------------------------------------------
def measure(tables: int, world: int, args, work: Path, progress=print, table_set: Optional[str] = None) -> Row:
    table_set = table_set or args.table_set
    spec = work / f"tables_{table_set}_{tables}.json"
    write_spec(tables, spec, table_set)
    local = args.local_world_size
    row = Row(tables, world, Run(), Run(), Run(), table_set=table_set)

    progress(f"{tables} tables / {world} ranks: fastplan x{args.repeats}")
    results = []
    for _ in range(args.repeats):
        run, result = plan_in_process("fastplan", spec, world, args.fastplan_timeout, work, local, tables <= args.lp_max)
        if result is None:
            row.fastplan = run
            break
        results.append((run, result))
    if len(results) == args.repeats:
        first = results[0][1]
        row.fastplan = Run(seconds=statistics.median(r.seconds for r, _ in results),
                           peak_rss_mb=max(r.peak_rss_mb for r, _ in results))
        row.warm_ms = statistics.median(res["warm_seconds"] for _, res in results) * 1000
        row.lower_bound, row.rss_before_plan_mb = first["lower_bound"], first["rss_before_plan_mb"]
        for key in ("cheap_bound", "lp_bound", "lp_seconds", "lp_in_plan", "model_perf"):
            setattr(row, key, first[key])
        row.deterministic = all(res["plan"] == first["plan"] for _, res in results)
        row.plans["fastplan"] = first["plan"]
    if tables <= args.cli_max:
        clis = [time_cli(spec, world, args.fastplan_timeout, work, local) for _ in range(args.repeats)]
        failed = [c.status for c in clis if c.status != "ok"]
        row.cli_status = failed[0] if failed else "ok"
        row.cli_seconds = None if failed else statistics.median(c.wall_s for c in clis)
    else:
        row.cli_status = "skipped"

    for planner, cap, timeout in (("torchrec", args.torchrec_max, args.torchrec_timeout), ("dp", args.dp_max, args.dp_timeout)):
        if tables > cap:
            setattr(row, planner, Run(status=f"skipped (cap {cap} tables)"))
            continue
        progress(f"{tables} tables / {world} ranks: {BASELINES[planner]} (time cap {timeout:g} s)")
        run, result = plan_in_process(planner, spec, world, timeout, work, local)
        setattr(row, planner, run)
        if result is not None:
            row.plans[planner] = result["plan"]

    if row.plans and tables <= args.score_max:
        progress(f"{tables} tables / {world} ranks: scoring {len(row.plans)} plan(s) with TorchRec's estimators")
        try:
            for planner, perf in torchrec_perf(tables, world, row.plans, local=local, table_set=table_set).items():
                getattr(row, planner).perf = perf
        except ValueError as e:  # keep the timings of a long run; say which plan could not be scored
            progress(f"{tables} tables / {world} ranks: not scored: {e}")
    return row


# ---- output -------------------------------------------------------------------------------------
def _f(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(a: Optional[float], b: Optional[float], fmt: str) -> str:
    return "-" if a is None or not b else format(a / b, fmt)


# (group, [(title, width)]); a group whose planner has no plan prints its status across the group.
GROUPS = [
    ("", [("tables", 6), ("ranks", 5)]),
    ("fastplan", [("cold s", 8), ("warm ms", 8), ("CLI s", 8), ("RSS MB", 7), ("perf/LB", 8), ("gap%cheap", 9),
                  ("gap%LP", 7), ("LP s", 6)]),
    (BASELINES["torchrec"], [("time s", 8), ("speedup", 8), ("perf/fast", 9), ("RSS MB", 7)]),
    (BASELINES["dp"], [("time s", 8), ("speedup", 8), ("perf/fast", 9), ("RSS MB", 7)]),
]
SEP = " | "


def _group_width(cols) -> int:
    return sum(w for _, w in cols) + len(cols) - 1


def _line(groups: List[List[str]]) -> str:
    out = []
    for (_, cols), cells in zip(GROUPS, groups):
        if len(cells) == 1 and len(cols) > 1:  # a status across the whole group
            out.append(cells[0][: _group_width(cols)].ljust(_group_width(cols)))
        else:
            out.append(" ".join(c.rjust(w) for c, (_, w) in zip(cells, cols)))
    return SEP.join(out)


def header() -> str:
    names = SEP.join(f" {g} ".center(_group_width(cols), "-") if g else " " * _group_width(cols) for g, cols in GROUPS)
    return names + "\n" + _line([[t for t, _ in cols] for _, cols in GROUPS])


def format_row(r: Row) -> str:
    f = r.fastplan
    if f.status == "ok":
        cli = _f(r.cli_seconds, ".2f") if r.cli_status == "ok" else r.cli_status.split(" ")[0]
        fast = [_f(f.seconds, ".3f"), _f(r.warm_ms, ".1f"), cli, _f(f.peak_rss_mb, ".0f"), _ratio(f.perf, r.lower_bound, ".5f"),
                _gap(r.model_perf, r.cheap_bound), _gap(r.model_perf, r.lp_bound),
                _f(r.lp_seconds, ".2f") + ("" if r.lp_in_plan or r.lp_seconds is None else "*")]
    else:
        fast = [_status(f)]
    groups = [[str(r.tables), str(r.ranks)], fast]
    for planner in BASELINES:
        b = getattr(r, planner)
        if b.status != "ok":
            groups.append([_status(b)])
        else:
            groups.append([_f(b.seconds, ".1f"), _speedup(b.seconds, f.seconds), _ratio(b.perf, f.perf, ".5f"),
                           _f(b.peak_rss_mb, ".0f")])
    return _line(groups)


def _gap(perf: Optional[float], bound: Optional[float]) -> str:
    return "-" if perf is None or bound is None or not perf else f"{100 * (perf - bound) / perf:.3f}"


def _speedup(theirs: Optional[float], ours: Optional[float]) -> str:
    if theirs is None or not ours:
        return "-"
    return f"{theirs / ours:.{1 if theirs / ours < 100 else 0}f}x"


def _status(run: Run) -> str:
    return run.status + (f", RSS {run.peak_rss_mb:.0f} MB" if run.status.startswith("timeout") else "")


def _span(values: List[float]) -> str:
    low, high = f"{min(values):.0f}", f"{max(values):.0f}"
    return low if low == high else f"{low}-{high}"


def _sets(rows: List[Row], default: str) -> str:
    used = sorted({r.table_set for r in rows}) or [default]
    if len(used) == 1:
        return f"the '{used[0]}' set"
    return "; ".join(f"the '{ts}' set for " + ", ".join(f"{r.tables}/{r.ranks}" for r in rows if r.table_set == ts) for ts in used)


def legend(rows: List[Row], repeats: int, table_set: str = "report", local: Optional[int] = None) -> str:
    before = [r.rss_before_plan_mb for r in rows if r.rss_before_plan_mb is not None]
    per_host = sorted({local_world_size(r.ranks, local) for r in rows})
    lines = [
        f"tables (seed 0): {_sets(rows, table_set)}; ranks per host: {', '.join(map(str, per_host))}",
        f"cold: fastplan's first plan() in a fresh process, empty cache (median of {repeats}); warm: plan() again, cache hit",
        "CLI: `fastplan plan --tables SPEC --world-size N --out FILE`, process start to exit, empty cache",
        "RSS: peak resident memory of the planning process (interpreter, imports, model, planning)"
        + (f"; fastplan's process holds {_span(before)} MB just before plan()" if before else ""),
        "speedup: baseline time / fastplan cold; perf/fast: baseline max-rank perf / fastplan's (TorchRec's "
        "estimators, > 1 is worse than fastplan); perf/LB: fastplan's max-rank perf / the bound its report prints",
        "gap%cheap, gap%LP: (max-rank perf - bound) / max-rank perf on fastplan's cost model, against the cheap bound "
        "(total work / ranks, largest unavoidable shard) and the LP relaxation (fastplan.planner.bound); LP s: its "
        "time inside plan(), * where plan() skipped it (plan within 0.5% of the cheap bound) and it was solved after",
    ]
    unstable = [f"{r.tables}/{r.ranks}" for r in rows if r.deterministic is False]
    if unstable:
        lines.append(f"WARNING: fastplan's plan differed between repeats for {', '.join(unstable)}")
    return "\n".join(lines)


def plot(rows: List[Row], path: str) -> None:
    """Left: planning time vs tables. Right: each planner's max-rank perf / fastplan's lower bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (times, quality) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"fastplan": "o-", "cli": "o:", "torchrec": "s--", "dp": "^-."}
    fill = {"fastplan": "full", "cli": "none", "torchrec": "none", "dp": "full"}  # DP's plan often equals the default's
    names = {"fastplan": "fastplan cold", "cli": "fastplan CLI", **BASELINES}
    for i, world in enumerate(sorted({r.ranks for r in rows})):
        mine = sorted((r for r in rows if r.ranks == world), key=lambda r: r.tables)
        color = f"C{i}"
        for key in styles:
            if key == "cli":
                pts = [(r.tables, r.cli_seconds) for r in mine if r.cli_seconds is not None]
            else:
                pts = [(r.tables, getattr(r, key).seconds) for r in mine if getattr(r, key).seconds is not None]
            if pts:
                times.plot(*zip(*pts), styles[key], color=color, fillstyle=fill[key], label=f"{names[key]}, {world} ranks")
            if key != "cli":
                pts = [(r.tables, getattr(r, key).perf / r.lower_bound) for r in mine
                       if getattr(r, key).perf is not None and r.lower_bound]
                if pts:
                    quality.plot(*zip(*pts), styles[key], color=color, fillstyle=fill[key], label=f"{names[key]}, {world} ranks")
    times.set(yscale="log", ylabel="seconds", title="planning time")
    quality.set(ylabel="max-rank perf / fastplan's lower bound", title="plan quality (TorchRec's estimators; 1 = at the bound)")
    quality.axhline(1.0, color="grey", linewidth=0.8)
    sizes = sorted({r.tables for r in rows})
    for ax in (times, quality):
        ax.set(xscale="log", xlabel="tables")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


# ---- command line -------------------------------------------------------------------------------
def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _pair(text: str) -> Tuple[Optional[str], int, int]:
    """[SET:]TABLES:RANKS -> (set or None, tables, ranks)."""
    from fastplan.models import TABLE_SETS

    *table_set, counts = text.split(":", text.count(":") - 1) if text.count(":") > 1 else [text]
    if table_set and table_set[0] not in TABLE_SETS:
        raise argparse.ArgumentTypeError(f"unknown table set {table_set[0]!r} in {text!r} (known: {', '.join(TABLE_SETS)})")
    try:
        tables, ranks = (int(v) for v in counts.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected [SET:]TABLES:RANKS, e.g. 1000:1024 or scale:1000:1024, got {text!r}") from None
    if tables <= 0 or ranks <= 0:
        raise argparse.ArgumentTypeError(f"table and rank counts must be positive, got {text!r}")
    return (table_set[0] if table_set else None), tables, ranks


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The benchmark's options (also `fastplan bench`'s)."""
    ap.add_argument("--sizes", type=_positive(int), nargs="+", metavar="N", default=[20, 50, 100, 500, 1000], help="table counts")
    ap.add_argument("--world-sizes", type=_positive(int), nargs="+", metavar="N", default=[8, 16], help="ranks")
    ap.add_argument("--pairs", type=_pair, nargs="+", metavar="[SET:]TABLES:RANKS",
                    help="instances to run instead of every size x world size")
    ap.add_argument("--lp-max", type=int, default=20_000,
                    help="largest table count whose LP bound is solved (untimed, up to 120 s) after a plan() that skipped it")
    ap.add_argument("--cli-max", type=int, default=20_000, help="largest table count the CLI is timed for")
    ap.add_argument("--local-world-size", type=_positive(int), metavar="N", help="ranks per host (default: 8, or all ranks if fewer)")
    ap.add_argument("--table-set", choices=["report", "scale"], default="report",
                    help="report: dims 4-16, rows 2-1000; scale: issue 13's dims 4-128, rows 10-1e7")
    ap.add_argument("--torchrec-max", type=int, default=200, help="largest table count TorchRec's default planner runs for (0: never)")
    ap.add_argument("--dp-max", type=int, default=1000, help="largest table count TorchRec with DynamicProgrammingProposer runs for")
    ap.add_argument("--torchrec-timeout", type=_positive(float), default=600, help="seconds before a TorchRec default process (imports included) is killed")
    ap.add_argument("--dp-timeout", type=_positive(float), default=600, help="seconds before a TorchRec DP process is killed")
    ap.add_argument("--fastplan-timeout", type=_positive(float), default=600, help="seconds before a fastplan or CLI process is killed")
    ap.add_argument("--repeats", type=_positive(int), default=3, help="fresh fastplan processes (and CLI runs) per size; medians")
    ap.add_argument("--score-max", type=int, default=5000, help="largest table count whose plans are scored with TorchRec's estimators")
    ap.add_argument("--plot", default="plan_time.png", help="PNG: time and quality panels ('' for none)")
    ap.add_argument("--json", help="also write the rows as JSON")


def execute(args, out=sys.stdout) -> List[Row]:
    rows = []
    progress = lambda msg: print(f"plan_time: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    print(header(), file=out, flush=True)
    with tempfile.TemporaryDirectory(prefix="plan_time_") as work:
        pairs = args.pairs or [(None, tables, world) for world in args.world_sizes for tables in args.sizes]
        for table_set, tables, world in pairs:
            row = measure(tables, world, args, Path(work), progress, table_set)
            rows.append(row)
            print(format_row(row), file=out, flush=True)
    print(legend(rows, args.repeats, args.table_set, args.local_world_size), file=out)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}", file=out)
    if args.json:
        data = [{k: v for k, v in asdict(r).items() if k != "plans"} for r in rows]
        Path(args.json).write_text(json.dumps(data, indent=1))
        print(f"wrote {args.json}", file=out)
    return rows


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    execute(ap.parse_args(argv))


if __name__ == "__main__":
    main()
