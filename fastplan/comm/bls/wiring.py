"""From a plan to a skew-tolerant sharded inference loop: a BLS group, DMP on it, the lag-L pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan

from fastplan.comm.bls.collective import new_bls_group
from fastplan.comm.bls.pipeline import BLSInferencePipeline


@dataclass(frozen=True)
class BLSConfig:
    """Inference communication settings a planner can carry: `FastShardingPlanner(inference_comm=BLSConfig(2))`."""

    lag: int = 2
    timeout_s: float = 60.0


def wire_bls(
    model: nn.Module,
    plan_or_planner: Union[ShardingPlan, object],
    lag: Optional[int] = None,
    sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
    timeout_s: Optional[float] = None,
    sparse_attr: str = "sparse",
    dense_attr: str = "dense",
) -> BLSInferencePipeline:
    """Shard `model` (which has `model.<sparse_attr>`, an EmbeddingBagCollection, and a
    `model.<dense_attr>(dense_input, pooled)` method) on a new BLS group and return its pipeline.

    `plan_or_planner` is a `ShardingPlan`, or a `FastShardingPlanner` whose `inference_comm`
    (a `BLSConfig`) supplies the lag; the planner then runs `collective_plan` (every rank calls this).
    """
    sharders = sharders or [EmbeddingBagCollectionSharder()]
    config = getattr(plan_or_planner, "inference_comm", None)
    if lag is None:
        if not isinstance(config, BLSConfig):
            raise ValueError("wire_bls needs lag=..., or a planner built with inference_comm=BLSConfig(lag)")
        lag = config.lag
    if timeout_s is None:
        timeout_s = config.timeout_s if isinstance(config, BLSConfig) else BLSConfig().timeout_s
    plan = plan_or_planner if isinstance(plan_or_planner, ShardingPlan) else plan_or_planner.collective_plan(model, sharders)
    group = new_bls_group(lag, timeout_s=timeout_s)
    dmp = DistributedModelParallel(
        model, device=torch.device("cpu"), plan=plan, sharders=sharders, env=ShardingEnv.from_process_group(group)
    )
    dmp.eval()
    inner = dmp.module
    pipeline = BLSInferencePipeline(getattr(inner, sparse_attr), getattr(inner, dense_attr), lag, group=group)
    pipeline.dmp = dmp
    return pipeline
