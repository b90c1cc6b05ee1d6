"""`FastShardingPlanner.replan` / `collective_replan`: a plan for changed tables or world size that
starts from a previous plan, with a `PlanDiff` of what moves. Cached like `plan`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Dict, List, Optional, Tuple

import torch.distributed as dist
from torch import nn
from torchrec.distributed.types import ModuleSharder, ShardingPlan

from fastplan.planner.diff import PlanDiff, TableState, diff_plans, table_key, table_state
from fastplan.planner.plan_builder import to_sharding_plan
from fastplan.planner.replan_search import ReplanConfig, ReplanResult, replan_search
from fastplan.planner.search import SearchResult
from fastplan.planner.stats import PlanReport, build_report
from fastplan.planner.tables import check_constraint_tables, check_constraint_values, collect_tables

REPLAN_VERSION = "fastplan-replan-1"  # bump when the replan search changes plans


@dataclasses.dataclass
class ReplanReport(PlanReport):
    """A `PlanReport` of a replanned plan, with what planning from scratch would have given."""

    moved_bytes: Optional[int] = None  # as the search counted them
    scratch_max_rank_perf: Optional[float] = None
    scratch_moved_bytes: Optional[int] = None


def _diff(previous: ShardingPlan, plan: ShardingPlan, states: Dict[str, TableState], world_size: int,
          report: PlanReport) -> PlanDiff:
    """The diff is recomputed from the plans (also on a cache hit); perf comes from the report."""
    diff = diff_plans(previous, plan, states, world_size=world_size)
    diff.rank_perf = [r.perf for r in report.ranks]
    diff.scratch_max_rank_perf = getattr(report, "scratch_max_rank_perf", None)
    diff.scratch_moved_bytes = getattr(report, "scratch_moved_bytes", None)
    return diff


def _check_previous(previous: ShardingPlan) -> None:
    if not isinstance(previous, ShardingPlan):
        raise TypeError(f"replan: previous_plan must be a torchrec ShardingPlan, got {type(previous).__name__}")
    for path, module_plan in previous.plan.items():
        for name, ps in module_plan.items():
            ranks = list(ps.ranks or [])
            if not ranks or any((not isinstance(r, int)) or r < 0 for r in ranks):
                raise ValueError(f"replan: previous plan, table '{table_key(path, name)}': ranks {ranks} are not ranks")


def _cache_key(planner, module, sharders, tables, previous: ShardingPlan, mode: Tuple, config: ReplanConfig) -> str:
    from fastplan.cache.agreement import plan_hash, table_digests
    from fastplan.cache.fingerprint import canonical, plan_fingerprint, reservation_inputs

    base = plan_fingerprint(
        tables, planner._topology, reservation_inputs(planner._storage_reservation, module, planner._reserve, sharders),
        planner._batch_size, sharders, planner._constraints, planner._search_config,
    )
    doc = [REPLAN_VERSION, base, plan_hash(table_digests(previous)), canonical(mode), canonical(config)]
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


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
    if planner._delegate is not None or planner._callbacks:
        raise ValueError(
            "replan needs fastplan's own search: this planner hands planning to TorchRec (proposer, partitioner "
            "or plan_loader) or runs callbacks, which could move shards behind the move accounting"
        )
    _check_previous(previous)
    config = config or ReplanConfig()
    check_constraint_values(planner._constraints)
    topo = planner._topology
    tables = collect_tables(module, sharders, topo.compute_device, planner._batch_size, planner._constraints)
    check_constraint_tables(planner._constraints, tables)
    states: Dict[str, TableState] = {table_key(t.path, t.name): table_state(t) for t in tables}
    if not tables:
        return ShardingPlan({}), diff_plans(previous, ShardingPlan({}), states, world_size=topo.world_size)
    key = None
    cache = planner.cache
    if cache is not None and cache.enabled and not (planner._stats or planner._enumerator is not None):
        key = _cache_key(planner, module, sharders, tables, previous, (max_moved_bytes, max_slowdown), config)
        hit = cache.get(key)
        if hit is None:
            with cache.lock(key):
                hit = cache.get(key)
                if hit is None:
                    return _replan_tables(planner, module, sharders, tables, states, previous, max_moved_bytes,
                                          max_slowdown, config, start, key)
        plan, report = hit
        report.planning_seconds = time.perf_counter() - start
        report.source = "cache"
        planner._finish(report)
        return plan, _diff(previous, plan, states, topo.world_size, report)
    return _replan_tables(planner, module, sharders, tables, states, previous, max_moved_bytes, max_slowdown,
                          config, start, key)


def _replan_tables(planner, module, sharders, tables, states, previous, max_moved_bytes, max_slowdown, config,
                   start: float, key: Optional[str]) -> Tuple[ShardingPlan, PlanDiff]:
    topo = planner._topology
    hbm_cap, ddr_cap = planner._reserve(module, sharders)
    space = planner._search_space(module, sharders, tables)
    result: ReplanResult = replan_search(
        space, hbm_cap, ddr_cap, previous, [states[table_key(t.path, t.name)] for t in tables],
        max_moved_bytes, max_slowdown, planner._search_config, config,
    )
    plan = to_sharding_plan(space, result.assignment, topo.compute_device)
    scratch = result.scratch
    summary = SearchResult(result.assignment, result.loads, scratch.greedy_makespan, scratch.lower_bound,
                           {**scratch.stats, **result.stats})
    base = build_report(space, summary, hbm_cap, ddr_cap, time.perf_counter() - start)
    report = ReplanReport(**{f.name: getattr(base, f.name) for f in dataclasses.fields(PlanReport)},
                          moved_bytes=result.moved, scratch_max_rank_perf=scratch.makespan,
                          scratch_moved_bytes=result.scratch_moved)
    report.source = f"replanned ({result.source})"
    if key is not None:
        planner.cache.put(key, plan, report)
    planner._finish(report)
    return plan, _diff(previous, plan, states, topo.world_size, report)


class _Replanning:
    """What `agree_on_plan` needs of a planner (`plan(module, sharders)`), answered by `replan`."""

    def __init__(self, planner, previous: ShardingPlan, kwargs: dict) -> None:
        self._planner = planner
        self._previous = previous
        self._kwargs = kwargs
        self._timeout_seconds = planner._timeout_seconds
        self.diff: Optional[PlanDiff] = None

    def plan(self, module, sharders) -> ShardingPlan:
        plan, self.diff = replan(self._planner, module, sharders, self._previous, **self._kwargs)
        return plan


def collective_replan(planner, module, sharders, previous: ShardingPlan, pg: Optional[dist.ProcessGroup],
                      **kwargs) -> Tuple[ShardingPlan, PlanDiff]:
    """`replan` on every rank, then the same hash agreement as `collective_plan`."""
    from fastplan.cache.agreement import agree_on_plan

    if pg is None:
        if not dist.is_initialized():
            raise RuntimeError("collective_replan needs an initialized process group (or use replan())")
        pg = dist.GroupMember.WORLD
    call = _Replanning(planner, previous, kwargs)
    plan = agree_on_plan(call, module, sharders, pg)
    return plan, call.diff
