"""A plan in array form: the chosen option of every table and the rank of each of its shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from fastplan.planner.search_space import SearchSpace


@dataclass
class Assignment:
    option: np.ndarray  # per table
    ranks: List[np.ndarray]  # per table, one rank per shard

    def copy(self) -> "Assignment":
        return Assignment(self.option.copy(), [r.copy() for r in self.ranks])


def rank_loads(space: SearchSpace, a: Assignment) -> np.ndarray:
    """Per rank the summed `Perf.total` of the assignment's shards."""
    loads = np.zeros(space.world_size)
    for o, r in zip(a.option.tolist(), a.ranks):
        np.add.at(loads, r, space.perf_of(o))
    return loads


def rank_memory(space: SearchSpace, a: Assignment) -> np.ndarray:
    """(world_size, 3) bytes per rank and tier (hbm, ddr, ssd) the assignment's shards take."""
    used = np.zeros((space.world_size, 3), dtype=np.int64)
    for o, r in zip(a.option.tolist(), a.ranks):
        np.add.at(used, r, space.mem_of(o))
    return used
