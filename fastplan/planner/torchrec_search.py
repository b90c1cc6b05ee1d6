"""TorchRec's own default search, replayed on the vectorized cost model.

TorchRec 1.8's `EmbeddingShardingPlanner` tries the proposals of `GreedyProposer` (by shard depth
and by total perf), `UniformProposer` and, for tiny problems, `GridSearchProposer`, places each
with `GreedyPerfPartitioner` and keeps the lowest max-rank perf. Replaying that here (same option
orderings, same partitioner rules, same tie breaks) gives the search a starting point that is
never worse than TorchRec's plan, at array speed and within a deterministic budget of shard
placements. Nothing here calls TorchRec.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from fastplan.planner.search_space import DEVICE, HOST_DEVICE, HOST_UNIFORM, UNIFORM, SearchSpace

GRID_MAX_PROPOSALS = 10_000  # TorchRec's GridSearchProposer limit


@dataclass
class Replay:
    option: np.ndarray  # per table
    ranks: List[np.ndarray]
    makespan: float
    proposals: int  # distinct proposals partitioned
    complete: bool  # False when the budget stopped the replay early


def _left_sum(cols: np.ndarray) -> np.ndarray:
    """Row sums added left to right, as `Perf.total` adds its fields."""
    out = cols[:, 0].copy()
    for j in range(1, cols.shape[1]):
        out = out + cols[:, j]
    return out


class _Partitioner:
    """`GreedyPerfPartitioner` with `SortBy.STORAGE`. Uniform options are placed with arrays;
    the rest one shard at a time on plain lists (faster than numpy calls at these sizes)."""

    def __init__(self, space: SearchSpace, cap: np.ndarray) -> None:
        self.s = space
        self.perf5 = space.run_perf[:, :5]  # per run
        self.total = _left_sum(self.perf5)
        self.cap = cap
        W = space.world_size
        # Device order on equal perf: rank % local_world_size, then rank (OrderedDeviceHardware);
        # inside a host, by rank.
        order = np.lexsort((np.arange(W), np.arange(W) % max(1, space.local_world_size)))
        tiebreak = np.empty(W, dtype=np.int64)
        tiebreak[order] = np.arange(W)
        self.tiebreak = tiebreak.tolist()
        self.by_rank = list(range(W))
        self.kind = space.opt_placement
        self.storage_sum = space.opt_mem
        self._rows: Dict[int, Tuple[list, list]] = {}

    def rows(self, o: int) -> Tuple[list, list]:
        """Option `o`'s shards as (memory rows, perf rows) lists, converted once when first used."""
        if o not in self._rows:
            self._rows[o] = (self.s.mem_of(o).tolist(), self.s.expand(o, self.perf5).tolist())
        return self._rows[o]

    def partition(self, proposal: np.ndarray) -> Optional[List[np.ndarray]]:
        s = self.s
        W, G, H = s.world_size, s.host_size, s.num_hosts
        ranks: List[Optional[np.ndarray]] = [None] * len(proposal)
        kinds = self.kind[proposal]
        uniform = np.nonzero(kinds == UNIFORM)[0]
        free = self.cap.copy()
        dev = np.zeros((W, 5))
        if len(uniform):
            if np.any(s.opt_count[proposal[uniform]] != W):
                return None
            free -= s.uniform_sum(proposal[uniform], s.run_mem)
            if np.any(free < 0):  # memory only adds up: some option's shard did not fit
                return None
            dev += s.expand_full(proposal[uniform], self.perf5).sum(0)  # summed as TorchRec's shards are
            for t in uniform.tolist():
                ranks[t] = np.arange(W)
        state = (dev.tolist(), _left_sum(dev).tolist(), free.tolist())
        rest = np.nonzero(kinds != UNIFORM)[0]
        if len(rest):
            st = self.storage_sum[proposal[rest]]  # Storage orders by (hbm, ddr, ssd)
            rest = rest[np.lexsort((np.arange(len(rest)), -st[:, 2], -st[:, 1], -st[:, 0]))]  # descending, stable
        for t in rest.tolist():
            o = int(proposal[t])
            if kinds[t] == DEVICE:
                r = self._devices(o, state, range(W), self.tiebreak)
            else:
                r = self._host(o, state, G, H)
            if r is None:
                return None
            ranks[t] = np.array(r, dtype=np.int64)
        return ranks  # type: ignore[return-value]

    def _devices(self, o: int, state, pool, tiebreak) -> Optional[List[int]]:
        """Each shard on the device of `pool` with the lowest (perf, tie break) where it fits;
        commits into `state` (dev rows, totals, free rows)."""
        dev, tot, free = state
        out = []
        mem_rows, perf_rows = self.rows(o)
        for (h, d, x), p in zip(mem_rows, perf_rows):
            best, best_t, best_b = -1, 0.0, 0
            for r in pool:
                f = free[r]
                if f[0] >= h and f[1] >= d and f[2] >= x:
                    t = tot[r]
                    if best < 0 or t < best_t or (t == best_t and tiebreak[r] < best_b):
                        best, best_t, best_b = r, t, tiebreak[r]
            if best < 0:
                return None
            row = dev[best]
            for i in range(5):
                row[i] += p[i]
            tot[best] = row[0] + row[1] + row[2] + row[3] + row[4]
            f = free[best]
            f[0] -= h
            f[1] -= d
            f[2] -= x
            out.append(best)
        return out

    def _host(self, o: int, state, G: int, H: int) -> Optional[List[int]]:
        """`_cohost_partition`: hosts by summed device perf; the first whose total storage holds the
        option and whose devices take its shards."""
        dev, tot, free = state
        need = self.storage_sum[o].tolist()
        sums = []
        for g in range(H):
            acc = 0
            for r in range(g * G, g * G + G):
                acc += tot[r]
            sums.append(acc)
        for g in sorted(range(H), key=sums.__getitem__):
            host = range(g * G, g * G + G)
            if any(need[i] > sum(free[r][i] for r in host) for i in range(3)):
                continue
            if self.kind[o] == HOST_UNIFORM:
                if self.s.opt_count[o] != G:
                    return None
                mem_rows, _ = self.rows(o)
                if all(all(a >= b for a, b in zip(free[r], m)) for r, m in zip(host, mem_rows)):
                    return self._pin(o, state, list(host))
                continue
            assert self.kind[o] == HOST_DEVICE
            trial = (dev[:], tot[:], free[:])  # rows of this host copied below, the rest shared
            for r in host:
                trial[0][r], trial[2][r] = dev[r][:], free[r][:]
            placed = self._devices(o, trial, host, self.by_rank)
            if placed is not None:
                dev[:], tot[:], free[:] = trial
                return placed
        return None

    def _pin(self, o: int, state, ranks: List[int]) -> List[int]:
        """Shard i on ranks[i] (table-row-wise inside a host)."""
        dev, tot, free = state
        for r, m, p in zip(ranks, *self.rows(o)):
            row, f = dev[r], free[r]
            for i in range(5):
                row[i] += p[i]
            tot[r] = row[0] + row[1] + row[2] + row[3] + row[4]
            for i in range(3):
                f[i] -= m[i]
        return ranks


class _Proposers:
    """TorchRec's default proposers over option indices: greedy by shard depth and by total perf
    (`GreedyProposer`), `UniformProposer`, `GridSearchProposer` (when it would run)."""

    def __init__(self, space: SearchSpace, total: np.ndarray) -> None:
        """`total`: `Perf.total` of one shard of each run."""
        starts = space.opt_run
        self.space = space
        self.depth = np.maximum.reduceat(total, starts)
        self.width = np.add.reduceat(total * space.run_len, starts)
        big, tot = space.opt_max_mem, space.opt_mem
        # GreedyProposer's "largest storage": (max hbm, sum hbm, max ddr, sum ddr) over shards, negated
        # for a min-heap.
        self.neg_storage = list(zip(*((-c).tolist() for c in (big[:, 0], tot[:, 0], big[:, 1], tot[:, 1]))))
        by_table = space.options_by_table()
        self.by_depth = [sorted(o.tolist(), key=self.depth.__getitem__) for o in by_table]
        self.by_width = [sorted(o.tolist(), key=self.width.__getitem__) for o in by_table]

    def firsts(self) -> Iterator[Tuple[int, ...]]:
        """Each greedy proposer's first proposal, then the uniform ones: cheap, often the best."""
        yield tuple(o[0] for o in self.by_depth)
        yield tuple(o[0] for o in self.by_width)
        for st in dict.fromkeys(self.space.opt_type.tolist()):
            lists = [[o for o in opts if self.space.opt_type[o] == st] for opts in self.by_depth]
            if all(lists):
                yield tuple(opts[0] for opts in lists)

    def greedy(self, lists: List[List[int]]) -> Iterator[Tuple[np.ndarray, float]]:
        """Each step moves the table whose current option is largest (first on ties) to its next
        one. Yields (proposal, its total work); the array is updated in place between proposals."""
        index = [0] * len(lists)
        proposal = np.array([o[0] for o in lists], dtype=np.int64)
        work = float(self.width[proposal].sum())
        width = self.width.tolist()
        heap = [(self.neg_storage[o[0]], t) for t, o in enumerate(lists) if len(o) > 1]
        heapq.heapify(heap)
        while True:
            yield proposal, work
            if not heap or heap[0][0] == (0, 0, 0, 0):
                return
            _, t = heapq.heappop(heap)
            index[t] += 1
            work += width[lists[t][index[t]]] - width[proposal[t]]
            proposal[t] = lists[t][index[t]]
            if index[t] + 1 < len(lists[t]):
                heapq.heappush(heap, (self.neg_storage[lists[t][index[t]]], t))

    def all(self) -> Iterator[Tuple[np.ndarray, float]]:
        """Every proposal with its total work."""
        for p in self.firsts():
            a = np.array(p, dtype=np.int64)
            yield a, float(self.width[a].sum())
        yield from self.greedy(self.by_depth)
        yield from self.greedy(self.by_width)
        if np.prod(np.array([len(o) for o in self.by_depth], dtype=float)) <= GRID_MAX_PROPOSALS:
            for p in itertools.product(*self.by_depth):
                a = np.array(p, dtype=np.int64)
                yield a, float(self.width[a].sum())


def replay(space: SearchSpace, cap: np.ndarray, budget: int) -> Optional[Replay]:
    """The best plan TorchRec's default proposers and partitioner find, or None if none fits.

    A proposal whose lower bound (its work spread evenly, or its largest shard) is no better
    than the best plan so far cannot win and is not partitioned (`proposals` counts the
    partitioned ones). `budget` caps the placement
    steps (one per proposal, one per uniform option, one per shard otherwise); past it the replay stops
    (complete=False) with the proposers' first proposals already tried. Deterministic."""
    T = len(space.tables)
    if T == 0:
        return None
    part = _Partitioner(space, cap)
    total = part.total
    proposers = _Proposers(space, total)
    steps = np.where(np.isin(part.kind, (UNIFORM, HOST_UNIFORM)), 1, space.opt_count)
    W = space.world_size
    seen = set()
    best: Optional[Replay] = None
    spent = 0
    complete = True
    for p, work in proposers.all():
        spent += 1
        if spent > budget:
            complete = False
            break
        if best is not None and (work / W >= best.makespan * (1 + 1e-12) or proposers.depth[p].max() >= best.makespan):
            continue
        key = p.tobytes()
        if key in seen:
            continue
        seen.add(key)
        spent += int(steps[p].sum())
        if spent > budget:
            complete = False
            break
        ranks = part.partition(p)
        if ranks is None:
            continue
        loads = np.zeros(W)
        for o, r in zip(p.tolist(), ranks):
            np.add.at(loads, r, space.expand(o, total))
        makespan = float(loads.max())
        if best is None or makespan < best.makespan:
            best = Replay(p.copy(), ranks, makespan, 0, True)
    if best is not None:
        best.proposals = len(seen)
        best.complete = complete
    return best
