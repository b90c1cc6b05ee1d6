"""Improve a complete, memory-feasible assignment by small moves that lower the busiest rank.

Movable units are the shards of table-wise / column-wise options (any rank) and of
table-column-wise options (any rank of their host). Each step takes the best of: move a unit off
the busiest rank, swap it with a smaller unit elsewhere, gather a spread table (row-wise,
data-parallel) onto one rank (tried when no move or swap helps); when none helps, re-place one
of the tables on the busiest rank with its best option. A step is taken only if it lowers (makespan, ranks at the makespan).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from fastplan.planner.assignment import Assignment, rank_loads
from fastplan.planner.candidates import Candidates
from fastplan.planner.placement import RankState
from fastplan.planner.search_space import DEVICE, HOST_DEVICE, UNIFORM, SearchSpace

REINSERT_TABLES = 8  # tables on the busiest rank re-placed when no move or swap helps
SWAP_PAIRS = 100_000  # swaps scored per step at most (beyond: partners from the least-loaded ranks)
SWAP_SHORTLIST = 64  # best-scored swaps whose memory is checked first
GATHER_CELLS = 1 << 20  # tables x ranks scored at once when gathering spread tables


def score(loads: np.ndarray) -> Tuple[float, int]:
    """Makespan, then how many ranks sit at it: lowering the count eventually lowers the makespan."""
    peak = float(loads.max())
    return peak, int(np.count_nonzero(loads >= peak * (1 - 1e-12)))


class _Units:
    """The movable shards of an assignment as arrays."""

    def __init__(self, space: SearchSpace, kind: np.ndarray, a: Assignment) -> None:
        table, index, lo, hi = [], [], [], []
        G = space.host_size
        for t, (o, r) in enumerate(zip(a.option.tolist(), a.ranks)):
            if kind[o] == DEVICE:
                bounds = (0, space.world_size)
            elif kind[o] == HOST_DEVICE:
                host = int(r[0]) // G
                bounds = (host * G, host * G + G)
            else:
                continue
            for i in range(len(r)):
                table.append(t)
                index.append(i)
                lo.append(bounds[0])
                hi.append(bounds[1])
        self.table = np.array(table, dtype=np.int64)
        self.index = np.array(index, dtype=np.int64)
        self.lo = np.array(lo, dtype=np.int64)
        self.hi = np.array(hi, dtype=np.int64)
        tables = sorted(set(table))
        self.perf = np.concatenate([space.perf_of(int(a.option[t])) for t in tables]) if tables else np.zeros(0)
        self.mem = np.concatenate([space.mem_of(int(a.option[t])) for t in tables]) if tables else np.zeros((0, 3), np.int64)
        self.rank = np.array([int(a.ranks[t][i]) for t, i in zip(table, index)], dtype=np.int64)


def local_search(space: SearchSpace, cands: Candidates, a: Assignment, cap: np.ndarray,
                 max_steps: int = 20_000) -> Tuple[Assignment, np.ndarray]:
    W = space.world_size
    kind = cands.placement
    a = a.copy()
    st = RankState.holding(space, cap, a)
    loads, free = st.loads, st.free
    best_single = np.full(len(space.tables), -1)
    for t, opts in enumerate(cands.by_table):
        single = opts[(space.opt_count[opts] == 1) & (kind[opts] == DEVICE)]
        if len(single):
            best_single[t] = single[0]  # sorted by work
    units = _Units(space, kind, a)

    def trial(changes: List[Tuple[int, int, np.ndarray]]) -> Tuple[float, int]:
        """Score after re-placing tables: (table, option, ranks)."""
        t_loads = loads.copy()
        for t, o, r in changes:
            np.subtract.at(t_loads, a.ranks[t], space.perf_of(int(a.option[t])))
            np.add.at(t_loads, r, space.perf_of(o))
        return score(t_loads)

    def apply(t: int, o: int, r: np.ndarray) -> None:
        st.remove(int(a.option[t]), a.ranks[t])
        st.add(o, r)
        a.option[t] = o
        a.ranks[t] = r

    for _ in range(max_steps):
        current = score(loads)
        peak = current[0]
        top = int(np.argmax(loads))
        candidates: List[List[Tuple[int, int, np.ndarray]]] = []
        on_top = np.nonzero(units.rank == top)[0]
        if len(on_top):
            p, m = units.perf[on_top], units.mem[on_top]
            ranks = np.arange(W)[None, :]
            ok = (units.lo[on_top][:, None] <= ranks) & (ranks < units.hi[on_top][:, None]) & (ranks != top)
            ok &= (m[:, None, :] <= free[None, :, :]).all(2)
            pair = np.where(ok, np.maximum(peak - p[:, None], loads[None, :] + p[:, None]), np.inf)
            i, r = np.unravel_index(int(np.argmin(pair)), pair.shape)
            if np.isfinite(pair[i, r]):
                candidates.append([_moved(a, units, on_top[i], int(r))])
            others = np.nonzero(units.rank != top)[0]
            if len(others) * len(on_top) > SWAP_PAIRS:  # partners on the least-loaded ranks only
                order = np.argsort(loads, kind="stable")
                per_rank = np.bincount(units.rank[others], minlength=W)[order]
                kept = np.zeros(W, dtype=bool)
                kept[order[: int(np.searchsorted(np.cumsum(per_rank), SWAP_PAIRS // len(on_top))) + 1]] = True
                others = others[kept[units.rank[others]]]
            if len(others):
                ro = units.rank[others]
                delta = p[:, None] - units.perf[others][None, :]
                ok = (delta > 0) & (units.lo[on_top][:, None] <= ro[None, :]) & (ro[None, :] < units.hi[on_top][:, None])
                ok &= (units.lo[others][None, :] <= top) & (top < units.hi[others][None, :])
                pair = np.where(ok, np.maximum(peak - delta, loads[ro][None, :] + delta), np.inf)
                i, j = _best_fitting_swap(pair, m, units.mem[others], free[ro], free[top])
                if i >= 0:
                    a_u, b_u = on_top[i], others[j]
                    if units.table[a_u] == units.table[b_u]:
                        candidates.append([_swapped(a, units, a_u, b_u)])
                    else:
                        candidates.append([_moved(a, units, a_u, int(units.rank[b_u])), _moved(a, units, b_u, top)])
        best = _best(candidates, trial, current)
        if best is None:
            gather = _gather(space, a, kind, best_single, loads, free)
            best = _best([[gather]] if gather is not None else [], trial, current)
        if best is None:
            best = _best(_reinsertions(space, cands, a, st, top), trial, current)
        if best is None:
            break
        rebuild = False
        for t, o, r in best:
            rebuild |= o != int(a.option[t]) or kind[o] == UNIFORM
            apply(t, o, r)
        if rebuild:
            units = _Units(space, kind, a)
        else:
            for t, _, r in best:
                sel = np.nonzero(units.table == t)[0]
                units.rank[sel] = r[units.index[sel]]
    return a, rank_loads(space, a)


def _best_fitting_swap(pair: np.ndarray, mem_top: np.ndarray, mem_other: np.ndarray, free_other: np.ndarray,
                       free_top: np.ndarray) -> Tuple[int, int]:
    """The lowest finite entry of `pair` (lowest index on ties) whose swap fits in memory both ways:
    (row, column), or (-1, -1). Memory is checked for the best entries first, more only if none of
    those fits."""
    flat = pair.ravel()
    finite = np.flatnonzero(np.isfinite(flat))
    if not len(finite):
        return -1, -1
    values = flat[finite]
    size = SWAP_SHORTLIST
    while True:  # shortlists growing 16x: every entry up to the size-th lowest value (ties included)
        cells = finite if size >= len(finite) else finite[values <= np.partition(values, size - 1)[size - 1]]
        i, j = np.divmod(cells, pair.shape[1])
        dm = mem_top[i] - mem_other[j]
        fits = np.flatnonzero((dm <= free_other[j]).all(1) & (-dm <= free_top).all(1))
        if len(fits):
            best = cells[fits]
            k = best[np.lexsort((best, flat[best]))[0]]
            return int(k // pair.shape[1]), int(k % pair.shape[1])
        if size >= len(finite):
            break
        size *= 16
    return -1, -1


def _best(candidates, trial, current):
    best, best_score = None, current
    for changes in candidates:
        sc = trial(changes)
        if sc < best_score:
            best, best_score = changes, sc
    return best


def _moved(a: Assignment, units: _Units, u: int, dest: int) -> Tuple[int, int, np.ndarray]:
    t = int(units.table[u])
    r = a.ranks[t].copy()
    r[units.index[u]] = dest
    return t, int(a.option[t]), r


def _swapped(a: Assignment, units: _Units, u: int, v: int) -> Tuple[int, int, np.ndarray]:
    t = int(units.table[u])
    r = a.ranks[t].copy()
    r[units.index[u]], r[units.index[v]] = r[units.index[v]], r[units.index[u]]
    return t, int(a.option[t]), r


def _gather(space, a, kind, best_single, loads, free) -> Optional[Tuple[int, int, np.ndarray]]:
    """The spread table (row-wise / data-parallel) whose move onto one rank lowers the peak most."""
    W = space.world_size
    opts = a.option
    gather = np.nonzero((kind[opts] == UNIFORM) & (space.opt_count[opts] == W) & (best_single >= 0))[0]
    if not len(gather) or W == 1:
        return None
    best = (np.inf, -1, -1)
    for chunk in np.array_split(gather, -(-len(gather) * W // GATHER_CELLS)):  # bounded (tables x ranks) arrays
        up, um = space.expand_full(opts[chunk], space.run_total), space.expand_full(opts[chunk], space.run_mem)
        sp = space.opt_run[best_single[chunk]]  # single shard: one run
        base = loads[None, :] - up
        fits = (free[None, :, :] + um >= space.run_mem[sp][:, None, :]).all(2)
        dest = np.argmin(np.where(fits, base, np.inf), axis=1)
        rows = np.arange(len(chunk))
        base[rows, dest] += space.run_total[sp]
        peaks = np.where(fits[rows, dest], base.max(1), np.inf)
        k = int(np.argmin(peaks))
        if peaks[k] < best[0]:
            best = (float(peaks[k]), int(chunk[k]), int(dest[k]))
    if not np.isfinite(best[0]):
        return None
    return best[1], int(best_single[best[1]]), np.array([best[2]])


def _reinsertions(space, cands, a, st: RankState, top: int) -> List[List[Tuple[int, int, np.ndarray]]]:
    """For the tables with the most work on the busiest rank: their best re-placement."""
    on_top = []
    for t, (o, r) in enumerate(zip(a.option.tolist(), a.ranks)):
        here = space.perf_of(o)[r == top].sum()
        if here > 0:
            on_top.append((-here, t))
    out = []
    for _, t in sorted(on_top)[:REINSERT_TABLES]:
        o_cur, r_cur = int(a.option[t]), a.ranks[t]
        st.remove(o_cur, r_cur)
        rest = float(st.loads.max())
        best = None
        for o in cands.by_table[t].tolist():
            placed = st.place(o)
            if placed is not None:
                key = (max(rest, placed[1]), float(cands.work[o]))
                if best is None or key < best[0]:
                    best = (key, o, placed[0])
        st.add(o_cur, r_cur)
        if best is not None and (best[1], best[2].tolist()) != (o_cur, r_cur.tolist()):
            out.append([(t, best[1], best[2])])
    return out
