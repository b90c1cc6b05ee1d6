"""`FastShardingPlanner`: TorchRec's `EmbeddingShardingPlanner`, planning in bulk.

It *is* an `EmbeddingShardingPlanner` (same constructor, attributes, hashing, stats and errors),
with `plan()` replaced: tables -> options as arrays (`FastEnumerator`) -> assignment (`search`)
-> `ShardingPlan` (`plan_builder`), cached on disk. A `proposer`, `partitioner` or `plan_loader`
given by the user hands planning to TorchRec's own loop, so those keep their meaning.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Union

import numpy as np
import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner.perf_models import NoopPerfModel
from torchrec.distributed.planner.planners import EmbeddingShardingPlanner, to_sharding_plan as trec_to_sharding_plan
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
from torchrec.distributed.types import ModuleSharder, ShardingPlan

from fastplan.planner.bound import DEFAULT_TIME_S, plan_bound
from fastplan.planner.enumerator import FastEnumerator
from fastplan.planner.errors import InfeasiblePlanError
from fastplan.planner.plan_builder import estimates_from_space, to_sharding_options, to_sharding_plan
from fastplan.planner.reservation import reserve
from fastplan.planner.search import SearchConfig, SearchResult, search
from fastplan.planner.search_space import SearchSpace, from_sharding_options
from fastplan.planner.stats import PlanReport, build_report
from fastplan.planner.tables import (
    ShardedModule, TableInfo, check_constraint_values, shardable_names, sharded_modules, unknown_constraint_tables,
)

if TYPE_CHECKING:
    from fastplan.cache.fingerprint import PlanInputs
    from fastplan.planfile import PlanFile

logger = logging.getLogger("fastplan")
_DEFAULT_CACHE = object()


class FastShardingPlanner(EmbeddingShardingPlanner):
    """Plans like `EmbeddingShardingPlanner` (same arguments, same `ShardingPlan`, never worse on
    TorchRec's cost model), in about a second for thousands of tables, and caches plans on disk.

    A custom `enumerator` is used as is (its options costed by whatever estimators it has). A
    `performance_model` ranks fastplan's candidate plans. Extra keyword arguments: `cache` (a
    `fastplan.PlanCache`, default one under `~/.cache/fastplan`, `None`/`False` to disable),
    `search_config` (`SearchConfig`), `inference_comm` (a `fastplan.comm.BLSConfig` recorded on the
    planner for `wire_bls`).
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
        self._pending = None
        if topology is None:
            topology = default_topology()
        if enumerator is None:
            enumerator = FastEnumerator(topology, batch_size or _batch_size_default(), constraints)
        super().__init__(
            topology=topology, batch_size=batch_size, enumerator=enumerator, storage_reservation=storage_reservation,
            proposer=proposer, partitioner=partitioner, performance_model=performance_model, stats=stats,
            constraints=constraints, debug=debug, callbacks=callbacks, timeout_seconds=timeout_seconds,
            plan_loader=plan_loader,
        )
        # TorchRec's search loop keeps a user's proposer, partitioner or plan loader meaningful.
        self._use_torchrec_loop = proposer is not None or partitioner is not None or plan_loader is not None
        self._rank_by_perf_model = performance_model is not None and not isinstance(performance_model, NoopPerfModel)
        self._search_config = search_config or SearchConfig()
        self.inference_comm = inference_comm
        if cache is _DEFAULT_CACHE:
            from fastplan.cache import PlanCache

            cache = PlanCache.default()
        self.cache = cache or None
        self.last_report: Optional[PlanReport] = None
        self.last_key: Optional[str] = None
        self.last_plan_file: Optional["PlanFile"] = None  # plan, report, inputs, key, estimates of the last cacheable plan

    @property
    def topology(self) -> Topology:
        return self._topology

    # ---- public API --------------------------------------------------------------------------
    def collective_plan(
        self,
        module: nn.Module,
        sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
        pg: Optional[dist.ProcessGroup] = None,
        *,
        timeout: Optional[float] = None,
    ) -> ShardingPlan:
        """Plan on every rank (deterministic, cached), then agree on a plan hash through the process
        group's store without any rank waiting in a collective while another is still planning.
        `timeout` (default `fastplan.cache.agreement.DEFAULT_AGREEMENT_TIMEOUT_S`): seconds the ranks
        wait for one another beyond the search budget `timeout_seconds`, counted from when the first
        rank entered; then every rank raises naming the missing ranks."""
        from fastplan.cache.agreement import DEFAULT_AGREEMENT_TIMEOUT_S, agree_on_plan

        if pg is None:
            if not dist.is_initialized():
                raise RuntimeError(
                    "collective_plan needs an initialized process group: call "
                    "torch.distributed.init_process_group() first, or use plan()"
                )
            pg = dist.GroupMember.WORLD
        sharders = sharders if sharders is not None else get_default_sharders()
        return agree_on_plan(self, module, sharders, pg, DEFAULT_AGREEMENT_TIMEOUT_S if timeout is None else timeout)

    def planning_inputs(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> "PlanInputs":
        """Everything that decides this planner's plan of `module`: the cache key, and what ranks compare."""
        from fastplan.cache.fingerprint import plan_inputs, reservation_inputs

        enumerator = self._enumerator
        exact_order = bool(getattr(enumerator, "_use_exact_enumerate_order", False))
        modules = [ShardedModule.of(path, child, sharder, self._topology.compute_device)
                   for path, child, sharder in sharded_modules(module, sharders, exact_order)]
        reservation = reservation_inputs(self._storage_reservation, module, {id(m.module) for m in modules},
                                         self._reserve, sharders)
        # A FastEnumerator the caller built may have its own constraints, topology and batch size.
        constraints = getattr(enumerator, "_constraints", self._constraints) or {}
        own = {"topology": getattr(enumerator, "_topology", self._topology), "batch_size": getattr(enumerator, "_batch_size", self._batch_size)}
        enumeration = {k: v for k, v in own.items() if v != getattr(self, f"_{k}")}
        return plan_inputs(modules, constraints, exact_order, self._topology, reservation, self._batch_size, sharders,
                           self._search_config, self._timeout_seconds, enumeration)

    def plan(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> ShardingPlan:
        self._num_proposals = 0
        self._num_plans = 0
        if self._use_torchrec_loop:
            self.last_report = None
            return super().plan(module, sharders)
        if _names_unmodelled_sharding(self._constraints):
            return self._plan_with_torchrec_search(module, sharders)
        # Planning allocates many small acyclic objects; with a large model in memory each full
        # collection they trigger walks the whole heap (warm 5,000 tables: 90 ms, 300 ms with it).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._plan(module, sharders)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _plan(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> ShardingPlan:
        start = time.perf_counter()
        check_constraint_values(self._constraints)
        self.last_plan_file = None
        fast = isinstance(self._enumerator, FastEnumerator)
        # Callbacks, custom Stats, perf models and custom enumerators or estimators are opaque inputs:
        # plan without the cache.
        cacheable = fast and self.cache is not None and not (
            self._callbacks or self._rank_by_perf_model or self._custom_stats() or self._enumerator._custom_estimator
        )
        if not cacheable:
            tables = self._enumerator.collect(module, sharders) if fast else None
            self._warn_unknown_constraints(module, sharders, None if tables is None else [t.name for t in tables])
            if fast and not tables:
                self.last_report = None
                return ShardingPlan({})
            return self._plan_tables(module, sharders, tables, start, None)
        inputs = self.planning_inputs(module, sharders)  # read from the module: a hit never collects tables
        self._warn_unknown_constraints(module, sharders, inputs.names)
        if not inputs.names:
            self.last_report = None
            return ShardingPlan({})
        self.last_key = inputs.key
        hit = self.cache.get(inputs.key)
        if hit is None:
            with self.cache.lock(inputs.key):  # concurrent planners of one key: one computes, others read
                hit = self.cache.get(inputs.key)
                if hit is None:
                    return self._plan_tables(module, sharders, self._enumerator.collect(module, sharders), start, inputs)
        self.last_plan_file = hit
        hit.inputs = inputs.to_raw()
        self._from_cache(module, sharders, hit.plan)
        if hit.report is not None:
            hit.report.planning_seconds = time.perf_counter() - start
            hit.report.source = "cache"
        self._finish(hit.report)
        return hit.plan

    def _warn_unknown_constraints(self, module: nn.Module, sharders, names: Optional[List[str]]) -> None:
        if self._constraints and (names is None or not set(self._constraints) <= set(names)):
            unknown = unknown_constraint_tables(self._constraints, shardable_names(module, sharders))
            if unknown:
                logger.warning("fastplan: constraints name tables this module does not have (ignored): %s", unknown)

    # TorchRec's planner state after plan() (`_best_plan`, the enumerator's search space, the
    # reserved topology) is built when first read: a cache hit rebuilds it from the plan, a fresh plan
    # from its search space and assignment, so a planner holds arrays, not thousands of objects.
    @property
    def _best_plan(self) -> Optional[List[ShardingOption]]:
        self._materialize()
        return self._best_plan_value

    @_best_plan.setter
    def _best_plan(self, value: Optional[List[ShardingOption]]) -> None:
        self._best_plan_value = value
        self._pending = None

    def hash_planner_context_inputs(self) -> int:
        self._materialize()
        return super().hash_planner_context_inputs()

    def hash_planner_context_inputs_str(self) -> str:
        self._materialize()
        return super().hash_planner_context_inputs_str()

    def _materialize(self) -> None:
        if self._pending is not None:
            build, self._pending = self._pending, None
            self._best_plan_value = build()

    def _from_cache(self, module, sharders, plan: ShardingPlan) -> None:
        def rebuild() -> List[ShardingOption]:
            from fastplan.planner.plan_builder import assignment_from_plan

            self._reserve(module, sharders)
            space = self._search_space(module, sharders, None)
            return to_sharding_options(space, assignment_from_plan(space, plan), self._batch_size)

        self._best_plan_value, self._pending = None, rebuild
        self._enumerator.defer(self._materialize)
        self._num_proposals = self._num_plans = 1
        # Logging Stats rebuilds every option (~0.1 s at 500 tables, 5x the warm start): done with
        # debug=True (TorchRec's default, which tools reading Stats expect), skipped with debug=False.
        if self._stats and self._debug:
            self._log_stats(plan, self._best_plan, sharders, 0.0)

    # ---- internals ---------------------------------------------------------------------------
    def _plan_with_torchrec_search(self, module: nn.Module, sharders) -> ShardingPlan:
        """TorchRec's own enumerator and search, for sharding types fastplan does not model."""
        from torchrec.distributed.planner.enumerators import EmbeddingEnumerator

        logger.warning("fastplan: a constraint asks for grid_shard, which fastplan does not model: "
                       "planning with TorchRec's own search (slower)")
        self.last_report = None
        fast_enumerator = self._enumerator
        self._enumerator = EmbeddingEnumerator(self._topology, self._batch_size, self._constraints)
        try:
            return super().plan(module, sharders)
        finally:
            self._enumerator = fast_enumerator

    def _custom_stats(self) -> bool:
        from torchrec.distributed.planner.stats import EmbeddingStats, NoopEmbeddingStats

        return any(type(s) not in (EmbeddingStats, NoopEmbeddingStats) for s in self._stats)

    def _reserve(self, module: nn.Module, sharders) -> np.ndarray:
        """(world_size, 3) bytes per rank of hbm, ddr and ssd left for embeddings after the storage
        reservation (which TorchRec keeps as `last_reserved_topology`)."""
        reserved = reserve(self._storage_reservation, self._topology, self._batch_size, module, sharders, self._constraints)
        return np.array([[d.storage.hbm, d.storage.ddr, d.storage.ssd] for d in reserved.devices], dtype=np.int64)

    def _plan_tables(self, module, sharders, tables: Optional[List[TableInfo]], start: float,
                     inputs: Optional["PlanInputs"]) -> ShardingPlan:
        cap = self._reserve(module, sharders)
        space = self._search_space(module, sharders, tables)
        if not space.tables:
            self.last_report = None
            return ShardingPlan({})
        timeout = self._timeout_seconds
        deadline = None if timeout is None else time.monotonic() + timeout - (time.perf_counter() - start)
        config = self._search_config.scaled_to(timeout)
        try:
            result = search(space, cap[:, 0], cap[:, 1], config, deadline, ssd_cap=cap[:, 2])
        except InfeasiblePlanError as e:
            raise InfeasiblePlanError(f"{e}\n{self._reservation_note()}", e.error_type, e.proven) from None
        a = self._choose(space, result)
        # TorchRec ShardingOptions (an object per shard) only for whoever reads them now: callbacks,
        # Stats that log (debug, or custom ones); otherwise built when `_best_plan` is first read.
        options = None
        if self._callbacks or self._debug or self._custom_stats():
            options = to_sharding_options(space, a, self._batch_size)
        for callback in self._callbacks:
            options = callback(options)
        plan = trec_to_sharding_plan(options, self._topology) if self._callbacks else to_sharding_plan(
            space, a, self._topology.compute_device
        )
        if self._callbacks:  # callbacks may have changed the options: keep them
            self._best_plan = options
        else:
            self._best_plan_value, self._pending = None, lambda: to_sharding_options(space, a, self._batch_size)
        self._num_proposals = self._num_plans = 1
        bound = plan_bound(space, cap, _bound_budget(deadline, time.perf_counter() - start), result.makespan,
                           result.lower_bound, result.cands, result.lp, max_options=config.max_lp_options)
        report = build_report(space, result, cap[:, 0], cap[:, 1], time.perf_counter() - start, bound)
        self._record(plan, report, options, sharders, inputs, lambda: estimates_from_space(space, a))
        return plan

    def _record(self, plan: ShardingPlan, report: PlanReport, options: Optional[List[ShardingOption]], sharders,
                inputs: Optional["PlanInputs"], estimates_of=None) -> None:
        """A plan just made: to Stats (skipped without `options`, as on a cache hit with debug=False), to
        its plan file and the cache (when cacheable), then the report."""
        if options is not None:
            self._log_stats(plan, options, sharders, report.planning_seconds)
        if inputs is not None:
            from fastplan.planfile import PlanFile, encode_estimates, estimates_from_options

            estimates = estimates_of() if estimates_of is not None else estimates_from_options(options)
            estimates = encode_estimates(estimates)  # kept as JSON: decoded only if read
            self.last_plan_file = PlanFile(plan, report, inputs.to_raw(), inputs.key, estimates)
            self.cache.put(inputs.key, plan, report=report, estimates=estimates)
        self._finish(report)

    def _log_stats(self, plan: ShardingPlan, options: List[ShardingOption], sharders, run_time: float) -> None:
        for stat in self._stats:
            stat.log(
                sharding_plan=plan, topology=self._topology, batch_size=self._batch_size,
                storage_reservation=self._storage_reservation, num_proposals=1, num_plans=1,
                run_time=run_time, best_plan=options, constraints=self._constraints,
                sharders=sharders, enumerator=self._enumerator, debug=self._debug,
            )

    def _reservation_note(self) -> str:
        """What the storage reservation took, in TorchRec's words."""
        from torchrec.distributed.planner.storage_reservations import FixedAbsoluteStorageReservation
        from torchrec.distributed.planner.utils import bytes_to_gb

        r = self._storage_reservation
        if isinstance(r, FixedAbsoluteStorageReservation):
            return f"Storage reservation: {round(bytes_to_gb(r._hbm_reserved_bytes), 3)} GB per device."
        percentage = getattr(r, "_percentage", None)
        return f"Storage reservation percentage: {percentage} ({type(r).__name__})." if percentage is not None else \
            f"Storage reservation: {type(r).__name__}."

    def _choose(self, space: SearchSpace, result: SearchResult):
        """The search's plan, or with a user's performance model, the candidate it rates best."""
        if not self._rank_by_perf_model:
            return result.assignment
        candidates = [result.assignment] + list(result.candidates.values())
        rated = [(self._perf_model.rate(to_sharding_options(space, a, self._batch_size)), i) for i, a in enumerate(candidates)]
        return candidates[min(rated)[1]]

    def _finish(self, report: Optional[PlanReport]) -> None:
        self.last_report = report
        if self._debug and report is not None:
            logger.info("\n%s", report.table())

    def _search_space(self, module: nn.Module, sharders, tables: Optional[List[TableInfo]]) -> SearchSpace:
        if isinstance(self._enumerator, FastEnumerator):
            return self._enumerator.search_space(module, sharders, tables)
        from fastplan.planner.tables import collect_tables

        topo = self._topology
        options = self._enumerator.enumerate(module=module, sharders=sharders)
        all_tables = collect_tables(module, sharders, topo.compute_device, self._batch_size, self._constraints)
        return from_sharding_options(all_tables, options, topo.world_size, topo.local_world_size, topo.intra_group_size)

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
        timeout: Optional[float] = None,
    ):
        """`replan` on every rank, ranks agree on the plan hash as in `collective_plan` (`timeout` too)."""
        from fastplan.planner.replan import collective_replan

        sharders = sharders if sharders is not None else get_default_sharders()
        return collective_replan(self, module, sharders, previous_plan, pg, timeout,
                                 max_moved_bytes=max_moved_bytes, max_slowdown=max_slowdown)


def _names_unmodelled_sharding(constraints: Optional[Dict[str, ParameterConstraints]]) -> bool:
    return any(c.sharding_types and "grid_shard" in c.sharding_types for c in (constraints or {}).values())


def _bound_budget(deadline: Optional[float], spent: float) -> float:
    """Seconds for the report's LP bound: DEFAULT_TIME_S or a quarter of the time planning took so
    far, whichever is more, at most what is left of the planner's timeout, none if under 0.1 s."""
    budget = max(DEFAULT_TIME_S, 0.25 * spent)
    if deadline is None:
        return budget
    left = deadline - time.monotonic()
    return min(budget, left) if left >= 0.1 else 0.0


def _batch_size_default() -> int:
    from torchrec.distributed.planner.constants import BATCH_SIZE

    return BATCH_SIZE


def default_topology() -> Topology:
    """The topology TorchRec's planner assumes when none is given (needs an initialized process group)."""
    from torchrec.distributed.comm import get_local_size
    from torchrec.distributed.utils import get_device_type

    return Topology(local_world_size=get_local_size(), world_size=dist.get_world_size(), compute_device=get_device_type())
