"""Versioned embedding shards: a shard version bumped on every change, per-row versions, and a
bounded update cache that says whether "what changed since v" can still be answered by a delta.

Log-less (Ekko): no operation log is kept, only which rows each recent version touched (the update
cache, bounded in rows). A delta is those rows' current values; an asker older than the cache
gets the full shard.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Tuple

import torch
from torchrec.distributed.types import ShardingPlan

ShardKey = Tuple[str, int]  # (table, shard index in the table's sharding spec)


@dataclass
class Delta:
    """Rows of one shard that changed after `since`, bringing a replica to `version`."""

    key: ShardKey
    since: int
    version: int
    rows: torch.Tensor  # int64 row ids (local to the shard)
    values: torch.Tensor  # (len(rows), dim)
    row_versions: torch.Tensor  # int64
    full: bool = False  # True: `rows` is every row (the asker was too far behind)

    def payload_bytes(self) -> int:
        return self.rows.numel() * 8 + self.values.numel() * self.values.element_size() + self.row_versions.numel() * 8


@dataclass
class Shard:
    weights: torch.Tensor
    version: int = 0
    row_versions: torch.Tensor = None  # int64 per row
    cache: Deque[Tuple[int, torch.Tensor]] = field(default_factory=deque)  # (version, rows it changed)
    cached_rows: int = 0
    oldest_answerable: int = 0  # deltas are offered to askers at versions >= this
    change_norm: torch.Tensor = None  # size of each row's last change (scheduler importance)
    reads: torch.Tensor = None  # how often each row was read (scheduler importance)
    healthy_version: int = 0
    undo: Dict[int, Tuple[torch.Tensor, int]] = field(default_factory=dict)  # row -> bytes at the healthy point

    def __post_init__(self) -> None:
        n = self.weights.size(0)
        if self.row_versions is None:
            self.row_versions = torch.zeros(n, dtype=torch.int64)
        self.change_norm = torch.zeros(n)
        self.reads = torch.zeros(n)

    def remember(self, rows: torch.Tensor) -> None:
        """Keep the healthy bytes of rows about to be overwritten (first overwrite only)."""
        for r in rows.tolist():
            if r not in self.undo:
                self.undo[r] = (self.weights[r].clone(), int(self.row_versions[r]))


class ShardStore:
    """The shards one rank (or its replicas) holds, each with versions and a bounded update cache."""

    def __init__(self, shards: Dict[ShardKey, torch.Tensor], cache_rows: int = 100_000) -> None:
        self.cache_rows = cache_rows
        self.shards: Dict[ShardKey, Shard] = {k: Shard(w.detach().clone()) for k, w in sorted(shards.items())}

    @classmethod
    def from_plan(cls, plan: ShardingPlan, rank: int, init: Optional[Dict[str, torch.Tensor]] = None,
                  cache_rows: int = 100_000) -> "ShardStore":
        """The shards `plan` places on `rank` (sharding-spec shards; data-parallel tables whole).
        `init` gives full tables to slice from; otherwise shards start at zero."""
        shards: Dict[ShardKey, torch.Tensor] = {}
        for path, module_plan in sorted(plan.plan.items()):
            for name, ps in sorted(module_plan.items()):
                if ps.sharding_spec is None:  # data parallel: every rank holds the whole table
                    if init is None or name not in init:
                        raise ValueError(f"table '{name}' is data-parallel: pass its weights in init")
                    shards[(name, 0)] = init[name]
                    continue
                for i, meta in enumerate(ps.sharding_spec.shards):
                    if meta.placement.rank() != rank:
                        continue
                    (r0, c0), (nr, nc) = meta.shard_offsets, meta.shard_sizes
                    if init is not None and name in init:
                        shards[(name, i)] = init[name][r0 : r0 + nr, c0 : c0 + nc]
                    else:
                        shards[(name, i)] = torch.zeros(nr, nc)
        return cls(shards, cache_rows)

    def keys(self) -> List[ShardKey]:
        return list(self.shards)

    def versions(self) -> Dict[ShardKey, int]:
        return {k: s.version for k, s in self.shards.items()}

    # ---- writer side -------------------------------------------------------------------------
    def apply_update(self, key: ShardKey, rows: torch.Tensor, values: torch.Tensor) -> int:
        """Overwrite `rows` of a shard; returns the new shard version."""
        s = self.shards[key]
        rows = torch.as_tensor(rows, dtype=torch.int64)
        s.version += 1
        s.remember(rows)
        values = values.to(s.weights.dtype)
        s.change_norm[rows] = (values - s.weights[rows]).float().norm(dim=1)
        s.weights[rows] = values
        s.row_versions[rows] = s.version
        self._cache_add(s, s.version, rows)
        return s.version

    def _cache_add(self, s: Shard, version: int, rows: torch.Tensor) -> None:
        s.cache.append((version, rows.clone()))
        s.cached_rows += int(rows.numel())
        while s.cached_rows > self.cache_rows and len(s.cache) > 1:
            v, evicted = s.cache.popleft()
            s.cached_rows -= int(evicted.numel())
            s.oldest_answerable = v  # an asker at v already has this change; older askers need the full shard

    def delta_since(self, key: ShardKey, since: int, known: Optional[Dict[int, int]] = None) -> Delta:
        """What changed after `since`. `known` (row -> row version) lists rows the asker already has
        beyond `since`; they are left out. Askers older than the update cache get the full shard."""
        s = self.shards[key]
        if since < s.oldest_answerable or since > s.version:
            rows = torch.arange(s.weights.size(0))
            return Delta(key, since, s.version, rows, s.weights.clone(), s.row_versions.clone(), full=True)
        changed = [r for v, r in s.cache if v > since]
        rows = torch.unique(torch.cat(changed)) if changed else torch.zeros(0, dtype=torch.int64)
        if known and rows.numel():
            have = torch.zeros(s.weights.size(0), dtype=torch.int64) - 1
            ids = torch.tensor(list(known.keys()), dtype=torch.int64)
            have[ids] = torch.tensor(list(known.values()), dtype=torch.int64)
            rows = rows[s.row_versions[rows] > have[rows]]
        return Delta(key, since, s.version, rows, s.weights[rows].clone(), s.row_versions[rows].clone())

    # ---- reader side -------------------------------------------------------------------------
    def apply_delta(self, delta: Delta, complete: bool = True) -> None:
        """Install a delta. `complete=False` (a scheduler sent only part of it) keeps the shard
        version, so the next pull asks again from the same point, telling what it already has."""
        s = self.shards[delta.key]
        old_version = s.version
        if delta.full:
            s.remember(torch.arange(s.weights.size(0)))
            s.weights.copy_(delta.values)
            s.row_versions.copy_(delta.row_versions)
        elif delta.rows.numel():
            newer = delta.row_versions > s.row_versions[delta.rows]
            rows = delta.rows[newer]
            s.remember(rows)
            s.weights[rows] = delta.values[newer].to(s.weights.dtype)
            s.row_versions[rows] = delta.row_versions[newer]
        if not complete or delta.version <= old_version:
            return
        s.version = delta.version
        # A replica serves its peers too: remember which rows this version brought (partial rows included).
        if delta.full:
            s.cache.clear()
            s.cached_rows = 0
            s.oldest_answerable = delta.version
        else:
            self._cache_add(s, delta.version, (s.row_versions > old_version).nonzero().flatten())

    def known_beyond(self, key: ShardKey) -> Dict[int, int]:
        """Rows this replica holds at a row version above its shard version (from partial deltas)."""
        s = self.shards[key]
        mask = s.row_versions > s.version
        ids = mask.nonzero().flatten()
        return dict(zip(ids.tolist(), s.row_versions[ids].tolist()))

    def record_reads(self, key: ShardKey, rows: torch.Tensor) -> None:
        self.shards[key].reads.index_add_(0, torch.as_tensor(rows, dtype=torch.int64), torch.ones(len(rows)))

    def mark_healthy(self) -> None:
        """The current bytes are good: forget the undo information."""
        for s in self.shards.values():
            s.undo.clear()
            s.healthy_version = s.version

    def rollback(self) -> int:
        """Restore every shard to its bytes and versions at the last `mark_healthy`; returns rows restored."""
        restored = 0
        for s in self.shards.values():
            for r, (value, version) in s.undo.items():
                s.weights[r] = value
                s.row_versions[r] = version
            restored += len(s.undo)
            s.undo.clear()
            s.version = s.healthy_version
            while s.cache and s.cache[-1][0] > s.version:  # never serve changes that were undone
                _, rows = s.cache.pop()
                s.cached_rows -= int(rows.numel())
        return restored

    def tensors(self) -> Dict[ShardKey, torch.Tensor]:
        return {k: s.weights for k, s in self.shards.items()}
