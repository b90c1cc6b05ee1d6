"""SLO-aware update scheduling: under a bandwidth budget, send the most valuable changed rows first.

Priority of a changed row = model priority x (freshness + importance), where freshness is how
recent its change is within the delta (1 for the newest version) and importance is the size of its
last change times how often it is read, normalised within the delta. FIFO (oldest change first)
is there for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from fastplan.comm.updates.shard_store import Delta, ShardStore


@dataclass
class UpdateScheduler:
    bytes_per_s: float
    interval_s: float = 0.01
    policy: str = "priority"  # or "fifo"
    model_priority: float = 1.0

    def __post_init__(self) -> None:
        if self.policy not in ("priority", "fifo"):
            raise ValueError(f"policy must be 'priority' or 'fifo', got {self.policy!r}")

    def budget_rows(self, delta: Delta) -> int:
        row_bytes = 16 + delta.values[0].numel() * delta.values.element_size() if delta.rows.numel() else 1
        return max(1, int(self.bytes_per_s * self.interval_s // row_bytes))

    def priorities(self, store: ShardStore, delta: Delta) -> torch.Tensor:
        s = store.shards[delta.key]
        span = max(1, delta.version - delta.since)
        freshness = (delta.row_versions - delta.since).float() / span
        importance = s.change_norm[delta.rows] * (1 + s.reads[delta.rows])
        importance = importance / importance.max().clamp_min(1e-12)
        return self.model_priority * (freshness + importance)

    def select(self, store: ShardStore, delta: Delta) -> Tuple[Delta, bool]:
        """The part of `delta` that fits this round's budget, and whether that is all of it."""
        k = self.budget_rows(delta)
        if delta.rows.numel() <= k:
            return delta, True
        if self.policy == "fifo":
            order = torch.argsort(delta.row_versions, stable=True)
        else:
            order = torch.argsort(-self.priorities(store, delta), stable=True)
        pick = order[:k]
        part = Delta(delta.key, delta.since, delta.version, delta.rows[pick], delta.values[pick], delta.row_versions[pick])
        return part, False
