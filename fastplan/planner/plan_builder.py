"""Turn a chosen assignment into TorchRec types: `ShardingPlan` and, when asked, `ShardingOption`s."""

from __future__ import annotations

from typing import List

import numpy as np

from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.planner.enumerators import get_partition_by_type
from torchrec.distributed.planner.types import Perf, Shard, ShardingOption, Storage
from torchrec.distributed.sharding_plan import placement
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan

from fastplan.planner.cost import DP, PERF_FIELDS
from fastplan.planner.assignment import Assignment
from fastplan.planner.search_space import SearchSpace


_SETTINGS = ("cache_params", "enforce_hbm", "stochastic_rounding", "bounds_check_mode", "output_dtype", "key_value_params")


def _constraint_settings(table) -> dict:
    """The constraint fields TorchRec copies onto a table's sharding (None when unconstrained)."""
    c = table.constraint
    return {name: getattr(c, name) if c else None for name in _SETTINGS}


def to_sharding_plan(space: SearchSpace, a: Assignment, compute_device: str) -> ShardingPlan:
    """One `ParameterSharding` per table, grouped by module path, as TorchRec's planner emits."""
    types = space.opt_type[a.option]
    sharded = types != DP  # data-parallel tables have no sharding spec
    sizes, offsets = (x.tolist() for x in space.geometry(a.option[sharded]))
    places = [placement(compute_device, r, space.local_world_size) for r in range(space.world_size)]
    plan, at = {}, 0
    for table, st, kernel, ranks, has_spec in zip(
        space.tables, types.tolist(), space.opt_kernel[a.option].tolist(), a.ranks, sharded.tolist()
    ):
        rank_list = np.asarray(ranks).tolist()
        spec = None
        if has_spec:
            end = at + len(rank_list)
            spec = EnumerableShardingSpec([
                ShardMetadata(shard_sizes=size, shard_offsets=offset, placement=places[r])
                for size, offset, r in zip(sizes[at:end], offsets[at:end], rank_list)
            ])
            at = end
        module_plan = plan.setdefault(table.path, EmbeddingModuleShardingPlan())
        module_plan[table.name] = ParameterSharding(
            sharding_spec=spec, sharding_type=st, compute_kernel=kernel, ranks=rank_list, **_constraint_settings(table),
        )
    return ShardingPlan(plan)


def _sharding_option(space: SearchSpace, o: int, batch_size: int, ranks=None) -> ShardingOption:
    table = space.tables[int(space.opt_table[o])]
    ranks = [None] * int(space.opt_count[o]) if ranks is None else [int(r) for r in ranks]
    sizes, offsets = space.geometry_of(o)
    shards = [
        Shard(
            size=list(size),
            offset=list(offset),
            storage=Storage(hbm=int(m[0]), ddr=int(m[1]), ssd=int(m[2])),
            perf=Perf(**dict(zip(PERF_FIELDS, perf))),
            rank=r,
        )
        for size, offset, m, perf, r in zip(
            sizes.tolist(), offsets.tolist(), space.mem_of(o).tolist(), space.expand(o, space.run_perf).tolist(), ranks,
        )
    ]
    st = str(space.opt_type[o])
    return ShardingOption(
        name=table.name,
        tensor=table.tensor,
        module=(table.path, table.module),
        input_lengths=table.input_lengths,
        batch_size=batch_size,
        sharding_type=st,
        partition_by=get_partition_by_type(st),
        compute_kernel=str(space.opt_kernel[o]),
        shards=shards,
        is_pooled=table.is_pooled,
        feature_names=table.constraint.feature_names if table.constraint else None,
        **_constraint_settings(table),
    )


def to_sharding_options(space: SearchSpace, a: Assignment, batch_size: int) -> List[ShardingOption]:
    """The chosen options, with ranks, as TorchRec `ShardingOption`s (callbacks, Stats, perf models)."""
    return [_sharding_option(space, o, batch_size, r) for o, r in zip(a.option.tolist(), a.ranks)]


def sharding_options(space: SearchSpace, batch_size: int) -> List[ShardingOption]:
    """Every option of the search space, without ranks, in table order (an enumerator's output)."""
    return [_sharding_option(space, o, batch_size) for o in range(len(space.opt_table))]


def assignment_from_plan(space: SearchSpace, plan: ShardingPlan) -> Assignment:
    """The assignment a `ShardingPlan` describes, in `space`'s terms (its tables must be in the
    plan with options of the space). Shards are matched by offset, so the plan's shard order does
    not matter."""
    by_key = {}
    for o, (t, st, k) in enumerate(zip(space.opt_table.tolist(), space.opt_type.tolist(), space.opt_kernel.tolist())):
        by_key[(t, st, k)] = o
    option = np.zeros(len(space.tables), dtype=np.int64)
    ranks = []
    for t, table in enumerate(space.tables):
        ps = plan.plan[table.path][table.name]
        o = by_key.get((t, ps.sharding_type, ps.compute_kernel))
        if o is None:
            raise ValueError(f"table '{table.name}': {ps.sharding_type}/{ps.compute_kernel} is not an option of this search space")
        option[t] = o
        if ps.sharding_spec is None:  # data-parallel: shard i on rank i
            ranks.append(np.array(ps.ranks, dtype=np.int64))
            continue
        sizes, offsets = space.geometry_of(o)
        slots = {}
        for i, (off, size) in enumerate(zip(offsets.tolist(), sizes.tolist())):
            slots.setdefault((tuple(off), tuple(size)), []).append(i)
        r = np.empty(len(sizes), dtype=np.int64)
        for meta, rank in zip(ps.sharding_spec.shards, ps.ranks):
            r[slots[(tuple(meta.shard_offsets), tuple(meta.shard_sizes))].pop(0)] = rank
        ranks.append(r)
    return Assignment(option, ranks)


def estimates_from_space(space: SearchSpace, a: Assignment):
    """The chosen options' per-shard estimates for a plan file, as `planfile.estimates_from_options`
    reads them from `to_sharding_options` (a field equal on every shard written once), without
    building TorchRec objects or a Python object per identical shard."""
    from fastplan.planfile import PERF_FIELDS as FILE_FIELDS, TableEstimates

    perf_runs = space.run_perf[:, [PERF_FIELDS.index(f) for f in FILE_FIELDS]]
    o = a.option
    run = space.opt_run[o]
    # One run whose shards do not move: every field is the same on every shard.
    same = (space.opt_runs[o] == 1) & ((space.run_len[run] == 1) | (space.run_step[run] == 0).all(1))
    size1, offset1 = space.run_size[run].tolist(), space.run_offset[run].tolist()
    mem1, perf1 = space.run_mem[run].tolist(), perf_runs[run].tolist()
    listed = o[~same]
    sizes, offsets = (x.tolist() for x in space.geometry(listed))
    mem = space.expand_options(listed, space.run_mem).T.tolist()
    perf = space.expand_options(listed, perf_runs).tolist()
    out, at = {}, 0
    for t, (table, ranks) in enumerate(zip(space.tables, a.ranks)):
        if same[t]:
            hbm, ddr, ssd = mem1[t]
            e = TableEstimates(ranks.tolist(), [size1[t]], [offset1[t]], [hbm], [ddr], [ssd], [perf1[t]])
        else:
            end = at + len(ranks)
            e = TableEstimates.compact(ranks.tolist(), sizes=sizes[at:end], offsets=offsets[at:end], hbm=mem[0][at:end],
                                       ddr=mem[1][at:end], ssd=mem[2][at:end], perf=perf[at:end])
            at = end
        out.setdefault(table.path, {})[table.name] = e
    return out
