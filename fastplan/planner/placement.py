"""Per-rank load and free memory, and where an option's shards can go next: the placement
primitives every search stage shares (greedy, local search, repair).

Memory is a matrix: one row per shard or rank, one column per tier (hbm, ddr, ssd).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from fastplan.planner.assignment import Assignment, rank_loads, rank_memory
from fastplan.planner.search_space import DEVICE, HOST_DEVICE, HOST_UNIFORM, UNIFORM, SearchSpace

Placed = Tuple[np.ndarray, float]  # (rank of each shard, highest load among the ranks it touches)


def capacity(hbm_cap: np.ndarray, ddr_cap: np.ndarray, ssd_cap: Optional[np.ndarray] = None) -> np.ndarray:
    """(world_size, 3) bytes per rank and tier; no SSD tier unless given."""
    ssd = np.zeros_like(hbm_cap) if ssd_cap is None else ssd_cap
    return np.stack([hbm_cap, ddr_cap, ssd], axis=1).astype(np.int64)


class RankState:
    """Loads and free memory of every rank while shards are placed and removed."""

    def __init__(self, space: SearchSpace, cap: np.ndarray) -> None:
        self.space = space
        self.placement = space.opt_placement
        self.cap = cap
        self.loads = np.zeros(space.world_size)
        self.free = cap.copy()
        self._scale: Optional[np.ndarray] = None

    @classmethod
    def holding(cls, space: SearchSpace, cap: np.ndarray, a: Assignment) -> "RankState":
        """The state with every table of `a` placed."""
        state = cls(space, cap)
        state.loads = rank_loads(space, a)
        state.free = cap - rank_memory(space, a)
        return state

    def add(self, o: int, ranks: np.ndarray, sign: int = 1) -> None:
        s = self.space
        if len(ranks) == self.loads.shape[0] and self.placement[o] == UNIFORM:  # shard i on rank i
            self.loads += sign * s.perf_of(o)
            self.free -= sign * s.mem_of(o)
            return
        np.add.at(self.loads, ranks, sign * s.perf_of(o))
        np.subtract.at(self.free, ranks, sign * s.mem_of(o))

    def remove(self, o: int, ranks: np.ndarray) -> None:
        self.add(o, ranks, -1)

    def place(self, o: int, by_memory: bool = False) -> Optional[Placed]:
        """Ranks for option `o`'s shards that keep the highest touched load lowest (lowest rank on
        ties), or None if they cannot fit. `by_memory`: instead put each shard where it leaves the
        least free memory (best fit), to pack tight memory."""
        s = self.space
        kind = self.placement[o]
        if kind == DEVICE and not by_memory and s.opt_count[o] == 1:
            run = s.opt_run[o]
            least = int(np.argmin(self.loads))  # the least-loaded rank, when it has room, is the answer
            if (self.free[least] >= s.run_mem[run]).all():
                return np.array([least]), float(self.loads[least] + s.run_total[run])
        p, mem = s.perf_of(o), s.mem_of(o)
        if kind == UNIFORM:
            if np.any(mem > self.free):
                return None
            return np.arange(len(p)), float((self.loads + p).max())
        scale = self._fit_scale() if by_memory else None
        if kind == DEVICE:
            return spread(p, mem, self.loads, self.free, scale)
        G, H = s.host_size, s.num_hosts
        if H == 0:
            return None
        if kind == HOST_UNIFORM:
            free = self.free[: H * G].reshape(H, G, 3)
            loads = self.loads[: H * G].reshape(H, G)
            fits = (free >= mem[None]).all(axis=(1, 2))
            peak = (loads + p).max(1)
            key = peak if scale is None else ((free - mem[None]) / scale[: H * G].reshape(H, G, 3)).sum(axis=(1, 2))
            key = np.where(fits, key, np.inf)
            g = int(np.argmin(key))
            return (np.arange(g * G, g * G + G), float(peak[g])) if fits[g] else None
        assert kind == HOST_DEVICE
        best: Optional[Placed] = None
        best_key = np.inf
        for g in range(H):  # hosts are few (world / host size)
            host = slice(g * G, g * G + G)
            sub = None if scale is None else scale[host]
            placed = spread(p, mem, self.loads[host], self.free[host], sub)
            if placed is None:
                continue
            key = placed[1] if scale is None else float((self.free[host] / sub).sum())
            if key < best_key:
                best, best_key = (placed[0] + g * G, placed[1]), key
        return best

    def _fit_scale(self) -> np.ndarray:
        if self._scale is None:
            self._scale = np.maximum(self.cap, 1).astype(float)
        return self._scale


def spread(p: np.ndarray, mem: np.ndarray, loads: np.ndarray, free: np.ndarray,
           scale: Optional[np.ndarray] = None) -> Optional[Placed]:
    """Each shard in turn on the least-loaded rank where it fits (as TorchRec's greedy partitioner),
    or, given per-rank capacities `scale`, on the rank it leaves with the least free memory."""
    if len(p) == 1 and scale is None:
        fits = (free >= mem[0]).all(1)
        masked = np.where(fits, loads, np.inf)
        r = int(np.argmin(masked))
        return (np.array([r]), float(masked[r] + p[0])) if fits[r] else None
    loads, free = loads.copy(), free.copy()
    out = np.empty(len(p), dtype=np.int64)
    for i in range(len(p)):
        fits = (free >= mem[i]).all(1)
        if not fits.any():
            return None
        key = loads if scale is None else ((free - mem[i]) / scale).sum(1)
        j = int(np.argmin(np.where(fits, key, np.inf)))
        loads[j] += p[i]
        free[j] -= mem[i]
        out[i] = j
    return out, float(loads[out].max())
