"""Plans cached on disk under a fingerprint of their inputs, and ranks agreeing on one plan."""

from fastplan.cache.store import PlanCache

__all__ = ["PlanCache"]
