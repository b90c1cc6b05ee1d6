"""Plans from the LP relaxation: each table takes the option the LP gives it most of, and shards are
packed best-fit under a target makespan, bisected down towards the LP's optimum.

Where the perf-driven greedy spreads load evenly and so leaves no rank empty enough for a large
shard that comes later, best fit fills the fullest ranks (and hosts) that still take a shard under
the target, keeping room for the large ones. Spread options go first (they bind whole hosts), then
shards largest first. A table whose LP option no longer fits takes its least-work option that does.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np

from fastplan.planner.assignment import Assignment
from fastplan.planner.candidates import Candidates
from fastplan.planner.placement import RankState
from fastplan.planner.search_space import DEVICE, HOST_DEVICE, HOST_UNIFORM, UNIFORM, SearchSpace

PHASE = {UNIFORM: 0, HOST_UNIFORM: 1, HOST_DEVICE: 2, DEVICE: 3}  # packing order by placement kind


def lp_choice(space: SearchSpace, options: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per table the option with the largest LP value (the earliest listed on ties)."""
    table = space.opt_table[options]
    order = np.lexsort((np.arange(len(options)), -x, table))
    first = np.r_[True, table[order][1:] != table[order][:-1]]
    choice = np.full(len(space.tables), -1, np.int64)
    choice[table[order][first]] = options[order][first]
    return choice


def packing_order(space: SearchSpace, cands: Candidates, choice: np.ndarray) -> List[int]:
    phase = np.vectorize(PHASE.get)(space.opt_placement[choice])
    return np.lexsort((np.arange(len(choice)), -cands.max_shard[choice], phase)).tolist()


def pack(space: SearchSpace, cands: Candidates, cap: np.ndarray, choice: np.ndarray, order: List[int],
         target: float) -> Optional[Assignment]:
    """Every table placed with no rank above `target`, or None."""
    st = RankState(space, cap)
    option = np.full(len(space.tables), -1, np.int64)
    ranks: List[np.ndarray] = [np.zeros(0, np.int64)] * len(space.tables)
    for t in order:
        first = int(choice[t])
        for o in [first] + [o for o in cands.by_table[t].tolist() if o != first]:
            r = _best_fit(st, o, target)
            if r is not None:
                break
        else:
            return None
        st.add(o, r)
        option[t], ranks[t] = o, r
    return Assignment(option, ranks)


def pack_below(space: SearchSpace, cands: Candidates, cap: np.ndarray, choice: np.ndarray, low: float,
               high: float, steps: int) -> Optional[Assignment]:
    """The packing under the lowest target found by bisecting (low, high) `steps` times (None if
    none fits below `high`)."""
    order = packing_order(space, cands, choice)
    best = None
    for _ in range(steps):
        mid = 0.5 * (low + high)
        found = pack(space, cands, cap, choice, order, mid)
        if found is None:
            low = mid
        else:
            best, high = found, mid
    return best


def _best_fit(st: RankState, o: int, target: float) -> Optional[np.ndarray]:
    """Ranks for option o's shards with none above `target`: each on the fullest rank (or host)
    that takes it, or None."""
    s = st.space
    p, mem = s.perf_of(o), s.mem_of(o)
    kind = st.placement[o]
    if kind == UNIFORM:
        r = np.arange(len(p))
        return r if (mem <= st.free[r]).all() and (st.loads[r] + p <= target).all() else None
    if kind == DEVICE:
        return _fit_shards(p, mem, st.loads, st.free, target)
    G, H = s.host_size, s.num_hosts
    if H == 0:
        return None
    if kind == HOST_UNIFORM:
        free = st.free[: H * G].reshape(H, G, 3)
        peak = (st.loads[: H * G].reshape(H, G) + p).max(1)
        ok = (free >= mem[None]).all(axis=(1, 2)) & (peak <= target)
        if not ok.any():
            return None
        g = int(np.argmax(np.where(ok, peak, -np.inf)))
        return np.arange(g * G, g * G + G)
    assert kind == HOST_DEVICE
    best, best_peak = None, -np.inf
    for g in range(H):  # hosts are few (world / host size)
        host = slice(g * G, g * G + G)
        r = _fit_shards(p, mem, st.loads[host], st.free[host], target)
        if r is not None and float((st.loads[host][r] + p).max()) > best_peak:
            best, best_peak = r + g * G, float((st.loads[host][r] + p).max())
    return best


def _fit_shards(p: np.ndarray, mem: np.ndarray, loads: np.ndarray, free: np.ndarray, target: float) -> Optional[np.ndarray]:
    loads, free = loads.copy(), free.copy()
    out = np.empty(len(p), np.int64)
    for i in range(len(p)):
        ok = (free >= mem[i]).all(1) & (loads + p[i] <= target)
        if not ok.any():
            return None
        j = int(np.argmax(np.where(ok, loads, -np.inf)))
        loads[j] += p[i]
        free[j] -= mem[i]
        out[i] = j
    return out
