"""`FastShardingPlanner.replan` / `collective_replan`: a plan for changed tables or world size that
starts from a previous plan, with a `PlanDiff` of what moves. Cached like `plan`."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch.distributed as dist
from torch import nn
from torchrec.distributed.types import ModuleSharder, ShardingPlan

from fastplan.planner.diff import PlanDiff, TableState, diff_plans, table_key, table_state
from fastplan.planner.enumerator import FastEnumerator
from fastplan.planner.errors import InfeasiblePlanError
from fastplan.planner.plan_builder import to_sharding_plan
from fastplan.planner.replan_search import ReplanConfig, ReplanResult, replan_search
from fastplan.planner.search import SearchResult
from fastplan.planner.stats import PlanReport, build_report
from fastplan.planner.tables import check_constraint_values

if TYPE_CHECKING:
    from fastplan.cache.fingerprint import PlanInputs

REPLAN_VERSION = "fastplan-replan-2"  # bump when the replan search changes plans


def _diff(previous: ShardingPlan, plan: ShardingPlan, states: Dict[str, TableState], world_size: int,
          report: Optional[PlanReport]) -> PlanDiff:
    """The diff is recomputed from the plans (also on a cache hit); perf comes from the report."""
    diff = diff_plans(previous, plan, states, world_size=world_size)
    if report is not None:
        diff.rank_perf = [r.perf for r in report.ranks]
        diff.scratch_max_rank_perf = report.scratch_makespan
        diff.scratch_moved_bytes = report.scratch_moved_bytes
    return diff


def _check_previous(previous: ShardingPlan) -> None:
    if not isinstance(previous, ShardingPlan):
        raise TypeError(f"replan: previous_plan must be a torchrec ShardingPlan, got {type(previous).__name__}")
    for path, module_plan in previous.plan.items():
        for name, ps in module_plan.items():
            ranks = list(ps.ranks or [])
            if not ranks or any((not isinstance(r, int)) or r < 0 for r in ranks):
                raise ValueError(f"replan: previous plan, table '{table_key(path, name)}': ranks {ranks} are not ranks")


def _inputs(planner, module, sharders, previous: ShardingPlan, max_moved_bytes: Optional[int],
            max_slowdown: float, config: ReplanConfig) -> "PlanInputs":
    """`planning_inputs` with the previous plan and the replan settings added to the shared section."""
    import msgspec

    from fastplan.cache.agreement import plan_hash
    from fastplan.cache.fingerprint import PlanInputs, canonical_json
    from fastplan.planfile import table_digests

    inputs = planner.planning_inputs(module, sharders)
    shared = msgspec.json.decode(inputs.shared)
    shared["replan"] = {"version": REPLAN_VERSION, "previous": plan_hash(table_digests(previous)), "max_moved_bytes": max_moved_bytes,
                        "max_slowdown": max_slowdown, "config": asdict(config)}
    return PlanInputs(canonical_json(shared), inputs.tables)


def replan(
    planner,
    module: nn.Module,
    sharders: List[ModuleSharder[nn.Module]],
    previous: ShardingPlan,
    max_moved_bytes: Optional[int] = None,
    max_slowdown: float = 0.01,
    config: Optional[ReplanConfig] = None,
) -> Tuple[ShardingPlan, PlanDiff]:
    start = time.perf_counter()
    if planner._use_torchrec_loop or planner._callbacks or planner._rank_by_perf_model:
        raise ValueError(
            "replan needs fastplan's own search: this planner hands planning to TorchRec (proposer, partitioner "
            "or plan_loader), ranks plans by a performance model, or runs callbacks, which could move shards "
            "behind the move accounting"
        )
    if not isinstance(planner._enumerator, FastEnumerator):
        raise ValueError("replan needs fastplan's FastEnumerator (a custom enumerator was given)")
    grid = sorted(n for n, c in (planner._constraints or {}).items() if c.sharding_types and "grid_shard" in c.sharding_types)
    if grid:
        raise ValueError(f"replan: constraints of {grid} ask for grid_shard, which fastplan does not model "
                         "(plan() hands those to TorchRec's search, which cannot count moved bytes)")
    _check_previous(previous)
    config = config or ReplanConfig()
    check_constraint_values(planner._constraints)
    world = planner._topology.world_size
    tables = planner._enumerator.collect(module, sharders)
    states: Dict[str, TableState] = {table_key(t.path, t.name): table_state(t) for t in tables}
    planner.last_plan_file = None
    if not tables:
        planner.last_report = None
        return ShardingPlan({}), diff_plans(previous, ShardingPlan({}), states, world_size=world)
    cache = planner.cache
    cacheable = cache is not None and not (planner._custom_stats() or planner._enumerator._custom_estimator)
    if not cacheable:
        return _replan_tables(planner, module, sharders, tables, states, previous, max_moved_bytes, max_slowdown,
                              config, start, None)
    inputs = _inputs(planner, module, sharders, previous, max_moved_bytes, max_slowdown, config)
    planner.last_key = inputs.key
    hit = cache.get(inputs.key)
    if hit is None:
        with cache.lock(inputs.key):
            hit = cache.get(inputs.key)
            if hit is None:
                return _replan_tables(planner, module, sharders, tables, states, previous, max_moved_bytes,
                                      max_slowdown, config, start, inputs)
    hit.inputs = inputs.to_raw()
    planner.last_plan_file = hit
    planner._from_cache(module, sharders, hit.plan)
    if hit.report is not None:
        hit.report.planning_seconds = time.perf_counter() - start
        hit.report.source = "cache"
    planner._finish(hit.report)
    return hit.plan, _diff(previous, hit.plan, states, world, hit.report)


def _replan_tables(planner, module, sharders, tables, states, previous, max_moved_bytes, max_slowdown, config,
                   start: float, inputs: Optional["PlanInputs"]) -> Tuple[ShardingPlan, PlanDiff]:
    from fastplan.planner.plan_builder import to_sharding_options

    topo = planner._topology
    cap = planner._reserve(module, sharders)
    space = planner._search_space(module, sharders, tables)
    timeout = planner._timeout_seconds
    deadline = None if timeout is None else time.monotonic() + timeout - (time.perf_counter() - start)
    try:
        result: ReplanResult = replan_search(
            space, cap, previous, [states[table_key(t.path, t.name)] for t in space.tables], max_moved_bytes,
            max_slowdown, planner._search_config.scaled_to(timeout), config, deadline,
        )
    except InfeasiblePlanError as e:
        raise InfeasiblePlanError(f"{e}\n{planner._reservation_note()}", e.error_type, e.proven) from None
    plan = to_sharding_plan(space, result.assignment, topo.compute_device)
    options = to_sharding_options(space, result.assignment, planner._batch_size)
    planner._best_plan = options
    planner._num_proposals = planner._num_plans = 1
    scratch = result.scratch
    summary = SearchResult(result.assignment, result.loads, scratch.greedy_makespan, scratch.lower_bound,
                           {**scratch.stats, **result.stats})
    report = build_report(space, summary, cap[:, 0], cap[:, 1], time.perf_counter() - start)
    report.moved_bytes, report.scratch_makespan, report.scratch_moved_bytes = (
        result.moved, scratch.makespan, result.scratch_moved)
    report.source = f"replanned ({result.source})"
    planner._record(plan, report, options, sharders, inputs)
    return plan, _diff(previous, plan, states, topo.world_size, report)


class _Replanning:
    """What `agree_on_plan` needs of a planner (`plan`, `planning_inputs`), answered by `replan`."""

    def __init__(self, planner, previous: ShardingPlan, kwargs: dict) -> None:
        self._planner = planner
        self._previous = previous
        self._kwargs = kwargs
        self._timeout_seconds = planner._timeout_seconds
        self.diff: Optional[PlanDiff] = None

    def plan(self, module, sharders) -> ShardingPlan:
        plan, self.diff = replan(self._planner, module, sharders, self._previous, **self._kwargs)
        return plan

    def planning_inputs(self, module, sharders) -> "PlanInputs":
        kw = self._kwargs
        return _inputs(self._planner, module, sharders, self._previous, kw.get("max_moved_bytes"),
                       kw.get("max_slowdown", 0.01), kw.get("config") or ReplanConfig())


def collective_replan(planner, module, sharders, previous: ShardingPlan, pg: Optional[dist.ProcessGroup],
                      timeout: Optional[float] = None, **kwargs) -> Tuple[ShardingPlan, PlanDiff]:
    """`replan` on every rank, then the same hash agreement as `collective_plan`."""
    from fastplan.cache.agreement import DEFAULT_AGREEMENT_TIMEOUT_S, agree_on_plan

    if pg is None:
        if not dist.is_initialized():
            raise RuntimeError("collective_replan needs an initialized process group (or use replan())")
        pg = dist.GroupMember.WORLD
    call = _Replanning(planner, previous, kwargs)
    plan = agree_on_plan(call, module, sharders, pg, DEFAULT_AGREEMENT_TIMEOUT_S if timeout is None else timeout)
    return plan, call.diff
