"""Each table's options worth searching: dominated options removed, the rest sorted by work."""

from __future__ import annotations

import numpy as np

from fastplan.planner.search_space import DEVICE, UNIFORM, SearchSpace


class Candidates:
    """Per-table option lists without dominated options (another option of the same shape that is
    no slower and no larger on every shard; ties keep the earlier option)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.work = space.opt_work
        self.max_shard = space.opt_max_shard
        self.placement = space.opt_placement
        self.dominated = self._dominated()
        keep = np.nonzero(~self.dominated)[0]
        order = keep[np.lexsort((keep, self.work[keep], space.opt_table[keep]))]
        bounds = np.searchsorted(space.opt_table[order], np.arange(len(space.tables) + 1))
        self.by_table = [order[bounds[i] : bounds[i + 1]] for i in range(len(space.tables))]
        self.min_work = np.minimum.reduceat(self.work[order], bounds[:-1]) if len(order) else np.zeros(len(space.tables))

    def option_mem(self) -> np.ndarray:
        """(n_options, 3) bytes per tier of all of an option's shards."""
        return self.space.opt_mem

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
        kinds, shape = s.type_codes
        shape = np.where((count == 1) & anywhere, len(kinds), shape)  # "single"
        keys = (s.opt_table * (int(count.max(initial=0)) + 1) + count) * (len(kinds) + 1) + shape
        order = np.lexsort((np.arange(n), self.work, keys))
        ks = keys[order]
        bounds = np.flatnonzero(np.diff(ks, prepend=-1, append=-1))
        starts, sizes = bounds[:-1], np.diff(bounds)
        first, second = [], []
        for k in np.flatnonzero(np.bincount(sizes[sizes > 1])).tolist():  # groups hold a few kernels x sharding types
            a, b = np.triu_indices(k, 1)
            base = starts[sizes == k][:, None]
            first.append(order[(base + a[None, :]).ravel()])
            second.append(order[(base + b[None, :]).ravel()])
        dominated = np.zeros(n, dtype=bool)
        if not first:
            return dominated
        k = np.concatenate(first)
        o = np.concatenate(second)
        dominated[o[self._no_worse(k, o)]] = True
        return dominated

    def _no_worse(self, k: np.ndarray, o: np.ndarray) -> np.ndarray:
        """Per pair: every shard of option k is no slower and no larger than the same shard of o."""
        s = self.space
        perf, mem = s.run_total, s.run_mem
        ok = np.zeros(len(k), dtype=bool)
        same = s.opt_runs[k] == s.opt_runs[o]  # runs line up when they have the same lengths
        c = np.where(same, s.opt_runs[k], 0)
        local = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        rk, ro = np.repeat(s.opt_run[k], c) + local, np.repeat(s.opt_run[o], c) + local
        pair = np.repeat(np.arange(len(k)), c)
        aligned = np.ones(len(k), dtype=bool)
        np.logical_and.at(aligned, pair, s.run_len[rk] == s.run_len[ro])
        better = (perf[rk] <= perf[ro]) & (mem[rk] <= mem[ro]).all(1)
        both = same & aligned
        ok[both] = True
        np.logical_and.at(ok, pair, better | ~both[pair])
        for i in np.flatnonzero(~both).tolist():  # runs split differently: shard by shard
            a, b = int(k[i]), int(o[i])
            ok[i] = bool((s.perf_of(a) <= s.perf_of(b)).all() and (s.mem_of(a) <= s.mem_of(b)).all())
        return ok
