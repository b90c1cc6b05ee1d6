"""Constructive placement: a perf-driven greedy and a memory-first greedy for tight memory."""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from fastplan.planner.assignment import Assignment
from fastplan.planner.candidates import Candidates
from fastplan.planner.placement import RankState
from fastplan.planner.search_space import UNIFORM, SearchSpace


def perf_greedy(space: SearchSpace, cands: Candidates, cap: np.ndarray, give_up_above: float = np.inf
                ) -> Optional[Assignment]:
    """Largest tables first; each takes the option and ranks that keep the projected makespan
    (max of the highest rank and the average over ranks) lowest, then the least total work.
    None when some table no longer fits (tight memory: see `memory_greedy`), or once the projection,
    which only grows, passes `give_up_above`."""
    W = space.world_size
    state = RankState(space, cap)
    min_work = cands.min_work
    order = np.argsort(-min_work, kind="stable")
    remaining = float(min_work.sum())
    assigned = 0.0
    option = np.full(len(space.tables), -1, dtype=np.int64)
    ranks: List[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(space.tables)
    work = cands.work.tolist()
    for t in order.tolist():
        remaining -= float(min_work[t])
        best = None
        current_max = float(state.loads.max())
        for o in cands.by_table[t].tolist():  # ascending work
            if best is not None and best[0][0] < (assigned + work[o] + remaining) / W:
                break  # this and every later option projects above the best found
            placed = state.place(o)
            if placed is None:
                continue
            r, peak = placed
            new_max = max(current_max, peak)
            key = (max(new_max, (assigned + work[o] + remaining) / W), work[o], new_max)
            if best is None or key < best[0]:
                best = (key, o, r)
        if best is None or best[0][0] > give_up_above:
            return None
        _, o, r = best
        state.add(o, r)
        assigned += work[o]
        option[t] = o
        ranks[t] = r
    return Assignment(option, ranks)


FILLS = (0.99, 0.95, 0.8)  # shares of every tier's total capacity the priced options may take, in turn


def least_work_greedy(space: SearchSpace, cands: Candidates, cap: np.ndarray) -> Optional[Assignment]:
    """Each table its least-work option that fits (the next least where it does not), spread options
    first, then largest shard first onto the least-loaded ranks. With many tables per rank this is
    near the bound where `perf_greedy` trades work for a flat peak early on. None if a table fits nowhere."""
    if any(len(o) == 0 for o in cands.by_table):
        return None
    least = np.array([o[0] for o in cands.by_table])  # by_table is sorted by work
    return _cheapest_first(space, cands, cap, least, lambda t: cands.by_table[t].tolist())


def priced_greedy(space: SearchSpace, cands: Candidates, cap: np.ndarray) -> Optional[Assignment]:
    """For memory too small for every table's least-work option: `least_work_greedy` with options
    priced by work + λ x footprint, λ the least that brings the options chosen under `FILLS` of every
    tier's total capacity (the next share when packing fails). None when the least-work options fit,
    or no share packs."""
    if any(len(o) == 0 for o in cands.by_table):
        return None
    priced = _PricedOptions(cands, cap)
    if not priced.overfull(0.0, 1.0):
        return None
    tried = set()
    for fill in FILLS:
        price = priced.price_to_fit(fill)
        if price is None or price in tried:
            continue
        tried.add(price)
        cost, cheapest = priced.choose(price)
        a = _cheapest_first(space, cands, cap, priced.options[cheapest], lambda t: priced.ranked(t, cost))
        if a is not None:
            return a
    return None


def _cheapest_first(space: SearchSpace, cands: Candidates, cap: np.ndarray, chosen: np.ndarray, options_of
                    ) -> Optional[Assignment]:
    """Tables with spread `chosen` options first, then by largest shard, each placed with the first of
    `options_of(table)` that fits."""
    order = np.lexsort((np.arange(len(chosen)), -cands.max_shard[chosen], space.opt_placement[chosen] != UNIFORM))
    return _first_that_fits(space, cap, order.tolist(), options_of)


class _PricedOptions:
    """Every table's candidate options in one flat array, to choose per table by work + price x footprint."""

    def __init__(self, cands: Candidates, cap: np.ndarray) -> None:
        self.counts = np.array([len(o) for o in cands.by_table], dtype=np.int64)
        self.options = np.concatenate(cands.by_table) if len(self.counts) else np.zeros(0, np.int64)
        self.table = np.repeat(np.arange(len(self.counts)), self.counts)
        self.first = np.cumsum(self.counts) - self.counts
        self.work = cands.work[self.options]
        self.mem = cands.option_mem()[self.options]
        self.total = cap.sum(0)
        self.footprint = cands.footprint(cap)[self.options]

    def choose(self, price: float) -> Tuple[np.ndarray, np.ndarray]:
        """(priced cost of every flat option, the flat index of each table's cheapest: lowest work,
        then option index, on ties; by_table lists are sorted that way)."""
        cost = self.work + price * self.footprint
        at_min = np.flatnonzero(cost == np.minimum.reduceat(cost, self.first)[self.table])
        return cost, at_min[np.flatnonzero(np.diff(self.table[at_min], prepend=-1))]

    def overfull(self, price: float, fill: float) -> bool:
        return bool((self.mem[self.choose(price)[1]].sum(0) > fill * self.total).any())

    def price_to_fit(self, fill: float) -> Optional[float]:
        """The least price (to 1e-6 relative) whose choice fits in `fill` of every tier; 0 when the
        least-work options do; None when even the smallest-footprint ones do not."""
        if not self.overfull(0.0, fill):
            return 0.0
        hi = 1.0
        while self.overfull(hi, fill):
            hi *= 2
            if hi > 1e30:
                return None
        lo = 0.0
        while hi - lo > 1e-6 * hi:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.overfull(mid, fill) else (lo, mid)
        return hi

    def ranked(self, table: int, cost: np.ndarray) -> List[int]:
        """The table's options by priced cost, then work, then index."""
        span = slice(int(self.first[table]), int(self.first[table] + self.counts[table]))
        return self.options[span][np.lexsort((self.work[span], cost[span]))].tolist()


def memory_greedy(space: SearchSpace, cands: Candidates, cap: np.ndarray) -> Optional[Assignment]:
    """Bin packing first: tables by their smallest memory footprint, largest first; each takes
    its smallest-footprint option that fits (least work on ties), shards placed best-fit. Perf is
    left to local search. None when even this packing fails."""
    footprint = cands.footprint(cap)
    smallest = np.array([footprint[o].min() if len(o) else 0.0 for o in cands.by_table])

    def by_footprint(t: int) -> List[int]:
        opts = cands.by_table[t]
        return opts[np.lexsort((cands.work[opts], footprint[opts]))].tolist()

    return _first_that_fits(space, cap, np.argsort(-smallest, kind="stable").tolist(), by_footprint, by_memory=True)


def _first_that_fits(space: SearchSpace, cap: np.ndarray, tables: List[int], options_of, by_memory: bool = False
                     ) -> Optional[Assignment]:
    """Tables in the given order, each placed with the first of `options_of(table)` that fits; None
    when one fits nowhere."""
    state = RankState(space, cap)
    option = np.full(len(space.tables), -1, dtype=np.int64)
    ranks: List[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(space.tables)
    for t in tables:
        for o in options_of(t):
            placed = state.place(o, by_memory=by_memory)
            if placed is not None:
                state.add(o, placed[0])
                option[t], ranks[t] = o, placed[0]
                break
        else:
            return None
    return Assignment(option, ranks)
