"""Errors the planner raises; each names the table, rank or field at fault."""

from torchrec.distributed.planner.types import PlannerError, PlannerErrorType


class ConstraintError(PlannerError):
    """A constraint names an unknown table, sharding type or kernel, or leaves a table no option."""

    def __init__(self, message: str) -> None:
        super().__init__(message, PlannerErrorType.STRICT_CONSTRAINTS)


class InfeasiblePlanError(PlannerError):
    """Some tables cannot be placed within the per-rank memory left after storage reservation."""

    def __init__(self, message: str) -> None:
        super().__init__(message, PlannerErrorType.INSUFFICIENT_STORAGE)
