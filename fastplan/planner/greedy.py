"""Constructive placement: a perf-driven greedy and a memory-first greedy for tight memory."""

from __future__ import annotations

from typing import List, Optional

import numpy as np

from fastplan.planner.assignment import Assignment
from fastplan.planner.candidates import Candidates
from fastplan.planner.placement import RankState
from fastplan.planner.search_space import UNIFORM, SearchSpace


def perf_greedy(space: SearchSpace, cands: Candidates, cap: np.ndarray) -> Optional[Assignment]:
    """Largest tables first; each takes the option and ranks that keep the projected makespan
    (max of the highest rank and the average over ranks) lowest, then the least total work.
    None when some table no longer fits (tight memory: see `memory_greedy`)."""
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
        if best is None:
            return None
        _, o, r = best
        state.add(o, r)
        assigned += work[o]
        option[t] = o
        ranks[t] = r
    return Assignment(option, ranks)


def least_work_greedy(space: SearchSpace, cands: Candidates, cap: np.ndarray) -> Optional[Assignment]:
    """Each table its least-work option that fits (the next least where it does not), spread options
    first, then largest shard first onto the least-loaded ranks. With many tables per rank this is
    near the bound where `perf_greedy` trades work for a flat peak early on. None if a table fits nowhere."""
    least = np.array([o[0] if len(o) else -1 for o in cands.by_table])  # by_table is sorted by work
    order = np.lexsort((np.arange(len(least)), -cands.max_shard[least], space.opt_placement[least] != UNIFORM))
    return _first_that_fits(space, cap, order.tolist(), lambda t: cands.by_table[t].tolist())


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
