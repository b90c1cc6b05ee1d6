"""`FastShardingPlanner`: a drop-in for TorchRec's `EmbeddingShardingPlanner` that plans in bulk."""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner.constants import BATCH_SIZE, DEFAULT_PERF_ESTIMATOR
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.estimator import EmbeddingPerfEstimatorFactory
from torchrec.distributed.planner.planners import EmbeddingShardingPlanner, to_sharding_plan as trec_to_sharding_plan
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    Enumerator,
    ParameterConstraints,
    Partitioner,
    PerfModel,
    PlanLoader,
    Proposer,
    ShardingOption,
    Stats,
    StorageReservation,
    Topology,
)
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingPlanner

from fastplan.planner.cost import CostModel, fast_model_applies, storage_usage_supported
from fastplan.planner.plan_builder import to_sharding_options, to_sharding_plan
from fastplan.planner.search import SearchConfig, search
from fastplan.planner.search_space import SearchSpace, build_search_space, from_sharding_options
from fastplan.planner.stats import PlanReport, build_report
from fastplan.planner.tables import TableInfo, check_constraint_tables, check_constraint_values, collect_tables

logger = logging.getLogger("fastplan")
_DEFAULT_CACHE = object()


def default_topology() -> Topology:
    """The topology TorchRec's planner assumes when none is given (needs an initialized process group)."""
    from torchrec.distributed.comm import get_local_size
    from torchrec.distributed.utils import get_device_type

    return Topology(local_world_size=get_local_size(), world_size=dist.get_world_size(), compute_device=get_device_type())


class FastShardingPlanner(ShardingPlanner):
    """Plans like `EmbeddingShardingPlanner` (same arguments, same `ShardingPlan`), in about a second
    for hundreds of tables, and caches plans on disk.

    fastplan's own search replaces TorchRec's proposers, partitioner and perf model. If a `proposer`,
    `partitioner` or `plan_loader` is given, planning is handed to TorchRec's planner with the same
    arguments, so those objects keep their meaning. A custom `enumerator` (or a perf config that the
    vectorized model does not re-derive) is used as is, at TorchRec's speed.

    Extra keyword arguments: `cache` (a `fastplan.PlanCache`, default one under `~/.cache/fastplan`,
    `None`/`False` to disable), `search_config` (`SearchConfig`), `inference_comm` (a
    `fastplan.comm.BLSConfig` recorded on the planner for `wire_bls`).
    """

    def __init__(
        self,
        topology: Optional[Topology] = None,
        batch_size: Optional[int] = None,
        enumerator: Optional[Enumerator] = None,
        storage_reservation: Optional[StorageReservation] = None,
        proposer: Optional[Union[Proposer, List[Proposer]]] = None,
        partitioner: Optional[Partitioner] = None,
        performance_model: Optional[PerfModel] = None,
        stats: Optional[Union[Stats, List[Stats]]] = None,
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
        debug: bool = True,
        callbacks: Optional[List[Callable[[List[ShardingOption]], List[ShardingOption]]]] = None,
        timeout_seconds: Optional[int] = None,
        plan_loader: Optional[PlanLoader] = None,
        *,
        cache: object = _DEFAULT_CACHE,
        search_config: Optional[SearchConfig] = None,
        inference_comm: object = None,
    ) -> None:
        if timeout_seconds is not None and timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds}")
        self._topology = topology if topology is not None else default_topology()
        self._batch_size = batch_size if batch_size else BATCH_SIZE
        self._enumerator = enumerator
        self._storage_reservation = storage_reservation or HeuristicalStorageReservation(percentage=0.15)
        self._performance_model = performance_model
        self._stats = [stats] if stats is not None and not isinstance(stats, list) else (stats or [])
        self._constraints = constraints
        self._debug = debug
        self._callbacks = list(callbacks or [])
        self._timeout_seconds = timeout_seconds
        self._search_config = search_config or SearchConfig()
        self.inference_comm = inference_comm
        self._delegate: Optional[EmbeddingShardingPlanner] = None
        if proposer is not None or partitioner is not None or plan_loader is not None:
            self._delegate = EmbeddingShardingPlanner(
                topology=self._topology, batch_size=self._batch_size, enumerator=enumerator,
                storage_reservation=self._storage_reservation, proposer=proposer, partitioner=partitioner,
                performance_model=performance_model, stats=stats, constraints=constraints, debug=debug,
                callbacks=callbacks, timeout_seconds=timeout_seconds, plan_loader=plan_loader,
            )
        if cache is _DEFAULT_CACHE:
            from fastplan.cache import PlanCache

            cache = PlanCache.default()
        self.cache = cache or None
        self.last_report: Optional[PlanReport] = None
        self.last_key: Optional[str] = None

    @property
    def topology(self) -> Topology:
        return self._topology

    # ---- public API --------------------------------------------------------------------------
    def collective_plan(
        self,
        module: nn.Module,
        sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
        pg: Optional[dist.ProcessGroup] = None,
    ) -> ShardingPlan:
        """Plan on every rank (deterministic, cached), then agree on a plan hash without any rank
        waiting in a collective while another is still planning. See `fastplan.cache.agreement`."""
        from fastplan.cache.agreement import agree_on_plan

        if pg is None:
            if not dist.is_initialized():
                raise RuntimeError(
                    "collective_plan needs an initialized process group: call "
                    "torch.distributed.init_process_group() first, or use plan()"
                )
            pg = dist.GroupMember.WORLD
        sharders = sharders if sharders is not None else get_default_sharders()
        return agree_on_plan(self, module, sharders, pg)

    def plan(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> ShardingPlan:
        start = time.perf_counter()
        if self._delegate is not None:
            return self._delegate.plan(module, sharders)
        check_constraint_values(self._constraints)
        tables = collect_tables(module, sharders, self._topology.compute_device, self._batch_size, self._constraints)
        check_constraint_tables(self._constraints, tables)
        if not tables:
            self.last_report = None
            return ShardingPlan({})
        key = None
        # Callbacks, Stats objects and custom enumerators are opaque inputs: plan without the cache.
        cacheable = not (self._callbacks or self._stats or self._enumerator is not None)
        if self.cache is not None and self.cache.enabled and cacheable:
            from fastplan.cache.fingerprint import plan_fingerprint, reservation_inputs

            key = plan_fingerprint(
                tables, self._topology, reservation_inputs(self._storage_reservation, module, self._reserve, sharders),
                self._batch_size, sharders, self._constraints, self._search_config,
            )
            self.last_key = key
            hit = self.cache.get(key)
            if hit is None:
                with self.cache.lock(key):  # concurrent planners of one key: one computes, others read
                    hit = self.cache.get(key)
                    if hit is None:
                        return self._plan_tables(module, sharders, tables, start, key)
            plan, report = hit
            report.planning_seconds = time.perf_counter() - start
            report.source = "cache"
            self._finish(report)
            return plan
        return self._plan_tables(module, sharders, tables, start, key)

    def _reserve(self, module: nn.Module, sharders) -> Tuple[np.ndarray, np.ndarray]:
        """Per-rank (hbm, ddr) bytes left for embeddings after the storage reservation."""
        reserved = self._storage_reservation.reserve(
            topology=self._topology, batch_size=self._batch_size, module=module,
            sharders=sharders, constraints=self._constraints,
        )
        hbm = np.array([d.storage.hbm for d in reserved.devices], dtype=np.int64)
        ddr = np.array([d.storage.ddr for d in reserved.devices], dtype=np.int64)
        return hbm, ddr

    def _plan_tables(self, module, sharders, tables, start: float, key: Optional[str]) -> ShardingPlan:
        hbm_cap, ddr_cap = self._reserve(module, sharders)
        space = self._search_space(module, sharders, tables)
        result = search(space, hbm_cap, ddr_cap, self._search_config, self._timeout_seconds)
        if self._callbacks or self._stats:
            options = to_sharding_options(space, result.assignment, self._batch_size)
            for callback in self._callbacks:
                options = callback(options)
            plan = trec_to_sharding_plan(options, self._topology)
        else:
            options = None
            plan = to_sharding_plan(space, result.assignment, self._topology.compute_device)
        report = build_report(space, result, hbm_cap, ddr_cap, time.perf_counter() - start)
        for stat in self._stats:
            stat.log(
                sharding_plan=plan, topology=self._topology, batch_size=self._batch_size,
                storage_reservation=self._storage_reservation, num_proposals=1, num_plans=1,
                run_time=report.planning_seconds, best_plan=options or [], constraints=self._constraints,
                sharders=sharders, debug=self._debug,
            )
        if key is not None:
            self.cache.put(key, plan, report)
        self._finish(report)
        return plan

    # ---- internals ---------------------------------------------------------------------------
    def _finish(self, report: PlanReport) -> None:
        self.last_report = report
        if self._debug:
            logger.info("\n%s", report.table())

    def _search_space(self, module: nn.Module, sharders, tables: List[TableInfo]) -> SearchSpace:
        topo = self._topology
        if self._enumerator is None:
            estimator = EmbeddingPerfEstimatorFactory.create(
                DEFAULT_PERF_ESTIMATOR, topology=topo, constraints=self._constraints
            )
            custom_memory = topo._custom_topology_data is not None and topo._custom_topology_data.has_data(
                "hbm_cap" if topo.compute_device in ("cuda", "mtia") else "ddr_cap"
            )
            if (
                fast_model_applies(estimator.config)
                and not custom_memory
                and all(storage_usage_supported(t) and not t.needs_torchrec_estimator() for t in tables)
            ):
                return build_search_space(tables, CostModel(topo, estimator.config))
        enumerator = self._enumerator or EmbeddingEnumerator(
            topology=topo, batch_size=self._batch_size, constraints=self._constraints
        )
        options = enumerator.enumerate(module=module, sharders=sharders)
        return from_sharding_options(tables, options, topo.world_size, topo.local_world_size)

    # ---- re-planning (fastplan.planner.replan) -----------------------------------------------
    def replan(
        self,
        module: nn.Module,
        sharders: List[ModuleSharder[nn.Module]],
        previous_plan: ShardingPlan,
        *,
        max_moved_bytes: Optional[int] = None,
        max_slowdown: float = 0.01,
    ):
        """A plan for `module` that starts from `previous_plan` and the `PlanDiff` between them.

        `max_moved_bytes=None`: fewest moved bytes (weights + optimizer state) with max-rank perf
        within `max_slowdown` of a from-scratch plan. Otherwise: lowest max-rank perf moving at most
        `max_moved_bytes` (0 keeps every unchanged table exactly where it was)."""
        from fastplan.planner.replan import replan

        return replan(self, module, sharders, previous_plan, max_moved_bytes, max_slowdown)

    def collective_replan(
        self,
        module: nn.Module,
        sharders: Optional[List[ModuleSharder[nn.Module]]],
        previous_plan: ShardingPlan,
        pg: Optional[dist.ProcessGroup] = None,
        *,
        max_moved_bytes: Optional[int] = None,
        max_slowdown: float = 0.01,
    ):
        """`replan` on every rank, ranks agree on the plan hash as in `collective_plan`."""
        from fastplan.planner.replan import collective_replan

        sharders = sharders if sharders is not None else get_default_sharders()
        return collective_replan(self, module, sharders, previous_plan, pg,
                                 max_moved_bytes=max_moved_bytes, max_slowdown=max_slowdown)
