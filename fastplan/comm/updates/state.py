"""Inference model state manager (Ekko): compare a live replica's probe scores with a baseline; when
updates drive the scores past a drift threshold, roll back to the last healthy bytes exactly and
pause the replica's pulls (else it would fetch the bad updates again) until `resume()`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Protocol, Union

import torch

from fastplan.comm.updates.layout import ShardKey
from fastplan.comm.updates.shard_store import ShardStore

Scorer = Callable[[Dict[ShardKey, torch.Tensor]], torch.Tensor]


class Puller(Protocol):  # a SyncNode
    def pause(self) -> None: ...

    def resume(self) -> None: ...


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
    drifted -> pause `node`'s pulls, restore the last healthy bytes and say why."""

    def __init__(self, store: ShardStore, score: Scorer, baseline: Union[torch.Tensor, Callable[[], torch.Tensor]],
                 threshold: float, node: Optional[Puller] = None) -> None:
        self.store = store
        self.node = node
        self.score = score
        self.baseline = baseline
        self.threshold = threshold
        self.store.mark_healthy()

    def check(self) -> HealthReport:
        with self.store.lock:
            live = self.score(self.store.tensors())
            baseline = self.baseline() if callable(self.baseline) else self.baseline
            drift = float((live - baseline).abs().mean())
            if drift <= self.threshold:
                self.store.mark_healthy()
                return HealthReport(True, drift, self.threshold, self.store.versions())
            before = self.store.versions()
            if self.node is not None:
                self.node.pause()  # under the store lock: no pulled delta lands after the rollback
            restored = self.store.rollback()
            after = self.store.versions()
            reason = (
                f"probe drift {drift:.4g} exceeds {self.threshold:.4g} at versions {before}; "
                f"rolled back {restored} rows to versions {after}"
            )
            return HealthReport(False, drift, self.threshold, after, restored, reason)

    def resume(self) -> None:
        """Pull updates again (once the bad ones are dealt with upstream)."""
        if self.node is not None:
            self.node.resume()
