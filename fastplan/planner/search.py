"""Choose one option and ranks per table: greedy placement, local search, then (for problems of at
most `SearchConfig.max_cells` tables x ranks) CP-SAT refinement in batches of tables.

Objective, as TorchRec's `NoopPerfModel`: the largest per-rank sum of shard `Perf.total`.
Everything here is deterministic: stable orderings, lowest-index tie breaks, and CP-SAT on one
worker with a deterministic-time limit, so every rank computes the same plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from fastplan.planner.errors import InfeasiblePlanError
from fastplan.planner.search_space import HOST, UNIFORM, SearchSpace


@dataclass
class Assignment:
    """The chosen option of every table and the rank of each of its shards."""

    option: np.ndarray  # per table
    ranks: List[np.ndarray]  # per table, one rank per shard


@dataclass
class SearchResult:
    assignment: Assignment
    loads: np.ndarray  # per-rank summed Perf.total
    greedy_makespan: float
    lower_bound: float
    stats: Dict[str, float] = field(default_factory=dict)

    @property
    def makespan(self) -> float:
        return float(self.loads.max()) if len(self.loads) else 0.0

    @property
    def gap(self) -> float:
        """Relative distance to the lower bound (0 means proven optimal)."""
        m = self.makespan
        return 0.0 if m <= 0 else max(0.0, (m - self.lower_bound) / m)


@dataclass
class SearchConfig:
    batch_size: int = 400  # tables per CP-SAT model
    deterministic_time: float = 0.3  # CP-SAT deterministic-time units for the whole plan (0: skip)
    target_gap: float = 1e-4  # skip refinement once this close to the lower bound
    max_cells: int = 2_000  # refine with CP-SAT only when tables x ranks is at most this


class _Candidates:
    """Per-table option lists without dominated options (another option of the same shape that is
    no slower and no larger on every shard; ties keep the earlier option)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        total = space.shard_total
        self.perf = total
        starts = space.opt_start
        nonempty = len(total) > 0
        self.work = np.add.reduceat(total, starts) if nonempty else np.zeros(0)
        self.max_shard = np.maximum.reduceat(total, starts) if nonempty else np.zeros(0)
        self.placement = space.opt_placement
        self.dominated = self._dominated()
        keep = np.nonzero(~self.dominated)[0]
        order = keep[np.lexsort((keep, self.work[keep], space.opt_table[keep]))]
        bounds = np.searchsorted(space.opt_table[order], np.arange(len(space.tables) + 1))
        self.by_table = [order[bounds[i] : bounds[i + 1]] for i in range(len(space.tables))]

    def _dominated(self) -> np.ndarray:
        s = self.space
        n = len(s.opt_table)
        count = s.opt_count
        # Options are comparable when their shards line up: same table, shard count and geometry.
        single = count == 1
        shape = np.where(single, "single", s.opt_type.astype(str))
        keys = np.array([f"{t}|{c}|{g}" for t, c, g in zip(s.opt_table.tolist(), count.tolist(), shape.tolist())])
        order = np.lexsort((np.arange(n), self.work, keys))
        ks = keys[order]
        first, second = [], []
        i = 0
        while i < n:  # groups hold at most a few kernels x sharding types
            j = i
            while j < n and ks[j] == ks[i]:
                j += 1
            for a in range(i, j):
                for b in range(a + 1, j):
                    first.append(order[a])
                    second.append(order[b])
            i = j
        dominated = np.zeros(n, dtype=bool)
        if not first:
            return dominated
        k = np.array(first)
        o = np.array(second)
        c = count[o]
        local = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        ik = np.repeat(s.opt_start[k], c) + local
        io = np.repeat(s.opt_start[o], c) + local
        ok = (self.perf[ik] <= self.perf[io]) & (s.shard_hbm[ik] <= s.shard_hbm[io]) & (s.shard_ddr[ik] <= s.shard_ddr[io])
        pair_ok = np.logical_and.reduceat(ok, np.cumsum(c) - c)
        dominated[o[pair_ok]] = True
        return dominated


def lower_bound(cands: _Candidates, world_size: int) -> float:
    """LP relaxation of the placement problem without memory limits: work spread evenly,
    but never below the largest unavoidable single shard."""
    if not cands.by_table:
        return 0.0
    min_work = np.array([cands.work[o].min() for o in cands.by_table])
    min_shard = np.array([cands.max_shard[o].min() for o in cands.by_table])
    return float(max(min_work.sum() / world_size, min_shard.max()))


class _State:
    """Per-rank load and free memory while placing."""

    def __init__(self, space: SearchSpace, hbm_cap: np.ndarray, ddr_cap: np.ndarray) -> None:
        self.space = space
        self.loads = np.zeros(space.world_size)
        self.hbm = hbm_cap.astype(np.int64).copy()
        self.ddr = ddr_cap.astype(np.int64).copy()

    def place(self, o: int, perf: np.ndarray, placement: int) -> Optional[Tuple[np.ndarray, float]]:
        """Least-loaded feasible ranks for option `o`'s shards and the highest load they reach,
        or None if the shards do not fit."""
        s = self.space
        sl = s.shards(o)
        p, h, d = perf[sl], s.shard_hbm[sl], s.shard_ddr[sl]
        n = len(p)
        if n == 1:
            fits = (self.hbm >= h[0]) & (self.ddr >= d[0])
            masked = np.where(fits, self.loads, np.inf)
            r = int(np.argmin(masked))
            return (np.array([r]), float(masked[r] + p[0])) if fits[r] else None
        if placement == UNIFORM:
            if np.any(h > self.hbm[:n]) or np.any(d > self.ddr[:n]):
                return None
            return np.arange(n), float((self.loads[:n] + p).max())
        if placement == HOST:
            groups = s.world_size // n
            W = groups * n
            fits = ((self.hbm[:W] >= np.tile(h, groups)) & (self.ddr[:W] >= np.tile(d, groups))).reshape(groups, n).all(1)
            peak = np.where(fits, (self.loads[:W] + np.tile(p, groups)).reshape(groups, n).max(1), np.inf)
            g = int(np.argmin(peak))
            return (np.arange(g * n, g * n + n), float(peak[g])) if fits[g] else None
        return self._spread(p, h, d)

    def _spread(self, p, h, d) -> Optional[Tuple[np.ndarray, float]]:
        """Several shards, each on the least-loaded rank where it fits (as TorchRec's greedy does)."""
        loads, hbm, ddr = self.loads.copy(), self.hbm.copy(), self.ddr.copy()
        out = np.empty(len(p), dtype=np.int64)
        for i in range(len(p)):
            fits = (hbm >= h[i]) & (ddr >= d[i])
            if not fits.any():
                return None
            j = int(np.argmin(np.where(fits, loads, np.inf)))
            loads[j] += p[i]
            hbm[j] -= h[i]
            ddr[j] -= d[i]
            out[i] = j
        return out, float(loads[out].max())

    def commit(self, o: int, ranks: np.ndarray, perf: np.ndarray) -> None:
        sl = self.space.shards(o)
        np.add.at(self.loads, ranks, perf[sl])
        np.subtract.at(self.hbm, ranks, self.space.shard_hbm[sl])
        np.subtract.at(self.ddr, ranks, self.space.shard_ddr[sl])


def _infeasible(space: SearchSpace, cands: _Candidates, table: int, state: _State) -> InfeasiblePlanError:
    t = space.tables[table]
    lines = []
    for o in cands.by_table[table].tolist():
        sl = space.shards(o)
        lines.append(
            f"  {space.opt_type[o]}/{space.opt_kernel[o]}: {int(space.opt_count[o])} shard(s), "
            f"largest needs hbm={int(space.shard_hbm[sl].max())} B, ddr={int(space.shard_ddr[sl].max())} B"
        )
    free = ", ".join(f"rank {r}: hbm={int(h)} B ddr={int(d)} B" for r, (h, d) in enumerate(zip(state.hbm, state.ddr)))
    return InfeasiblePlanError(
        f"table '{t.name}' ({t.rows}x{t.dim}, module '{t.path}') does not fit in memory after "
        f"storage reservation and the tables placed before it.\n"
        + "\n".join(lines)
        + f"\nfree per rank: {free}"
    )


def greedy(space: SearchSpace, cands: _Candidates, hbm_cap: np.ndarray, ddr_cap: np.ndarray) -> Assignment:
    """Largest tables first; each takes the option and ranks that keep the projected makespan
    (max of the highest rank and the average over ranks) lowest, then the least total work."""
    W = space.world_size
    state = _State(space, hbm_cap, ddr_cap)
    min_work = np.array([cands.work[o].min() for o in cands.by_table])
    order = np.argsort(-min_work, kind="stable")
    remaining = float(min_work.sum())
    assigned = 0.0
    option = np.full(len(space.tables), -1, dtype=np.int64)
    ranks: List[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(space.tables)
    placement = cands.placement.tolist()
    work = cands.work.tolist()
    for t in order.tolist():
        remaining -= float(min_work[t])
        best = None
        current_max = float(state.loads.max())
        for o in cands.by_table[t].tolist():  # ascending work
            if best is not None and best[0][0] < (assigned + work[o] + remaining) / W:
                break  # this and every later option projects above the best found
            placed = state.place(o, cands.perf, placement[o])
            if placed is None:
                continue
            r, peak = placed
            new_max = max(current_max, peak)
            key = (max(new_max, (assigned + work[o] + remaining) / W), work[o], new_max)
            if best is None or key < best[0]:
                best = (key, o, r)
        if best is None:
            raise _infeasible(space, cands, t, state)
        _, o, r = best
        state.commit(o, r, cands.perf)
        assigned += work[o]
        option[t] = o
        ranks[t] = r
    return Assignment(option, ranks)


def _score(loads: np.ndarray) -> Tuple[float, int]:
    """Makespan, then how many ranks sit at it: lowering the count eventually lowers the makespan."""
    peak = float(loads.max())
    return peak, int(np.count_nonzero(loads >= peak * (1 - 1e-12)))


def local_search(space: SearchSpace, cands: _Candidates, a: Assignment, hbm_cap: np.ndarray,
                 ddr_cap: np.ndarray, max_steps: int = 20_000) -> Tuple[Assignment, np.ndarray]:
    """Improve the makespan by moving or swapping single-shard tables and by switching tables
    between a single-shard option and a spread-over-all-ranks option (e.g. table-wise and
    data-parallel). Each step takes the best move of each kind and applies it if it lowers the score."""
    W = space.world_size
    perf, hbm, ddr = cands.perf, space.shard_hbm, space.shard_ddr
    option, ranks = a.option.copy(), [r.copy() for r in a.ranks]
    loads = rank_loads(space, perf, a)
    used_h, used_d = rank_memory(space, a)
    free_h, free_d = hbm_cap.astype(np.int64) - used_h, ddr_cap.astype(np.int64) - used_d
    n_tables = len(space.tables)
    # Each table's cheapest single-shard option and cheapest all-ranks option (-1: none).
    best_single = np.full(n_tables, -1)
    best_uniform = np.full(n_tables, -1)
    for t, opts in enumerate(cands.by_table):
        for o in opts.tolist():  # sorted by work
            if space.opt_count[o] == 1 and best_single[t] < 0:
                best_single[t] = o
            if cands.placement[o] == UNIFORM and space.opt_count[o] == W and best_uniform[t] < 0:
                best_uniform[t] = o

    def apply(t: int, o: int, r: np.ndarray) -> None:
        old = space.shards(int(option[t]))
        np.subtract.at(loads, ranks[t], perf[old])
        np.add.at(free_h, ranks[t], hbm[old])
        np.add.at(free_d, ranks[t], ddr[old])
        new = space.shards(o)
        np.add.at(loads, r, perf[new])
        np.subtract.at(free_h, r, hbm[new])
        np.subtract.at(free_d, r, ddr[new])
        option[t] = o
        ranks[t] = r

    def uniform_rows(opts: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = space.opt_start[opts][:, None] + np.arange(W)[None, :]
        return perf[idx], hbm[idx], ddr[idx]

    for _ in range(max_steps):
        score = _score(loads)
        peak = score[0]
        top = int(np.argmax(loads))
        count = space.opt_count[option]
        single = np.nonzero(count == 1)[0]
        rank_of = np.array([int(ranks[t][0]) for t in single.tolist()], dtype=np.int64)
        s_idx = space.opt_start[option[single]]
        p, h, d = perf[s_idx], hbm[s_idx], ddr[s_idx]
        on_top = np.nonzero(rank_of == top)[0]
        candidates = []  # (score, kind, payload)
        if len(on_top):
            # Move a table from `top` to rank r.
            pi = p[on_top][:, None]
            fits = (h[on_top][:, None] <= free_h[None, :]) & (d[on_top][:, None] <= free_d[None, :])
            fits[:, top] = False
            pair = np.where(fits, np.maximum(peak - pi, loads[None, :] + pi), np.inf)
            i, r = np.unravel_index(int(np.argmin(pair)), pair.shape)
            if np.isfinite(pair[i, r]):
                candidates.append(("move", [(single[on_top[i]], int(r))]))
            # Swap a table on `top` with a smaller one elsewhere.
            others = np.nonzero(rank_of != top)[0]
            if len(others):
                delta = p[on_top][:, None] - p[others][None, :]
                ro = rank_of[others]
                dh = h[on_top][:, None] - h[others][None, :]
                dd = d[on_top][:, None] - d[others][None, :]
                ok = (delta > 0) & (dh <= free_h[ro][None, :]) & (dd <= free_d[ro][None, :]) & (-dh <= free_h[top]) & (-dd <= free_d[top])
                pair = np.where(ok, np.maximum(peak - delta, loads[ro][None, :] + delta), np.inf)
                i, j = np.unravel_index(int(np.argmin(pair)), pair.shape)
                if np.isfinite(pair[i, j]):
                    a_t, b_t = single[on_top[i]], single[others[j]]
                    candidates.append(("swap", [(a_t, int(rank_of[others[j]])), (b_t, top)]))
            # Spread a table on `top` over all ranks.
            spread = single[on_top][best_uniform[single[on_top]] >= 0]
            if len(spread):
                up, uh, ud = uniform_rows(best_uniform[spread])
                cur = space.opt_start[option[spread]]
                new = loads[None, :] + up
                new[:, top] -= perf[cur]
                fh = free_h[None, :] - uh
                fh[:, top] += hbm[cur]
                fd = free_d[None, :] - ud
                fd[:, top] += ddr[cur]
                peaks = np.where((fh >= 0).all(1) & (fd >= 0).all(1), new.max(1), np.inf)
                k = int(np.argmin(peaks))
                if np.isfinite(peaks[k]):
                    candidates.append(("spread", [(int(spread[k]), -1)]))
        # Gather a spread table onto the least-loaded rank as a single shard.
        gather = np.nonzero((count == W) & (cands.placement[option] == UNIFORM) & (best_single >= 0))[0]
        if len(gather):
            up, uh, ud = uniform_rows(option[gather])
            sp = space.opt_start[best_single[gather]]
            base = loads[None, :] - up
            dest = np.argmin(base, axis=1)
            rows = np.arange(len(gather))
            new = base.copy()
            new[rows, dest] += perf[sp]
            ok = (free_h[dest] + uh[rows, dest] >= hbm[sp]) & (free_d[dest] + ud[rows, dest] >= ddr[sp])
            peaks = np.where(ok, new.max(1), np.inf)
            k = int(np.argmin(peaks))
            if np.isfinite(peaks[k]):
                candidates.append(("gather", [(int(gather[k]), int(dest[k]))]))
        best = None
        for kind, moves in candidates:
            trial = loads.copy()
            for t, dest in moves:
                o = int(best_uniform[t]) if kind == "spread" else int(best_single[t]) if kind == "gather" else int(option[t])
                r = np.arange(W) if kind == "spread" else np.array([dest])
                np.subtract.at(trial, ranks[t], perf[space.shards(int(option[t]))])
                np.add.at(trial, r, perf[space.shards(o)])
            sc = _score(trial)
            if sc < score and (best is None or sc < best[0]):
                best = (sc, kind, moves)
        if best is None:
            break
        _, kind, moves = best
        for t, dest in moves:
            if kind == "spread":
                apply(t, int(best_uniform[t]), np.arange(W))
            elif kind == "gather":
                apply(t, int(best_single[t]), np.array([dest]))
            else:
                apply(t, int(option[t]), np.array([dest]))
    return Assignment(option, ranks), rank_loads(space, perf, Assignment(option, ranks))


def rank_memory(space: SearchSpace, a: Assignment) -> Tuple[np.ndarray, np.ndarray]:
    """Per-rank (hbm, ddr) bytes the assignment's shards take."""
    hbm = np.zeros(space.world_size, dtype=np.int64)
    ddr = np.zeros(space.world_size, dtype=np.int64)
    for o, r in zip(a.option.tolist(), a.ranks):
        np.add.at(hbm, r, space.shard_hbm[space.shards(o)])
        np.add.at(ddr, r, space.shard_ddr[space.shards(o)])
    return hbm, ddr


def rank_loads(space: SearchSpace, perf: np.ndarray, a: Assignment) -> np.ndarray:
    loads = np.zeros(space.world_size)
    for o, r in zip(a.option.tolist(), a.ranks):
        np.add.at(loads, r, perf[space.shards(o)])
    return loads


def search(
    space: SearchSpace,
    hbm_cap: np.ndarray,
    ddr_cap: np.ndarray,
    config: Optional[SearchConfig] = None,
    wall_time_limit: Optional[float] = None,
) -> SearchResult:
    """Greedy placement refined by CP-SAT over batches of tables (others' loads carried as fixed)."""
    config = config or SearchConfig()
    cands = _Candidates(space)
    t0 = time.perf_counter()
    a = greedy(space, cands, hbm_cap, ddr_cap)
    greedy_makespan = float(rank_loads(space, cands.perf, a).max()) if len(space.tables) else 0.0
    a, loads = local_search(space, cands, a, hbm_cap, ddr_cap)
    t1 = time.perf_counter()
    lb = lower_bound(cands, space.world_size)
    stats = {"greedy_s": t1 - t0, "refine_s": 0.0, "batches": 0, "improved_batches": 0}
    makespan = float(loads.max()) if len(loads) else 0.0
    if makespan > 0 and (makespan - lb) / makespan > config.target_gap and 0 < len(space.tables) * space.world_size <= config.max_cells:
        from fastplan.planner.refine import refine  # OR-Tools loads only when refinement runs

        a, loads, rstats = refine(space, cands, a, hbm_cap, ddr_cap, lb, config, wall_time_limit)
        stats.update(rstats)
        stats["refine_s"] = time.perf_counter() - t1
    return SearchResult(a, loads, greedy_makespan, lb, stats)
