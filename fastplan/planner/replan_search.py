"""Re-planning search: shards of unchanged tables stay unless moving them pays, new and
changed tables are placed around them, and the bytes a placement moves are a cost of the search.

Two modes. `max_moved_bytes=None`: fewest moved bytes such that max-rank perf stays within
`max_slowdown` of a from-scratch plan. `max_moved_bytes=B`: lowest max-rank perf moving at most B
bytes (B=0 leaves every kept table exactly as it was). Both: a construction around the kept shards,
a local search with moved bytes as a cost, CP-SAT on the same columns, and the from-scratch plan as a
fallback, so a replan is never worse than planning from scratch on its own objective. Deterministic.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import numpy as np
from torchrec.distributed.types import ShardingPlan

from fastplan.planner.assignment import Assignment
from fastplan.planner.diff import Layout, TableState, shardings, table_key, transfer
from fastplan.planner.errors import InfeasiblePlanError
from fastplan.planner.search import SearchConfig, SearchResult, search
from fastplan.planner.search_space import DEVICE, HOST_DEVICE, HOST_UNIFORM, UNIFORM, SearchSpace

_EPS = 1e-9  # relative perf differences below this are float noise
_LADDER = (0.02, 0.05, 0.1)  # slowdowns mode 2 tries after `max_slowdown`
_TIERS = ("hbm", "ddr", "ssd")


@dataclass
class ReplanConfig:
    deterministic_time: float = 1.0  # CP-SAT deterministic-time units per solve (0: skip CP-SAT)
    cp_rounds: int = 4  # CP-SAT solves per polish, while each moves fewer bytes than the last
    cp_workers: int = 4  # CP-SAT subsolvers, interleaved in one thread
    cp_targets: int = 8  # single-shard destinations offered to CP-SAT per option: the least loaded ranks
    cp_tables: int = 200  # tables CP-SAT may change: those moving bytes, then the cheapest to move
    max_cp_columns: int = 40_000  # skip CP-SAT above this many columns in its model
    max_steps: int = 20_000  # local-search steps


@dataclass
class ReplanResult:
    assignment: Assignment
    loads: np.ndarray
    moved: int
    scratch: SearchResult
    scratch_moved: int
    source: str  # "replan" or "scratch" (the from-scratch plan was better on the objective)
    stats: Dict[str, float] = field(default_factory=dict)

    @property
    def makespan(self) -> float:
        return float(self.loads.max()) if len(self.loads) else 0.0


@dataclass
class Previous:
    """The previous plan seen from the new search space: each table's old layout and, where the
    new space has the same option, that option on the old ranks ("stay")."""

    layouts: List[Optional[Layout]]
    stay: List[Optional[Tuple[int, np.ndarray]]]


def map_previous(space: SearchSpace, previous: ShardingPlan, states: List[TableState]) -> Previous:
    old = shardings(previous)
    W = space.world_size
    by_table = space.options_by_table()
    layouts: List[Optional[Layout]] = []
    stay: List[Optional[Tuple[int, np.ndarray]]] = []
    for t, table in enumerate(space.tables):
        ps = old.get(table_key(table.path, table.name))
        if ps is None:
            layouts.append(None)
            stay.append(None)
            continue
        layouts.append(Layout.of(ps, states[t].rows, states[t].dim))
        ranks = np.array(ps.ranks or [], dtype=np.int64)
        match = None
        for o in by_table[t].tolist():
            if (space.opt_type[o], space.opt_kernel[o]) == (ps.sharding_type, ps.compute_kernel) and int(
                space.opt_count[o]
            ) == len(ranks) and _allowed(space, o, ranks):
                match = (o, ranks)
                break
        stay.append(match)
    return Previous(layouts, stay)


def _allowed(space: SearchSpace, o: int, ranks: np.ndarray) -> bool:
    """Whether TorchRec's partitioner could place option `o`'s shards on `ranks` (its placement kind)."""
    W, G = space.world_size, space.host_size
    if len(ranks) != int(space.opt_count[o]) or not len(ranks) or ranks.min() < 0 or ranks.max() >= W:
        return False
    kind = space.opt_placement[o]
    if kind == UNIFORM:
        return bool((ranks == np.arange(len(ranks))).all())
    if kind == DEVICE:
        return True
    host = ranks // G
    if (host != host[0]).any() or host[0] >= space.num_hosts:
        return False
    return kind == HOST_DEVICE or bool((ranks == host[0] * G + np.arange(len(ranks))).all())


def _placements(space: SearchSpace, o: int) -> List[np.ndarray]:
    """The layouts offered for a multi-shard option: uniform as TorchRec fixes it, one per host, or
    consecutive ranks (wrapping within a host, or over all ranks) from every start."""
    n, W, G = int(space.opt_count[o]), space.world_size, space.host_size
    kind = space.opt_placement[o]
    if kind == UNIFORM:
        return [np.arange(n)]
    if kind == HOST_UNIFORM:
        return [np.arange(h * G, h * G + n) for h in range(space.num_hosts)]
    if kind == HOST_DEVICE:
        return [h * G + (s + np.arange(n)) % G for h in range(space.num_hosts) for s in range(G)]
    return [(s + np.arange(n)) % W for s in range(W)]


class _Columns:
    """Every placement (option, ranks) considered per table, as dense per-rank arrays: perf load,
    memory per tier (hbm, ddr, ssd) and the bytes it moves."""

    def __init__(self, space: SearchSpace, prev: Previous, states: List[TableState], scratch: Assignment) -> None:
        W = space.world_size
        perf = space.shard_total
        self._rows: Dict[str, list] = {k: [] for k in ("table", "option", "moved", "load", "mem")}
        self.ranks: List[np.ndarray] = []
        by_table = space.options_by_table()
        for t in range(len(space.tables)):
            keep = {int(scratch.option[t])} | ({prev.stay[t][0]} if prev.stay[t] is not None else set())
            seen: set = set()
            for group in _geometry_groups(space, by_table[t]):
                o0 = group[0]
                sl0 = space.shards(o0)
                geom = np.concatenate([space.shard_offset[sl0], space.shard_size[sl0]], axis=1)
                n = len(geom)
                if prev.layouts[t] is not None:
                    carried, local = transfer(prev.layouts[t], states[t].dim, geom, W)
                else:
                    carried, local = np.zeros((n, 2), np.int64), np.zeros((n, W, 2), np.int64)
                for o in _undominated(space, group, perf, keep):
                    sl = space.shards(o)
                    if n == 1:  # every rank it may go to, at once (host kinds: ranks inside a whole host)
                        on = np.arange(W if space.opt_placement[o] in (UNIFORM, DEVICE) else space.num_hosts * space.host_size)
                        m = carried[0][None, :] - local[0][on]
                        w, opt = states[t].bytes(m[:, 0], m[:, 1])
                        eye = np.eye(W, dtype=np.int64)[on]
                        self._add(t, o, [np.array([r]) for r in on], w + opt, eye * perf[sl][0],
                                  eye[:, :, None] * space.shard_mem[sl][0])
                        seen.update((o, (int(r),)) for r in on)
                        continue
                    placements = _placements(space, o)
                    if prev.stay[t] is not None and prev.stay[t][0] == o:
                        placements.append(prev.stay[t][1])
                    if int(scratch.option[t]) == o:
                        placements.append(scratch.ranks[t])
                    for r in placements:
                        r = np.asarray(r, dtype=np.int64)
                        if (o, tuple(r.tolist())) in seen or len(r) != n:
                            continue
                        seen.add((o, tuple(r.tolist())))
                        m = carried - local[np.arange(n), r]
                        w, opt = states[t].bytes(m[:, 0], m[:, 1])
                        load, mem = np.zeros(W), np.zeros((W, 3), np.int64)
                        np.add.at(load, r, perf[sl])
                        np.add.at(mem, r, space.shard_mem[sl])
                        self._add(t, o, [r], np.array([int(w.sum() + opt.sum())]), load[None], mem[None])
        rows = self._rows
        self.table = np.concatenate(rows["table"]).astype(np.int64)
        self.option = np.concatenate(rows["option"]).astype(np.int64)
        self.moved = np.concatenate(rows["moved"]).astype(np.int64)
        self.load = np.concatenate(rows["load"]).reshape(-1, W)
        self.mem = np.concatenate(rows["mem"]).reshape(-1, W, 3).astype(np.int64)
        del self._rows
        self.work = self.load.sum(axis=1)
        self.bounds = np.searchsorted(self.table, np.arange(len(space.tables) + 1))
        self.by_table = [np.arange(self.bounds[i], self.bounds[i + 1]) for i in range(len(space.tables))]
        self.index = {(int(o), tuple(r.tolist())): c for c, (o, r) in enumerate(zip(self.option.tolist(), self.ranks))}
        # sibling[c, r]: the same single-shard option of the same table on rank r (-1: none)
        self.single = np.array([len(r) == 1 for r in self.ranks], dtype=bool)
        self.rank_of = np.array([int(r[0]) if len(r) == 1 else -1 for r in self.ranks], dtype=np.int64)
        self.sibling = np.full((len(self.option), W), -1, dtype=np.int64)
        for c in np.nonzero(self.single)[0].tolist():
            self.sibling[c] = [self.index.get((int(self.option[c]), (q,)), -1) for q in range(W)]

    def _add(self, t: int, o: int, ranks: List[np.ndarray], moved, load, mem) -> None:
        k = len(ranks)
        self.ranks.extend(ranks)
        for name, value in (("table", np.full(k, t)), ("option", np.full(k, o)), ("moved", moved), ("load", load),
                            ("mem", mem)):
            self._rows[name].append(np.asarray(value))

    def find(self, o: int, ranks: np.ndarray) -> int:
        return self.index[(int(o), tuple(int(r) for r in ranks))]


def _geometry_groups(space: SearchSpace, opts: np.ndarray) -> List[List[int]]:
    """A table's options grouped by shard geometry (same shard sizes and offsets)."""
    groups: Dict[bytes, List[int]] = {}
    for o in opts.tolist():
        sl = space.shards(o)
        key = space.shard_size[sl].tobytes() + b"|" + space.shard_offset[sl].tobytes()
        groups.setdefault(key, []).append(o)
    return list(groups.values())


def _undominated(space: SearchSpace, group: List[int], perf: np.ndarray, keep: set) -> List[int]:
    """Options of one geometry without those another beats on every shard in perf and memory of
    every tier (ties keep the earlier). Options in `keep` always stay."""
    if len(group) == 1:
        return group
    idx = np.array([np.arange(space.opt_start[o], space.opt_start[o] + space.opt_count[o]) for o in group])
    vals = np.concatenate([perf[idx][..., None], space.shard_mem[idx]], axis=-1)  # (k, n, 4)
    le = (vals[:, None] <= vals[None, :]).all(axis=(2, 3))  # le[p, o]: p no worse than o
    eq = (vals[:, None] == vals[None, :]).all(axis=(2, 3))
    k = len(group)
    earlier = np.arange(k)[:, None] < np.arange(k)[None, :]
    beats = le & (~eq | earlier)
    np.fill_diagonal(beats, False)
    return [o for i, o in enumerate(group) if not beats[:, i].any() or o in keep]


class _Placement:
    """The chosen column per table with per-rank load, free memory and total moved bytes."""

    def __init__(self, cols: _Columns, n_tables: int, cap: np.ndarray) -> None:
        self.cols = cols
        self.choice = np.full(n_tables, -1, dtype=np.int64)
        self.loads = np.zeros(cols.load.shape[1])
        self.free = cap.astype(np.int64).copy()  # (world_size, 3)
        self.moved = 0

    def copy(self) -> "_Placement":
        other = object.__new__(_Placement)
        other.cols = self.cols
        other.choice = self.choice.copy()
        other.loads = self.loads.copy()
        other.free = self.free.copy()
        other.moved = self.moved
        return other

    def set(self, t: int, c: int) -> None:
        cols, cur = self.cols, int(self.choice[t])
        if cur >= 0:
            self.loads -= cols.load[cur]
            self.free += cols.mem[cur]
            self.moved -= int(cols.moved[cur])
        self.loads += cols.load[c]
        self.free -= cols.mem[c]
        self.moved += int(cols.moved[c])
        self.choice[t] = c

    def fits(self, t: int, cand: np.ndarray) -> np.ndarray:
        """Which candidate columns of table t fit in memory (its current column freed)."""
        cols, cur = self.cols, int(self.choice[t])
        free = self.free + cols.mem[cur] if cur >= 0 else self.free
        return (cols.mem[cand] <= free).all(axis=(1, 2))

    def trial_loads(self, t: int, cand: np.ndarray) -> np.ndarray:
        base = self.loads - self.cols.load[int(self.choice[t])] if self.choice[t] >= 0 else self.loads
        return base[None, :] + self.cols.load[cand]

    def assignment(self) -> Assignment:
        return Assignment(self.cols.option[self.choice].copy(), [self.cols.ranks[c].copy() for c in self.choice.tolist()])


def _infeasible(space: SearchSpace, t: int, p: _Placement, why: str) -> InfeasiblePlanError:
    table = space.tables[t]
    free = ", ".join(f"rank {r}: " + " ".join(f"{k}={int(v)} B" for k, v in zip(_TIERS, row)) for r, row in enumerate(p.free))
    return InfeasiblePlanError(f"replan: table '{table.name}' ({table.rows}x{table.dim}, module '{table.path}') {why}\nfree per rank: {free}")


def _construct(space: SearchSpace, cols: _Columns, prev: Previous, cap: np.ndarray, target: Optional[float],
               budget: Optional[int]) -> Tuple[_Placement, List[bool]]:
    """Kept tables where they were (if they still fit), then every other table largest first on the
    column that moves least (within `target` when given), then the lowest peak."""
    n = len(space.tables)
    p = _Placement(cols, n, cap)
    pinned = [False] * n
    for t in range(n):
        if prev.stay[t] is None:
            continue
        c = cols.find(*prev.stay[t])
        if p.fits(t, np.array([c]))[0]:
            p.set(t, c)
            pinned[t] = True
    rest = [t for t in range(n) if p.choice[t] < 0]
    min_work = np.array([cols.work[cols.by_table[t]].min() for t in rest]) if rest else np.zeros(0)
    remaining = float(min_work.sum())
    W = len(p.loads)
    for i in np.argsort(-min_work, kind="stable").tolist():
        t = rest[i]
        remaining -= float(min_work[i])
        cand = cols.by_table[t]
        ok = p.fits(t, cand)
        if not ok.any():
            raise _infeasible(space, t, p, "does not fit next to the tables kept in place")
        cand = cand[ok]
        # As the from-scratch greedy: the higher of the peak and the average load all tables will make.
        projected = np.maximum(p.trial_loads(t, cand).max(axis=1), (p.loads.sum() + cols.work[cand] + remaining) / W)
        moved = cols.moved[cand]
        over = projected > target if target is not None else np.zeros(len(cand), bool)
        c = int(cand[np.lexsort((cand, cols.work[cand], projected, moved, over))[0]])
        if budget is not None and p.moved + int(cols.moved[c]) > budget:
            raise _infeasible(space, t, p, f"must move at least {int(cols.moved[c])} B, beyond max_moved_bytes={budget} "
                                           f"({p.moved} B already moved by the tables placed before it)")
        p.set(t, c)
    return p, pinned


@dataclass
class _Changes:
    """Candidate changes: table `t1` to column `c1`, and for swaps also `t2` to `c2` (-1: none);
    with the per-rank loads after each and its change in moved bytes."""

    t1: np.ndarray
    c1: np.ndarray
    t2: np.ndarray
    c2: np.ndarray
    trial: np.ndarray
    delta: np.ndarray

    def apply(self, p: "_Placement", i: int) -> None:
        p.set(int(self.t1[i]), int(self.c1[i]))
        if self.t2[i] >= 0:
            p.set(int(self.t2[i]), int(self.c2[i]))


def _neighbours(p: _Placement, top: int, free: np.ndarray, swaps: bool, anywhere: bool = False) -> Optional[_Changes]:
    """Changes that take load off rank `top`: one table to another of its columns, or (`swaps`)
    two single-shard tables swapping ranks. `anywhere`: single changes of every free table."""
    cols, loads, cur = p.cols, p.loads, p.choice
    parts = []
    on_top = np.nonzero(free & ((cols.load[cur, top] > 0) | anywhere))[0]
    if len(on_top):
        lens = cols.bounds[on_top + 1] - cols.bounds[on_top]
        owner = np.repeat(on_top, lens)
        cand = np.repeat(cols.bounds[on_top] - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
        old = cur[owner]
        ok = (cand != old) & (cols.mem[cand] <= p.free + cols.mem[old]).all(axis=(1, 2))
        owner, cand, old = owner[ok], cand[ok], old[ok]
        none = np.full(len(cand), -1)
        parts.append((owner, cand, none, none, loads - cols.load[old] + cols.load[cand], cols.moved[cand] - cols.moved[old]))
    single = cols.single[cur]
    home = cols.rank_of[cur]
    a = on_top[single[on_top]] if swaps else on_top[:0]
    b = np.nonzero(free & single & (home != top))[0]
    if len(a) and len(b):
        ca, cb, rb = cur[a][:, None], cur[b][None, :], home[b][None, :]
        na, nb = cols.sibling[ca, rb], cols.sibling[cb, top]
        pa, pb = cols.load[ca, top], cols.load[cb, rb]
        ok = (na >= 0) & (nb >= 0) & (pa > pb)
        na, nb = np.where(ok, na, 0), np.where(ok, nb, 0)
        mem = cols.mem
        ok &= (mem[na, rb] <= p.free[rb] + mem[cb, rb]).all(axis=-1)
        ok &= (mem[nb, top] <= p.free[top] + mem[ca, top]).all(axis=-1)
        i, j = np.nonzero(ok)
        if len(i):
            trial = np.repeat(loads[None, :], len(i), axis=0)
            rows = np.arange(len(i))
            trial[rows, top] += cols.load[nb[i, j], top] - pa[i, 0]
            trial[rows, rb[0, j]] += cols.load[na[i, j], rb[0, j]] - pb[0, j]
            delta = cols.moved[na[i, j]] + cols.moved[nb[i, j]] - cols.moved[ca[i, 0]] - cols.moved[cb[0, j]]
            parts.append((a[i], na[i, j], b[j], nb[i, j], trial, delta))
    if not parts:
        return None
    return _Changes(*(np.concatenate([part[k] for part in parts]) for k in range(6)))


def _cut_work(p: _Placement, limit: float, free: np.ndarray) -> None:
    """Switch tables to options with less total work (e.g. to data parallel when lookups grew),
    fewest moved bytes per unit of work saved first, until the summed load is within `limit`."""
    cols = p.cols
    ratio = np.full(len(cols.table), np.inf)

    def rate(idx: np.ndarray) -> None:
        cur = p.choice[cols.table[idx]]
        saved = cols.work[cur] - cols.work[idx]
        ok = free[cols.table[idx]] & (saved > 0)
        ratio[idx] = np.where(ok, (cols.moved[idx] - cols.moved[cur]) / np.where(ok, saved, 1), np.inf)

    rate(np.arange(len(cols.table)))
    while p.loads.sum() > limit:
        c = int(np.argmin(ratio))  # lowest index among equal ratios
        if not np.isfinite(ratio[c]):
            return
        t = int(cols.table[c])
        if p.fits(t, np.array([c]))[0]:
            p.set(t, c)
            rate(cols.by_table[t])
        else:
            ratio[c] = np.inf


def _repair(p: _Placement, target: float, free: np.ndarray, max_steps: int, rounds: int = 3) -> None:
    """Mode 1: lower the load above `target` (summed over ranks), fewest moved bytes per unit of
    excess removed first. When moving tables no longer helps, cut total work by the excess left
    (`_cut_work`) and try again."""
    limit = len(p.loads) * target
    for _ in range(rounds):
        _cut_work(p, limit, free)
        for _ in range(max_steps):
            top = int(np.argmax(p.loads))
            if p.loads[top] <= target:
                return
            excess = np.clip(p.loads - target, 0, None).sum()
            for swaps, anywhere in ((False, False), (False, True), (True, False)):  # wider only when needed
                ch = _neighbours(p, top, free, swaps, anywhere)
                if ch is None:
                    continue
                gain = excess - np.clip(ch.trial - target, 0, None).sum(axis=1)
                total = ch.trial.sum(axis=1)  # no change may undo what `_cut_work` saved
                ok = (gain > excess * _EPS) & (total <= max(limit, p.loads.sum()) * (1 + _EPS))
                if ok.any():
                    break
            else:
                break
            idx = np.nonzero(ok)[0]
            ratio = ch.delta[idx] / gain[idx]
            ch.apply(p, int(idx[np.lexsort((idx, -gain[idx], total[idx], ratio))[0]]))
        limit = min(limit, p.loads.sum()) - np.clip(p.loads - target, 0, None).sum()


def _improve(p: _Placement, budget: int, free: np.ndarray, max_steps: int) -> None:
    """Mode 2: lower (max-rank perf, ranks at it) by taking load off the top rank while the total
    moved bytes stay within `budget`."""
    for _ in range(max_steps):
        peak0, count0 = _score(p.loads)
        for swaps in (False, True):  # swaps only when no single move helps
            ch = _neighbours(p, int(np.argmax(p.loads)), free, swaps)
            if ch is None:
                continue
            peak = ch.trial.max(axis=1)
            count = (ch.trial >= peak[:, None] * (1 - _EPS)).sum(axis=1)
            # Better by more than float noise, so that no sequence of changes can cycle.
            lower = peak < peak0 * (1 - _EPS)
            same = (peak <= peak0 * (1 + _EPS)) & (count < count0)
            better = (lower | same) & (p.moved + ch.delta <= budget)
            if better.any():
                break
        else:
            return
        idx = np.nonzero(better)[0]
        ch.apply(p, int(idx[np.lexsort((idx, ch.delta[idx], count[idx], peak[idx]))[0]]))


def _trim(p: _Placement, limit: float, free: np.ndarray) -> None:
    """Move tables back toward columns that move fewer bytes while every rank stays within `limit`."""
    cols = p.cols
    changed = True
    while changed:
        changed = False
        costly = [t for t in np.nonzero(free)[0].tolist() if cols.moved[p.choice[t]] > 0]
        for t in sorted(costly, key=lambda t: (-int(cols.moved[p.choice[t]]), t)):
            cand = cols.by_table[t]
            cand = cand[(cols.moved[cand] < cols.moved[p.choice[t]]) & p.fits(t, cand)]
            if not len(cand):
                continue
            peak = p.trial_loads(t, cand).max(axis=1)
            ok = peak <= limit
            if ok.any():
                cand, peak = cand[ok], peak[ok]
                p.set(t, int(cand[np.lexsort((cand, peak, cols.moved[cand]))[0]]))
                changed = True


def _score(loads: np.ndarray) -> Tuple[float, int]:
    peak = float(loads.max())
    return peak, int(np.count_nonzero(loads >= peak * (1 - _EPS)))


def _cp_sat(p: _Placement, free: np.ndarray, cap: np.ndarray, target: float, config: ReplanConfig) -> Optional[np.ndarray]:
    """CP-SAT: the fewest moved bytes with every rank within `target`, over the tables that move
    bytes now and the cheapest to move of the rest (up to `cp_tables`), each offered its zero-move
    columns and single-shard columns on the least loaded ranks. Returns the new choice or None."""
    from ortools.sat.python import cp_model

    cols = p.cols
    W = len(p.loads)
    targets = np.zeros(W, bool)
    targets[np.argsort(p.loads, kind="stable")[: config.cp_targets]] = True
    cur_moved = cols.moved[p.choice]
    alt = np.where(cols.moved > cur_moved[cols.table], cols.moved - cur_moved[cols.table], np.iinfo(np.int64).max)
    cheapest = np.minimum.reduceat(alt, cols.bounds[:-1]) / np.maximum(cols.work[p.choice], 1e-30)
    order = np.lexsort((np.arange(len(p.choice)), cheapest))
    focus = free & (cur_moved > 0)
    focus[order[free[order] & ~focus[order]][: max(0, config.cp_tables - int(focus.sum()))]] = True
    chosen = []
    for t in range(len(p.choice)):
        cand = cols.by_table[t]
        near = ~cols.single[cand] | targets[np.maximum(cols.rank_of[cand], 0)] | (cols.moved[cand] == 0)
        # A column above the target, or moving more bytes than the whole current plan, can never be chosen.
        useful = (cols.load[cand].max(axis=1) <= target) & (cols.moved[cand] < p.moved)
        chosen.append(cand[(near & useful & focus[t]) | (cand == p.choice[t])])
    if sum(len(c) for c in chosen) > config.max_cp_columns:
        return None
    scale = 1e7 / target
    model = cp_model.CpModel()
    rows: List[List[Tuple[object, int]]] = []
    load = [[] for _ in range(W)]
    mem = [[[] for _ in range(3)] for _ in range(W)]
    hinted = [0] * W  # the current plan's load per rank in the model's units
    moved = []
    for t, cand in enumerate(chosen):
        row = []
        for c in cand.tolist():
            x = model.new_bool_var("")
            model.add_hint(x, c == p.choice[t])
            for r in np.nonzero(cols.load[c])[0].tolist():
                units = int(round(cols.load[c, r] * scale))
                load[r].append((x, units))
                hinted[r] += units if c == p.choice[t] else 0
            for r, k in zip(*np.nonzero(cols.mem[c])):
                mem[r][k].append((x, int(cols.mem[c, r, k])))
            if cols.moved[c]:
                moved.append((x, int(cols.moved[c])))
            row.append((x, c))
        model.add_exactly_one(x for x, _ in row)
        rows.append(row)
    for r in range(W):
        # Never below the hint's own rounded load: the model always has the hint as a solution (an
        # infeasible model with a hint aborts OR-Tools 9.15's interleaved search); answers are
        # checked against the exact target afterwards.
        model.add(sum(v * x for x, v in load[r]) <= max(int(math.floor(target * scale)), hinted[r]))
        for k in range(3):
            terms = mem[r][k]
            if sum(v for _, v in terms) > cap[r, k]:
                model.add(sum(v * x for x, v in terms) <= int(cap[r, k]))
    model.minimize(sum(v * x for x, v in moved))
    solver = cp_model.CpSolver()
    # A portfolio (LNS included) interleaved in one thread: deterministic, and it improves on the
    # hint where a single worker does not.
    solver.parameters.num_workers = config.cp_workers
    solver.parameters.interleave_search = True
    solver.parameters.interleave_batch_size = 1  # so the deterministic-time limit holds
    solver.parameters.random_seed = 0
    solver.parameters.max_deterministic_time = config.deterministic_time
    if solver.solve(model) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return np.array([next(c for x, c in row if solver.boolean_value(x)) for row in rows], dtype=np.int64)


def _apply(p: _Placement, choice: np.ndarray) -> _Placement:
    q = p.copy()
    for t, c in enumerate(choice.tolist()):
        if c != q.choice[t]:
            q.set(t, c)
    return q


def _polish(p: _Placement, free: np.ndarray, cap: np.ndarray, target: float, config: ReplanConfig) -> Tuple[_Placement, float]:
    """CP-SAT from `p` (fewest bytes within `target`); its answer is kept only if it moves fewer
    bytes, meets the target exactly (not just in CP-SAT's rounded units) and fits in memory."""
    if config.deterministic_time <= 0 or p.moved == 0 or not free.any():
        return p, 0.0
    start = time.perf_counter()
    for _ in range(config.cp_rounds):  # each round re-picks the tables CP-SAT may change around its last answer
        choice = _cp_sat(p, free, cap, target, config)
        if choice is None:
            break
        q = _apply(p, choice)
        if not (q.moved < p.moved and q.loads.max() <= target and (q.free >= 0).all()):
            break
        p = q
    return p, time.perf_counter() - start


def _fewest_bytes(space, cols, prev, cap, target: float, scratch_cols: np.ndarray,
                  config: ReplanConfig) -> Tuple[_Placement, np.ndarray, float]:
    """Mode 1: the fewest moved bytes with every rank within `target`."""
    p, _ = _construct(space, cols, prev, cap, target, None)
    free = np.ones(len(space.tables), bool)
    _repair(p, target, free, config.max_steps)
    if p.loads.max() > target:  # the from-scratch plan always meets the target: start from it
        p = _apply(p, scratch_cols)
    _trim(p, target, free)
    p, cp_s = _polish(p, free, cap, target, config)
    return p, free, cp_s


def replan_search(
    space: SearchSpace,
    cap: np.ndarray,
    previous: ShardingPlan,
    states: List[TableState],
    max_moved_bytes: Optional[int] = None,
    max_slowdown: float = 0.01,
    search_config: Optional[SearchConfig] = None,
    config: Optional[ReplanConfig] = None,
    deadline: Optional[float] = None,
) -> ReplanResult:
    """`cap`: (world_size, 3) bytes per rank of hbm, ddr and ssd left for embeddings. `deadline`
    (time.monotonic()) is passed to the from-scratch search only."""
    if max_moved_bytes is not None and max_moved_bytes < 0:
        raise ValueError(f"max_moved_bytes must be >= 0, got {max_moved_bytes}")
    if not (max_slowdown >= 0 and math.isfinite(max_slowdown)):
        raise ValueError(f"max_slowdown must be a finite number >= 0, got {max_slowdown}")
    config = config or ReplanConfig()
    t0 = time.perf_counter()
    scratch = search(space, cap[:, 0], cap[:, 1], search_config, deadline, ssd_cap=cap[:, 2])
    t1 = time.perf_counter()
    prev = map_previous(space, previous, states)
    cols = _Columns(space, prev, states, scratch.assignment)
    scratch_cols = np.array([cols.find(o, r) for o, r in zip(scratch.assignment.option.tolist(), scratch.assignment.ranks)],
                            dtype=np.int64)
    scratch_moved = int(cols.moved[scratch_cols].sum())
    n = len(space.tables)
    target = scratch.makespan * (1 + max_slowdown)
    if max_moved_bytes is None:
        p, free, cp_s = _fewest_bytes(space, cols, prev, cap, target, scratch_cols, config)
        _improve(p, p.moved, free, config.max_steps)  # then the best perf for those bytes
    else:
        p, pinned = _construct(space, cols, prev, cap, None, max_moved_bytes)
        # New and changed tables first (kept ones pinned), then everything within the budget.
        # Budget 0 stops there: kept tables stay exactly as they were.
        free = ~np.array(pinned)
        _improve(p, max_moved_bytes, free, config.max_steps)
        if max_moved_bytes > 0:
            free = np.ones(n, bool)
            _improve(p, max_moved_bytes, free, config.max_steps)
        cp_s = 0.0
        # The fewest-bytes plans within growing slowdowns (CP-SAT on the first only): the first that
        # fits the budget may be faster than the local search's, which stops in a local minimum.
        for slowdown in sorted({max_slowdown, *(s for s in _LADDER if s > max_slowdown)}) if max_moved_bytes else ():
            ceiling = scratch.makespan * (1 + slowdown)
            if ceiling >= float(p.loads.max()):
                break
            q, _, more = _fewest_bytes(space, cols, prev, cap, ceiling, scratch_cols,
                                       config if slowdown == max_slowdown else replace(config, deterministic_time=0.0))
            cp_s += more
            if q.moved <= max_moved_bytes:
                _improve(q, max_moved_bytes, free, config.max_steps)
                if _score(q.loads) < _score(p.loads):
                    p = q
                break
        if p.moved:  # then the fewest bytes for that perf
            _trim(p, float(p.loads.max()), free)
            p, more = _polish(p, free, cap, float(p.loads.max()), config)
            cp_s += more
    _trim(p, float(p.loads.max()), free)
    stats = {"scratch_s": t1 - t0, "replan_s": time.perf_counter() - t1, "cp_sat_s": cp_s}
    source = "replan"
    mine, theirs = (p.moved, float(p.loads.max())), (scratch_moved, scratch.makespan)
    if max_moved_bytes is None:
        use_scratch = theirs < mine
    else:
        use_scratch = max_moved_bytes > 0 and scratch_moved <= max_moved_bytes and theirs[::-1] < mine[::-1]
    if use_scratch:
        p = _apply(p, scratch_cols)
        source = "scratch"
    return ReplanResult(p.assignment(), p.loads.copy(), int(p.moved), scratch, scratch_moved, source, stats)
