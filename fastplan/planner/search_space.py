"""Every sharding option of every table as flat arrays: options, their shards, perf and storage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from torchrec.distributed.planner.types import ShardingOption
from torchrec.distributed.sharding_plan import _get_block_size_for_cw_shard

from fastplan.planner.cost import CW, DP, PERF_FIELDS, RW, TW, TWCW, TWRW, CostModel
from fastplan.planner.tables import TableInfo

# How TorchRec's partitioner may place an option's shards (what any of its layouts can look like):
# UNIFORM: shard i on rank i (row-wise, data-parallel); DEVICE: each shard on any rank, several may
# share one (table-wise, column-wise); HOST_UNIFORM: shard i on rank i of one host (table-row-wise);
# HOST_DEVICE: every shard on some rank of one host (table-column-wise). A host is a block of
# `host_size` (TorchRec's intra_group_size) consecutive ranks; ranks past the last whole block are in none.
UNIFORM, DEVICE, HOST_UNIFORM, HOST_DEVICE = 0, 1, 2, 3
PLACEMENT = {TW: DEVICE, CW: DEVICE, TWCW: HOST_DEVICE, TWRW: HOST_UNIFORM, RW: UNIFORM, DP: UNIFORM}


@dataclass
class SearchSpace:
    """Options (one row each) and their shards, stored as runs of identical shards: run `r` is
    `run_len[r]` shards with the same perf, memory and size, offsets `run_offset[r] + k run_step[r]`.
    Option `o` is runs `opt_run[o]` .. `+ opt_runs[o]` (a row-wise option over W ranks: at most 3
    runs, not W rows). The `shard_*` arrays expand every shard (small problems and tests only);
    searches read per option (`perf_of`, `mem_of`) or per run."""

    tables: List[TableInfo]
    world_size: int
    local_world_size: int
    host_size: int
    opt_table: np.ndarray
    opt_type: np.ndarray  # sharding type strings
    opt_kernel: np.ndarray  # compute kernel strings
    opt_count: np.ndarray  # shards
    opt_run: np.ndarray  # first run
    opt_runs: np.ndarray  # number of runs
    run_len: np.ndarray
    run_perf: np.ndarray  # (n_runs, 6) in PERF_FIELDS order
    run_mem: np.ndarray  # (n_runs, 3) bytes of hbm, ddr, ssd
    run_size: np.ndarray  # (n_runs, 2) rows, cols
    run_offset: np.ndarray  # (n_runs, 2) of the run's first shard
    run_step: np.ndarray  # (n_runs, 2) offset from one shard of the run to the next

    # ---- per run and per option ---------------------------------------------------------------
    @cached_property
    def opt_start(self) -> np.ndarray:
        """Index of each option's first shard in the expanded shard list."""
        return np.cumsum(self.opt_count) - self.opt_count

    @cached_property
    def run_opt(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.opt_table)), self.opt_runs)

    @cached_property
    def run_first(self) -> np.ndarray:
        """Index inside its option of each run's first shard."""
        ends = np.cumsum(self.run_len)
        return ends - self.run_len - np.repeat(ends[self.opt_run] - self.run_len[self.opt_run], self.opt_runs) \
            if len(self.run_len) else np.zeros(0, np.int64)

    @cached_property
    def run_total(self) -> np.ndarray:
        """`Perf.total` of one shard of each run: everything but input-dist comms."""
        return self.run_perf[:, :5].sum(axis=1)

    def _per_option(self, ufunc, values: np.ndarray) -> np.ndarray:
        return ufunc.reduceat(values, self.opt_run, axis=0) if len(values) else np.zeros((0,) + values.shape[1:])

    @cached_property
    def opt_work(self) -> np.ndarray:
        """Summed `Perf.total` of each option's shards."""
        return self._per_option(np.add, self.run_total * self.run_len)

    @cached_property
    def opt_max_shard(self) -> np.ndarray:
        return self._per_option(np.maximum, self.run_total)

    @cached_property
    def opt_min_shard(self) -> np.ndarray:
        return self._per_option(np.minimum, self.run_total)

    @cached_property
    def opt_mem(self) -> np.ndarray:
        """(n_options, 3) bytes of all of an option's shards."""
        return self._per_option(np.add, self.run_mem * self.run_len[:, None]).astype(np.int64)

    @cached_property
    def opt_max_mem(self) -> np.ndarray:
        """(n_options, 3) bytes of each option's largest shard, per tier."""
        return self._per_option(np.maximum, self.run_mem).astype(np.int64)

    @cached_property
    def _option_runs(self) -> List[Tuple[int, int, int]]:
        """(first run, end run, shards) of each option as Python ints: searches look them up per placement."""
        return list(zip(self.opt_run.tolist(), (self.opt_run + self.opt_runs).tolist(), self.opt_count.tolist()))

    def runs(self, option: int) -> slice:
        first, end, _ = self._option_runs[option]
        return slice(first, end)

    def expand(self, option: int, values: np.ndarray) -> np.ndarray:
        """`values` (one row per run) for each of the option's shards."""
        first, end, shards = self._option_runs[option]
        if shards == 1:
            return values[first:end]
        return values[first:end].repeat(shards if end - first == 1 else self.run_len[first:end], axis=0)

    def perf_of(self, option: int) -> np.ndarray:
        """`Perf.total` of each of the option's shards."""
        return self.expand(option, self.run_total)

    def mem_of(self, option: int) -> np.ndarray:
        """(shards, 3) bytes of each of the option's shards."""
        return self.expand(option, self.run_mem)

    def geometry_of(self, option: int) -> Tuple[np.ndarray, np.ndarray]:
        """(sizes, offsets) of the option's shards, (shards, 2) each."""
        return self.geometry(np.array([option]))

    def expand_options(self, options: np.ndarray, values: np.ndarray) -> np.ndarray:
        """`values` (one row per run) for every shard of `options`, one option after another."""
        runs = self._runs_of(options)
        return np.repeat(values[runs], self.run_len[runs], axis=0)

    def geometry(self, options: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(sizes, offsets) of every shard of `options`, one option after another, (shards, 2) each."""
        runs = self._runs_of(options)
        run = np.repeat(runs, self.run_len[runs])
        k = _local_index(self.run_len[runs])
        return self.run_size[run], self.run_offset[run] + k[:, None] * self.run_step[run]

    def expand_full(self, options: np.ndarray, values: np.ndarray) -> np.ndarray:
        """(len(options), world_size, ...) `values` (one row per run) of every shard of options
        that have one shard per rank."""
        runs = self._runs_of(options)
        return values[np.repeat(runs, self.run_len[runs])].reshape((len(options), self.world_size) + values.shape[1:])

    def _runs_of(self, options: np.ndarray) -> np.ndarray:
        n = self.opt_runs[options]
        return np.repeat(self.opt_run[options], n) + _local_index(n)

    def uniform_sum(self, options: np.ndarray, values: np.ndarray) -> np.ndarray:
        """(world_size, ...) per rank the sum of `values` (one row per run) over the shards of
        `options` placed shard i on rank i (uniform placement)."""
        runs = self._runs_of(options)
        diff = np.zeros((self.world_size + 1,) + values.shape[1:], dtype=values.dtype)
        np.add.at(diff, self.run_first[runs], values[runs])
        np.subtract.at(diff, self.run_first[runs] + self.run_len[runs], values[runs])
        return np.cumsum(diff, axis=0)[:-1]

    # ---- every shard, expanded ----------------------------------------------------------------
    @cached_property
    def _shard_run(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.run_len)), self.run_len)

    @cached_property
    def shard_perf(self) -> np.ndarray:
        return self.run_perf[self._shard_run]

    @cached_property
    def shard_mem(self) -> np.ndarray:
        return self.run_mem[self._shard_run]

    @cached_property
    def shard_size(self) -> np.ndarray:
        return self.run_size[self._shard_run]

    @cached_property
    def shard_offset(self) -> np.ndarray:
        k = _local_index(self.run_len)
        return self.run_offset[self._shard_run] + k[:, None] * self.run_step[self._shard_run]

    @property
    def shard_hbm(self) -> np.ndarray:
        return self.shard_mem[:, 0]

    @property
    def shard_ddr(self) -> np.ndarray:
        return self.shard_mem[:, 1]

    @cached_property
    def shard_total(self) -> np.ndarray:
        """`Perf.total`: everything but input-dist comms."""
        return self.run_total[self._shard_run]

    @cached_property
    def type_codes(self) -> Tuple[List[str], np.ndarray]:
        """(the sharding types present, each option's index into that list)."""
        return value_codes(self.opt_type)

    @cached_property
    def opt_placement(self) -> np.ndarray:
        kinds, codes = self.type_codes
        return np.array([PLACEMENT[k] for k in kinds], dtype=np.int8)[codes]

    @property
    def num_hosts(self) -> int:
        return self.world_size // self.host_size

    def shards(self, option: int) -> slice:
        """The option's shards in the expanded `shard_*` arrays."""
        s = int(self.opt_start[option])
        return slice(s, s + int(self.opt_count[option]))

    def options_by_table(self) -> List[np.ndarray]:
        order = np.argsort(self.opt_table, kind="stable")
        bounds = np.searchsorted(self.opt_table[order], np.arange(len(self.tables) + 1))
        return [order[bounds[i] : bounds[i + 1]] for i in range(len(self.tables))]


def from_shards(tables: List[TableInfo], world_size: int, local_world_size: int, host_size: int, opt_table: np.ndarray,
                opt_type: np.ndarray, opt_kernel: np.ndarray, opt_count: np.ndarray, shard_perf: np.ndarray,
                shard_mem: np.ndarray, shard_size: np.ndarray, shard_offset: np.ndarray) -> SearchSpace:
    """A search space from one row per shard (options' shards consecutive): consecutive identical
    shards with evenly spaced offsets become one run."""
    n = len(shard_perf)
    opt = np.repeat(np.arange(len(opt_count)), opt_count)
    attrs = np.column_stack([shard_perf, shard_mem, shard_size]) if n else np.zeros((0, 11))
    new = np.ones(n, dtype=bool)
    if n > 1:
        new[1:] = (opt[1:] != opt[:-1]) | (attrs[1:] != attrs[:-1]).any(1)
    # A group whose offsets are not evenly spaced becomes one run per shard.
    first = np.flatnonzero(new)
    glen = np.diff(np.append(first, n))
    gid = np.repeat(np.arange(len(first)), glen)
    step = np.zeros((len(first), 2), np.int64)
    two = glen > 1
    step[two] = shard_offset[first[two] + 1] - shard_offset[first[two]]
    k = np.arange(n) - first[gid]
    uneven = np.zeros(len(first), dtype=bool)
    np.logical_or.at(uneven, gid, (shard_offset != shard_offset[first[gid]] + k[:, None] * step[gid]).any(1))
    new |= uneven[gid]
    first = np.flatnonzero(new)
    run_len = np.diff(np.append(first, n))
    runs_per_opt = np.bincount(opt[first], minlength=len(opt_count)) if n else np.zeros(len(opt_count), np.int64)
    run_step = np.zeros((len(first), 2), np.int64)
    two = run_len > 1
    run_step[two] = shard_offset[first[two] + 1] - shard_offset[first[two]]
    return SearchSpace(
        tables=tables, world_size=world_size, local_world_size=local_world_size, host_size=host_size,
        opt_table=opt_table, opt_type=opt_type, opt_kernel=opt_kernel, opt_count=np.asarray(opt_count, np.int64),
        opt_run=np.cumsum(runs_per_opt) - runs_per_opt, opt_runs=runs_per_opt, run_len=run_len,
        run_perf=shard_perf[first].reshape(-1, 6), run_mem=shard_mem[first].reshape(-1, 3),
        run_size=shard_size[first].reshape(-1, 2), run_offset=shard_offset[first].reshape(-1, 2), run_step=run_step,
    )


def _option_lists(tables: List[TableInfo], world: int, group: int) -> Tuple[np.ndarray, ...]:
    """(table, sharding type, kernel, shard count, columns) of every option, in TorchRec's order:
    by table, then the table's sharding types and kernels. Tables share their module's option lists
    unless constrained, so each distinct list is expanded once."""
    lists: Dict[Tuple[int, int], int] = {}
    flat: List[Tuple[str, str]] = []
    starts: List[int] = []
    has_cw: List[bool] = []
    which = np.empty(len(tables), np.int64)
    for i, t in enumerate(tables):
        key = (id(t.sharding_types), id(t.kernels))  # both live as long as `tables`
        j = lists.get(key)
        if j is None:
            j = lists[key] = len(starts)
            starts.append(len(flat))
            flat.extend((st, k) for st in t.sharding_types for k in t.kernels[st])
            has_cw.append(CW in t.kernels or TWCW in t.kernels)
        which[i] = j
    bounds = np.array(starts + [len(flat)], dtype=np.int64)
    per_table = np.diff(bounds)[which]
    o_table = np.repeat(np.arange(len(tables)), per_table)
    entry = np.repeat(bounds[:-1][which], per_table) + _local_index(per_table)
    types = np.array([st for st, _ in flat], dtype=object)
    o_type = types[entry]
    o_kernel = np.array([k for _, k in flat], dtype=object)[entry]

    by_cols = np.isin(types, (CW, TWCW))
    fixed = np.array([{TW: 1, RW: world, DP: world, TWRW: group}.get(st, 0) for st in types.tolist()], dtype=np.int64)
    dim = np.array([t.dim for t in tables], dtype=np.int64)
    blocks = np.ones(len(tables), np.int64)
    block_of: Dict[Tuple[int, Optional[int]], int] = {}
    for i in np.flatnonzero(np.array(has_cw, dtype=bool)[which]).tolist():
        key = (tables[i].dim, tables[i].col_wise_shard_dim)
        if key not in block_of:
            block_of[key] = _get_block_size_for_cw_shard(*key)
        blocks[i] = block_of[key]
    cw = by_cols[entry]
    o_count = np.where(cw, (dim // blocks)[o_table], fixed[entry])
    o_cols = np.where(cw, dim[o_table] // np.maximum(o_count, 1), dim[o_table])
    return o_table, o_type, o_kernel, o_count, o_cols


def value_codes(values: np.ndarray) -> Tuple[List[object], np.ndarray]:
    """(distinct values in order of first appearance, each element's index into them) of an array
    with few distinct values (faster than `np.unique`, which sorts, on strings)."""
    distinct: List[object] = []
    codes = np.full(len(values), -1, dtype=np.int64)
    while (todo := codes < 0).any():
        value = values[np.argmax(todo)]
        codes[values == value] = len(distinct)
        distinct.append(value)
    return distinct, codes


def _local_index(counts: np.ndarray) -> np.ndarray:
    starts = np.cumsum(counts) - counts
    return np.arange(int(counts.sum())) - np.repeat(starts, counts)


def build_search_space(tables: List[TableInfo], cost: CostModel) -> SearchSpace:
    """Enumerate options the way TorchRec's `EmbeddingEnumerator` does and cost them in bulk."""
    world, group = cost.world, cost.group
    o_table, o_type, o_kernel, o_count, o_cols = _option_lists(tables, world, group)
    n_opt = len(o_table)

    # Up to three runs per option: full shards, a shorter last one (row-wise kinds), empty ones past
    # the last row. Column-wise shards are alike; table-wise and data-parallel shards are whole tables.
    rows = np.array([t.rows for t in tables], dtype=np.int64)[o_table] if tables else np.zeros(0, np.int64)
    by_rows = np.isin(o_type, (RW, TWRW))
    by_cols = np.isin(o_type, (CW, TWCW))
    block = np.where(by_rows, -(-rows // np.maximum(o_count, 1)), rows)
    full = np.where(by_rows, rows // np.maximum(block, 1), o_count)
    rem = np.where(by_rows, rows - full * block, 0)
    last = (rem > 0).astype(np.int64)
    lens = np.stack([full, last, o_count - full - last], 1)
    size_rows = np.stack([block, rem, np.zeros_like(rows)], 1)
    off_rows = np.stack([np.zeros_like(rows), full * block, rows], 1)
    step = np.zeros((n_opt, 3, 2), np.int64)
    step[:, 0, 0] = np.where(by_rows, block, 0)
    step[:, 0, 1] = np.where(by_cols, o_cols, 0)
    keep = lens > 0
    r_opt = np.nonzero(keep)[0]
    runs_per_opt = keep.sum(1)
    r_len, r_rows = lens[keep], size_rows[keep]
    r_cols = o_cols[r_opt]
    r_offset = np.stack([off_rows[keep], np.zeros_like(r_rows)], 1)

    perf = cost.perf(tables, o_table, o_type, o_kernel, o_cols)
    hbm, ddr = cost.storage(tables, o_table[r_opt], o_type[r_opt], o_kernel[r_opt], r_rows, r_cols)
    return SearchSpace(
        tables=tables,
        world_size=world,
        local_world_size=cost.local,
        host_size=group,
        opt_table=o_table,
        opt_type=o_type,
        opt_kernel=o_kernel,
        opt_count=o_count,
        opt_run=np.cumsum(runs_per_opt) - runs_per_opt,
        opt_runs=runs_per_opt,
        run_len=r_len,
        run_perf=perf[r_opt].reshape(-1, 6),
        run_mem=np.stack([hbm, ddr, np.zeros_like(hbm)], axis=1).astype(np.int64).reshape(-1, 3),
        run_size=np.stack([r_rows, r_cols], axis=1).reshape(-1, 2),
        run_offset=r_offset.reshape(-1, 2),
        run_step=step[keep].reshape(-1, 2),
    )


def from_sharding_options(
    tables: List[TableInfo], options: Sequence[ShardingOption], world_size: int, local_world_size: int, host_size: int
) -> SearchSpace:
    """A search space from TorchRec `ShardingOption`s (a user's enumerator or estimators); tables
    the options do not mention are left out."""
    present = {(so.path, so.name) for so in options}
    tables = [t for t in tables if (t.path, t.name) in present]
    index = {(t.path, t.name): i for i, t in enumerate(tables)}
    rows = []
    for so in options:
        key = (so.path, so.name)
        if key not in index:
            raise KeyError(f"enumerator returned table '{so.name}' of module '{so.path}' that fastplan did not find")
        rows.append((index[key], so))
    # TorchRec orders a constrained table's options by a set intersection (it varies with
    # PYTHONHASHSEED): a canonical order keeps plans identical on every rank.
    kinds = {t: i for i, t in enumerate((DP, TW, CW, TWCW, RW, TWRW))}
    rows.sort(key=lambda r: (r[0], kinds.get(r[1].sharding_type, len(kinds)), r[1].sharding_type, r[1].compute_kernel))
    counts = np.array([len(so.shards) for _, so in rows], dtype=np.int64)
    perf, mem, size, offset = [], [], [], []
    for _, so in rows:
        for sh in so.shards:
            p = sh.perf
            perf.append([getattr(p, f) for f in PERF_FIELDS] if p is not None else [math.inf] * 6)
            st = sh.storage
            mem.append([st.hbm, st.ddr, st.ssd] if st is not None else [0, 0, 0])
            size.append(list(sh.size))
            offset.append(list(sh.offset))
    return from_shards(
        tables, world_size, local_world_size, host_size,
        opt_table=np.array([i for i, _ in rows], dtype=np.int64),
        opt_type=np.array([so.sharding_type for _, so in rows], dtype=object),
        opt_kernel=np.array([so.compute_kernel for _, so in rows], dtype=object),
        opt_count=counts,
        shard_perf=np.array(perf, dtype=float).reshape(-1, 6),
        shard_mem=np.array(mem, dtype=np.int64).reshape(-1, 3),
        shard_size=np.array(size, dtype=np.int64).reshape(-1, 2),
        shard_offset=np.array(offset, dtype=np.int64).reshape(-1, 2),
    )
