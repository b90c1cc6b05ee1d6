"""Planning: table discovery, the vectorized TorchRec cost model, search, and the planner itself."""

from fastplan.planner.errors import ConstraintError, InfeasiblePlanError
from fastplan.planner.planner import FastShardingPlanner
from fastplan.planner.search import SearchConfig
from fastplan.planner.stats import PlanReport

__all__ = ["ConstraintError", "FastShardingPlanner", "InfeasiblePlanError", "PlanReport", "SearchConfig"]
