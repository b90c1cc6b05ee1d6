"""fastplan: fast, cached sharding plans for TorchRec."""

from fastplan.cache import PlanCache, plan_fingerprint
from fastplan.cache.agreement import PlanAgreementTimeout, PlanMismatchError
from fastplan.planner import (
    ConstraintError,
    FastShardingPlanner,
    InfeasiblePlanError,
    PlanReport,
    SearchConfig,
)

__version__ = "0.1.0"
__all__ = [
    "ConstraintError",
    "FastShardingPlanner",
    "InfeasiblePlanError",
    "PlanAgreementTimeout",
    "PlanCache",
    "PlanMismatchError",
    "PlanReport",
    "SearchConfig",
    "plan_fingerprint",
]
