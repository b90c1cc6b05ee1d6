"""A per-rank summary of a plan: perf, memory, sharding types and tables, plus search quality."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from fastplan.planner.bound import CHEAP, Bound
from fastplan.planner.search import SearchResult
from fastplan.planner.search_space import SearchSpace

_SHORT = {
    "data_parallel": "DP",
    "table_wise": "TW",
    "column_wise": "CW",
    "table_column_wise": "TWCW",
    "row_wise": "RW",
    "table_row_wise": "TWRW",
}


@dataclass
class RankStats:
    rank: int
    perf: float
    hbm: int
    ddr: int
    hbm_cap: int
    ddr_cap: int
    shards: Dict[str, int] = field(default_factory=dict)
    tables: int = 0


@dataclass
class PlanReport:
    """What a plan does to each rank and how close it is to the lower bound."""

    ranks: List[RankStats]
    num_tables: int
    planning_seconds: float
    makespan: float
    lower_bound: float
    gap: float
    greedy_makespan: float
    source: str = "planned"  # "planned" or "cache"
    bound: str = CHEAP  # which bound `lower_bound` is: "LP" (the LP relaxation) or "cheap"
    cheap_bound: Optional[float] = None
    bound_note: str = ""  # why the LP bound is not the one printed, or how long it took
    bound_seconds: float = 0.0  # spent on the LP bound (part of planning_seconds)
    # A replan (`FastShardingPlanner.replan`) also records what planning from scratch would give.
    moved_bytes: Optional[int] = None
    scratch_makespan: Optional[float] = None
    scratch_moved_bytes: Optional[int] = None

    def table(self) -> str:
        gb = 1024**3
        lines = [
            f"fastplan: {self.num_tables} tables on {len(self.ranks)} ranks, planned in "
            f"{self.planning_seconds * 1000:.1f} ms ({self.source})",
            f"max-rank perf {self.makespan:.6f} ms, {self.bound} lower bound {self.lower_bound:.6f} ms, "
            f"gap {self.gap * 100:.3f}% (greedy {self.greedy_makespan:.6f} ms)"
            + (f"; {self.bound_note}" if self.bound_note else ""),
            f"{'rank':>4} {'perf (ms)':>12} {'HBM (GB)':>18} {'DDR (GB)':>18} {'tables':>6}  shards",
        ]
        for r in self.ranks:
            shards = " ".join(f"{k}:{v}" for k, v in sorted(r.shards.items()))
            lines.append(
                f"{r.rank:>4} {r.perf:>12.6f} {r.hbm / gb:>8.3f}/{r.hbm_cap / gb:<9.1f} "
                f"{r.ddr / gb:>8.3f}/{r.ddr_cap / gb:<9.1f} {r.tables:>6}  {shards}"
            )
        return "\n".join(lines)


def build_report(
    space: SearchSpace,
    result: SearchResult,
    hbm_cap: np.ndarray,
    ddr_cap: np.ndarray,
    planning_seconds: float,
    bound: Optional[Bound] = None,
) -> PlanReport:
    """`bound`: the lower bound to print (default: the search's cheap bound)."""
    W = space.world_size
    a = result.assignment
    opts = a.option.tolist()
    at = np.concatenate(a.ranks) if opts else np.zeros(0, np.int64)
    # bincount adds shard by shard in table order, as the search adds them (bytes: exact below 2**53)
    perf = np.bincount(at, space.expand_options(a.option, space.run_total), minlength=W)
    mem = np.stack([np.bincount(at, m, minlength=W) for m in space.expand_options(a.option, space.run_mem).T], 1)
    mem = mem.astype(np.int64)
    names = sorted(set(space.opt_type[a.option].tolist()))
    shards = [len(r) for r in a.ranks]
    kind = np.repeat(np.searchsorted(names, space.opt_type[a.option].astype(str)), shards)
    by_kind = np.bincount(at * len(names) + kind, minlength=W * len(names)).reshape(W, len(names))
    table = np.repeat(np.arange(len(opts)), shards)
    tables = _tables_per_rank(table, at, len(opts), W)
    short = [_SHORT.get(n, n) for n in names]
    ranks = [
        RankStats(r, p, h, d, int(hc), int(dc), {short[k]: c for k, c in enumerate(row) if c}, t)
        for r, (p, (h, d, _), hc, dc, row, t) in enumerate(zip(perf.tolist(), mem.tolist(), hbm_cap.tolist(), ddr_cap.tolist(),
                                                                 by_kind.tolist(), tables.tolist()))
    ]
    return PlanReport(
        ranks=ranks,
        num_tables=len(space.tables),
        planning_seconds=planning_seconds,
        makespan=result.makespan,
        lower_bound=result.lower_bound if bound is None else bound.value,
        gap=result.gap if bound is None else _gap(result.makespan, bound.value),
        greedy_makespan=result.greedy_makespan,
        bound=CHEAP if bound is None else bound.kind,
        cheap_bound=result.lower_bound,
        bound_note="" if bound is None else bound.note(),
        bound_seconds=0.0 if bound is None else bound.seconds,
    )


def _tables_per_rank(table: np.ndarray, at: np.ndarray, n_tables: int, W: int) -> np.ndarray:
    """Per rank, how many tables have shards there (`table`, sorted, and `at`: each shard's table and rank;
    a table's shards may share a rank). Marks (table, rank) cells in blocks of tables, which is faster
    than sorting the cells when tables have hundreds of shards."""
    out = np.zeros(W, np.int64)
    block = max(1, (1 << 24) // W)
    for first in range(0, n_tables, block):
        lo, hi = np.searchsorted(table, [first, first + block])
        cells = np.zeros((min(block, n_tables - first), W), dtype=bool)
        cells[table[lo:hi] - first, at[lo:hi]] = True
        out += np.count_nonzero(cells, axis=0)
    return out


def _gap(makespan: float, bound: float) -> float:
    return 0.0 if makespan <= 0 else max(0.0, (makespan - bound) / makespan)
