"""fastplan: fast, cached sharding plans for TorchRec.

Names are imported on first use, so `import fastplan` (and `fastplan --help`) does not load torch.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ConstraintError": "fastplan.planner",
    "FastShardingPlanner": "fastplan.planner",
    "InfeasiblePlanError": "fastplan.planner",
    "PlanReport": "fastplan.planner",
    "SearchConfig": "fastplan.planner",
    "PlanCache": "fastplan.cache.store",
    "PlanAgreementError": "fastplan.cache.agreement",
    "PlanAgreementTimeout": "fastplan.cache.agreement",
    "PlanMismatchError": "fastplan.cache.agreement",
    "PlanFile": "fastplan.planfile",
    "PlanFileError": "fastplan.planfile",
    "dump_plan": "fastplan.planfile",
    "load_plan": "fastplan.planfile",
    "FastPlanLoader": "fastplan.plan_loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastplan' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
