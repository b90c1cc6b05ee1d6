"""A plan in array form: the chosen option of every table and the rank of each of its shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from fastplan.planner.search_space import UNIFORM, SearchSpace


@dataclass
class Assignment:
    option: np.ndarray  # per table
    ranks: List[np.ndarray]  # per table, one rank per shard

    def copy(self) -> "Assignment":
        return Assignment(self.option.copy(), [r.copy() for r in self.ranks])


SHARDS_AT_ONCE = 1 << 20  # shards expanded at a time, to bound memory at thousands of ranks


def rank_loads(space: SearchSpace, a: Assignment) -> np.ndarray:
    """Per rank the summed `Perf.total` of the assignment's shards, added in table then shard order:
    the order every search stage adds them in, so the same plan always gives bit-equal loads."""
    loads = np.zeros(space.world_size)
    counts = space.opt_count[a.option]
    ends = np.cumsum(counts)
    start = 0
    while start < len(a.option):
        stop = max(start + 1, int(np.searchsorted(ends, ends[start] - counts[start] + SHARDS_AT_ONCE, "right")))
        shard_perf = space.expand_options(a.option[start:stop], space.run_total)
        np.add.at(loads, np.concatenate(a.ranks[start:stop]).astype(np.int64), shard_perf)
        start = stop
    return loads


def rank_memory(space: SearchSpace, a: Assignment) -> np.ndarray:
    """(world_size, 3) bytes per rank and tier (hbm, ddr, ssd) the assignment's shards take. Options
    with a shard on every rank (shard i on rank i) are added run by run, not shard by shard."""
    full = (space.opt_placement[a.option] == UNIFORM) & (space.opt_count[a.option] == space.world_size)
    used = space.uniform_sum(a.option[full], space.run_mem.astype(np.int64))
    rest = np.flatnonzero(~full)
    if len(rest):
        np.add.at(used, np.concatenate([a.ranks[t] for t in rest.tolist()]).astype(np.int64),
                  space.expand_options(a.option[rest], space.run_mem))
    return used
