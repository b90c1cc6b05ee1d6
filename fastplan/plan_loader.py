"""`FastPlanLoader`: TorchRec's `PlanLoader` over a fastplan plan file, so a stock
`EmbeddingShardingPlanner(plan_loader=FastPlanLoader("model.plan"))` uses a plan fastplan made."""

from __future__ import annotations

import os
from typing import Dict, Optional, Union

import torch
from torch import nn
from torchrec.distributed.planner.enumerators import get_partition_by_type
from torchrec.distributed.planner.types import Perf, PlanLoader, PlannerError, PlannerErrorType, Shard, ShardingOption, Storage

from fastplan.planfile import PERF_FIELDS, PlanFile, load_plan


class FastPlanLoader(PlanLoader):
    """Serves a plan file's shards (placement and fastplan's per-shard estimates) to TorchRec, which
    matches them to its own enumerated options by table, sharding type, kernel and shard count.

    `context_hash`: TorchRec's `hash_planner_context_inputs_str()` of the planner the plan was made
    for, if you want TorchRec to refuse a plan from another context (None: TorchRec skips that check)."""

    def __init__(self, source: Union[str, os.PathLike, PlanFile], context_hash: Optional[str] = None) -> None:
        self._file = source if isinstance(source, PlanFile) else load_plan(source)
        self._id = self._file.key if isinstance(source, PlanFile) else str(source)
        self._context_hash = context_hash

    def get_plan_id(self) -> Optional[str]:
        return self._id

    def plan_context_hash(self) -> Optional[str]:
        return self._context_hash

    def load(self) -> Dict[int, ShardingOption]:
        estimates = self._file.estimates
        if estimates is None:
            raise PlannerError(
                f"plan {self._id} has no per-shard estimates; write it with 'fastplan plan --out' "
                "(or dump_plan(..., estimates=...))", PlannerErrorType.PLAN_LOADING_FAILED,
            )
        placeholder = nn.Module()
        out: Dict[int, ShardingOption] = {}
        for path, tables in self._file.plan.plan.items():
            for name, ps in tables.items():
                e = estimates.get(path, {}).get(name)
                if e is None:
                    raise PlannerError(f"plan {self._id}: table '{name}' ({path or 'root module'}) has no shard estimates",
                                       PlannerErrorType.PLAN_LOADING_FAILED)
                shape = [max(o + s for o, s in zip(dim_o, dim_s)) for dim_o, dim_s in zip(zip(*e.offsets), zip(*e.sizes))]
                shards = [
                    Shard(size=list(size), offset=list(offset), rank=rank, storage=Storage(hbm=hbm, ddr=ddr, ssd=ssd),
                          perf=Perf(**dict(zip(PERF_FIELDS, perf))))
                    for rank, size, offset, hbm, ddr, ssd, perf in e.rows()
                ]
                option = ShardingOption(
                    name=name, tensor=torch.empty(shape, device="meta"), module=(path, placeholder), input_lengths=[],
                    batch_size=0, sharding_type=ps.sharding_type, partition_by=get_partition_by_type(ps.sharding_type),
                    compute_kernel=ps.compute_kernel, cache_params=ps.cache_params, is_pooled=True, shards=shards,
                )
                out[option.storage_hash()] = option
        return out
