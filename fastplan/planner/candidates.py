"""Each table's options worth searching: dominated options removed, the rest sorted by work."""

from __future__ import annotations

import numpy as np

from fastplan.planner.search_space import DEVICE, UNIFORM, SearchSpace


class Candidates:
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
        self.min_work = np.array([self.work[o].min() for o in self.by_table]) if self.by_table else np.zeros(0)

    def option_mem(self) -> np.ndarray:
        """(n_options, 3) bytes per tier of all of an option's shards."""
        s = self.space
        return np.add.reduceat(s.shard_mem, s.opt_start, axis=0) if len(s.shard_mem) else np.zeros((0, 3), np.int64)

    def footprint(self, cap: np.ndarray) -> np.ndarray:
        """Per option: its bytes as a fraction of all ranks' capacity, tiers added."""
        return (self.option_mem() / np.maximum(cap.sum(0), 1)).sum(1)

    def _dominated(self) -> np.ndarray:
        s = self.space
        n = len(s.opt_table)
        count = s.opt_count
        # Options are comparable when their shards line up: same table, shard count and geometry,
        # and the same freedom of placement (a single shard confined to hosts is not a table-wise one
        # when some ranks are in no host).
        anywhere = (self.placement == DEVICE) | (s.num_hosts * s.host_size == s.world_size) | (self.placement == UNIFORM)
        single = (count == 1) & anywhere
        shape = np.where(single, "single", s.opt_type.astype(str))
        _, keys = np.unique(np.stack([s.opt_table, count, np.unique(shape, return_inverse=True)[1]], 1), axis=0, return_inverse=True)
        keys = keys.ravel()
        order = np.lexsort((np.arange(n), self.work, keys))
        ks = keys[order]
        bounds = np.flatnonzero(np.diff(ks, prepend=-1, append=-1))
        starts, sizes = bounds[:-1], np.diff(bounds)
        first, second = [], []
        for k in np.unique(sizes[sizes > 1]).tolist():  # groups hold a few kernels x sharding types
            a, b = np.triu_indices(k, 1)
            base = starts[sizes == k][:, None]
            first.append(order[(base + a[None, :]).ravel()])
            second.append(order[(base + b[None, :]).ravel()])
        dominated = np.zeros(n, dtype=bool)
        if not first:
            return dominated
        k = np.concatenate(first)
        o = np.concatenate(second)
        c = count[o]
        local = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        ik = np.repeat(s.opt_start[k], c) + local
        io = np.repeat(s.opt_start[o], c) + local
        ok = (self.perf[ik] <= self.perf[io]) & (s.shard_mem[ik] <= s.shard_mem[io]).all(1)
        pair_ok = np.logical_and.reduceat(ok, np.cumsum(c) - c)
        dominated[o[pair_ok]] = True
        return dominated
