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
    ranks = [RankStats(r, 0.0, 0, 0, int(hbm_cap[r]), int(ddr_cap[r])) for r in range(W)]
    total = space.shard_total
    for o, rs in zip(result.assignment.option.tolist(), result.assignment.ranks):
        sl = space.shards(o)
        short = _SHORT.get(str(space.opt_type[o]), str(space.opt_type[o]))
        for r, p, h, d in zip(rs.tolist(), total[sl].tolist(), space.shard_hbm[sl].tolist(), space.shard_ddr[sl].tolist()):
            st = ranks[r]
            st.perf += p
            st.hbm += h
            st.ddr += d
            st.shards[short] = st.shards.get(short, 0) + 1
        for r in set(rs.tolist()):
            ranks[r].tables += 1
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


def _gap(makespan: float, bound: float) -> float:
    return 0.0 if makespan <= 0 else max(0.0, (makespan - bound) / makespan)
