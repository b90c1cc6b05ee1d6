"""Inference model state manager: score a probe batch on a live replica and on the baseline; when
updates push the live scores past a drift threshold, roll back to the last healthy bytes exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Union

import torch

from fastplan.comm.updates.shard_store import ShardKey, ShardStore

Scorer = Callable[[Dict[ShardKey, torch.Tensor]], torch.Tensor]


@dataclass
class HealthReport:
    healthy: bool
    drift: float
    threshold: float
    versions: Dict[ShardKey, int]  # after the check (after rollback if one happened)
    restored_rows: int = 0
    reason: str = ""


class ModelStateManager:
    """`check()` after updates: healthy -> the current bytes become the rollback point;
    drifted -> restore the last healthy bytes and say why."""

    def __init__(self, store: ShardStore, score: Scorer, baseline: Union[torch.Tensor, Callable[[], torch.Tensor]],
                 threshold: float, lock=None) -> None:
        self.store = store
        self.score = score
        self.baseline = baseline
        self.threshold = threshold
        self.lock = lock
        self.store.mark_healthy()

    def _baseline(self) -> torch.Tensor:
        return self.baseline() if callable(self.baseline) else self.baseline

    def check(self) -> HealthReport:
        from contextlib import nullcontext

        with self.lock if self.lock is not None else nullcontext():
            live = self.score(self.store.tensors())
            drift = float((live - self._baseline()).abs().mean())
            if drift <= self.threshold:
                self.store.mark_healthy()
                return HealthReport(True, drift, self.threshold, self.store.versions())
            before = self.store.versions()
            restored = self.store.rollback()
            after = self.store.versions()
            reason = (
                f"probe drift {drift:.4g} exceeds {self.threshold:.4g} at versions {before}; "
                f"rolled back {restored} rows to versions {after}"
            )
            return HealthReport(False, drift, self.threshold, after, restored, reason)
