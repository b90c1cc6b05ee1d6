"""Every sharding option of every table as flat arrays: options, their shards, perf and storage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import List, Sequence

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
    """Options (one row each) and their shards (flat, `opt_start[o]` .. `+ opt_count[o]`)."""

    tables: List[TableInfo]
    world_size: int
    local_world_size: int
    host_size: int
    opt_table: np.ndarray
    opt_type: np.ndarray  # sharding type strings
    opt_kernel: np.ndarray  # compute kernel strings
    opt_start: np.ndarray
    opt_count: np.ndarray
    shard_perf: np.ndarray  # (n_shards, 6) in PERF_FIELDS order
    shard_mem: np.ndarray  # (n_shards, 3) bytes of hbm, ddr, ssd
    shard_size: np.ndarray  # (n_shards, 2) rows, cols
    shard_offset: np.ndarray  # (n_shards, 2)

    @property
    def shard_hbm(self) -> np.ndarray:
        return self.shard_mem[:, 0]

    @property
    def shard_ddr(self) -> np.ndarray:
        return self.shard_mem[:, 1]

    @property
    def shard_total(self) -> np.ndarray:
        """`Perf.total`: everything but input-dist comms."""
        return self.shard_perf[:, :5].sum(axis=1)

    @cached_property
    def opt_placement(self) -> np.ndarray:
        return np.array([PLACEMENT[t] for t in self.opt_type.tolist()], dtype=np.int8)

    @property
    def num_hosts(self) -> int:
        return self.world_size // self.host_size

    def shards(self, option: int) -> slice:
        s = int(self.opt_start[option])
        return slice(s, s + int(self.opt_count[option]))

    def options_by_table(self) -> List[np.ndarray]:
        order = np.argsort(self.opt_table, kind="stable")
        bounds = np.searchsorted(self.opt_table[order], np.arange(len(self.tables) + 1))
        return [order[bounds[i] : bounds[i + 1]] for i in range(len(self.tables))]


def _shard_count(st: str, table: TableInfo, world: int, group: int) -> int:
    if st in (TW,):
        return 1
    if st in (RW, DP):
        return world
    if st == TWRW:
        return group
    block = _get_block_size_for_cw_shard(table.dim, table.col_wise_shard_dim)
    return table.dim // block


def _local_index(counts: np.ndarray) -> np.ndarray:
    starts = np.cumsum(counts) - counts
    return np.arange(int(counts.sum())) - np.repeat(starts, counts)


def build_search_space(tables: List[TableInfo], cost: CostModel) -> SearchSpace:
    """Enumerate options the way TorchRec's `EmbeddingEnumerator` does and cost them in bulk."""
    world, group = cost.world, cost.group
    opt_table, opt_type, opt_kernel, opt_count, opt_cols = [], [], [], [], []
    for i, t in enumerate(tables):
        for st in t.sharding_types:
            n = _shard_count(st, t, world, group)
            cols = t.dim // n if st in (CW, TWCW) else t.dim
            for k in t.kernels[st]:
                opt_table.append(i)
                opt_type.append(st)
                opt_kernel.append(k)
                opt_count.append(n)
                opt_cols.append(cols)
    o_table = np.array(opt_table, dtype=np.int64)
    o_type = np.array(opt_type, dtype=object)
    o_kernel = np.array(opt_kernel, dtype=object)
    o_count = np.array(opt_count, dtype=np.int64)
    o_cols = np.array(opt_cols, dtype=np.int64)
    o_start = np.cumsum(o_count) - o_count

    # Shard geometry.
    s_opt = np.repeat(np.arange(len(o_table)), o_count)
    local = _local_index(o_count)
    s_table = o_table[s_opt]
    s_type = o_type[s_opt]
    rows = np.array([t.rows for t in tables], dtype=np.int64)[s_table] if tables else np.zeros(0, np.int64)
    s_rows = rows.copy()
    s_cols = o_cols[s_opt]
    s_row_off = np.zeros_like(s_rows)
    s_col_off = np.where(np.isin(s_type, (CW, TWCW)), local * s_cols, 0)
    for st, n in ((RW, world), (TWRW, group)):
        sel = s_type == st
        block = -(-rows[sel] // n)  # ceil
        start = np.minimum(local[sel] * block, rows[sel])
        s_rows[sel] = np.clip(rows[sel] - local[sel] * block, 0, block)
        s_row_off[sel] = start

    perf = cost.perf(tables, o_table, o_type, opt_kernel, o_cols)
    hbm, ddr = cost.storage(tables, s_table, s_type, o_kernel[s_opt], s_rows, s_cols)
    return SearchSpace(
        tables=tables,
        world_size=world,
        local_world_size=cost.local,
        host_size=group,
        opt_table=o_table,
        opt_type=o_type,
        opt_kernel=o_kernel,
        opt_start=o_start,
        opt_count=o_count,
        shard_perf=perf[s_opt],
        shard_mem=np.stack([hbm, ddr, np.zeros_like(hbm)], axis=1).astype(np.int64).reshape(-1, 3),
        shard_size=np.stack([s_rows, s_cols], axis=1) if len(s_rows) else np.zeros((0, 2), np.int64),
        shard_offset=np.stack([s_row_off, s_col_off], axis=1) if len(s_rows) else np.zeros((0, 2), np.int64),
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
    return SearchSpace(
        tables=tables,
        world_size=world_size,
        local_world_size=local_world_size,
        host_size=host_size,
        opt_table=np.array([i for i, _ in rows], dtype=np.int64),
        opt_type=np.array([so.sharding_type for _, so in rows], dtype=object),
        opt_kernel=np.array([so.compute_kernel for _, so in rows], dtype=object),
        opt_start=np.cumsum(counts) - counts,
        opt_count=counts,
        shard_perf=np.array(perf, dtype=float).reshape(-1, 6),
        shard_mem=np.array(mem, dtype=np.int64).reshape(-1, 3),
        shard_size=np.array(size, dtype=np.int64).reshape(-1, 2),
        shard_offset=np.array(offset, dtype=np.int64).reshape(-1, 2),
    )
