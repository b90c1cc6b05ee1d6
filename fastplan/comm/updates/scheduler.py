"""SLO-aware update scheduling: under a bandwidth budget, send the most valuable changed rows first.

Priority of a changed row = model priority x (freshness + importance): freshness is how recent its
change is among the candidates (1 for the newest), importance the size of its last change times
how often it is read, normalised among the candidates. FIFO (oldest change first) is there for
comparison. A reply carries at most `bytes_per_s x interval_s` of rows and the server waits
`bytes / bytes_per_s` after sending it, so the stream never exceeds the cap.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List

import numpy as np

from fastplan.comm.updates.shard_store import ShardStore
from fastplan.comm.updates.wire import Delta

ROW_OVERHEAD = 12  # row id + row version on the wire


@dataclass
class UpdateScheduler:
    bytes_per_s: float
    interval_s: float = 0.01
    policy: str = "priority"  # or "fifo"
    model_priority: float = 1.0

    def __post_init__(self) -> None:
        if self.policy not in ("priority", "fifo"):
            raise ValueError(f"policy must be 'priority' or 'fifo', got {self.policy!r}")
        if self.bytes_per_s <= 0:
            raise ValueError(f"bytes_per_s must be positive, got {self.bytes_per_s}")

    def scores(self, store: ShardStore, parts: List[Delta]) -> np.ndarray:
        """One score per candidate row (parts concatenated); higher goes first."""
        times = np.concatenate([store.change_times(d.shard, d.row_versions) for d in parts])
        if self.policy == "fifo":
            return -times
        freshness = (times - times.min()) / max(float(times.max() - times.min()), 1e-9)
        store.track_importance()
        importance = np.concatenate([
            store.shards[d.shard].change_norm[d.rows] * (1 + store.shards[d.shard].reads[d.rows]) for d in parts
        ])
        importance = importance / max(float(importance.max()), 1e-12)
        return self.model_priority * (freshness + importance)

    def select(self, store: ShardStore, parts: List[Delta]) -> List[Delta]:
        """The rows of `parts` that fit one reply's budget, best first; parts cut short are marked
        incomplete. Full shards (catch-up after falling behind the cache) are not scheduled."""
        rows = [d for d in parts if not d.full and d.n]
        if not rows:
            return parts
        cost = np.concatenate([np.full(d.n, store.layout.specs[d.shard].row_bytes + ROW_OVERHEAD) for d in rows])
        budget = self.bytes_per_s * self.interval_s
        if cost.sum() <= budget:
            return parts
        order = np.argsort(-self.scores(store, rows), kind="stable")
        fits = max(1, int((np.cumsum(cost[order]) <= budget).sum()))
        chosen = np.zeros(len(cost), dtype=bool)
        chosen[order[:fits]] = True
        picked, at = {}, 0
        for d in rows:
            mask = chosen[at : at + d.n]
            at += d.n
            picked[id(d)] = replace(d, rows=d.rows[mask], values=d.values[mask], row_versions=d.row_versions[mask],
                                    complete=d.complete and bool(mask.all()))
        return [picked.get(id(d), d) for d in parts]
