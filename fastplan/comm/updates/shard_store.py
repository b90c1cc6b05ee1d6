"""Versioned embedding shards: a shard version bumped on every change, per-row versions, and a
bounded update cache that says whether "what changed since v" can still be answered by a delta.

Log-less (Ekko): no operation log is kept, only which rows each recent version touched (the update
cache, bounded in rows). A delta is those rows' current values; an asker older than the cache gets
the full shard. Rows move as raw bytes (numpy views of the shard tensors, one element per row), a
handful of array ops per delta whatever its size and dtype. Shards may be views into a live
model's weights (`copy=False`): the store's lock is then the model's read lock, so a reader never
sees a row half old, half new.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Tuple

import numpy as np
import torch

from fastplan.comm.updates.layout import Layout, ShardKey, ShardSpec
from fastplan.comm.updates.wire import Delta

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int8: np.int8,
          torch.uint8: np.uint8}


def row_view(t: torch.Tensor) -> np.ndarray:
    """A numpy array of one raw-bytes element per row, sharing memory with the 2-D tensor `t`."""
    if t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"shard tensor must be 2-D with contiguous rows, got shape {tuple(t.shape)} strides {t.stride()}")
    a = t.detach().view(_SAME_SIZE_INT[t.element_size()]).numpy()
    return a.view(np.dtype((np.void, t.size(1) * t.element_size())))[:, 0]


def as_rows(values, spec: ShardSpec) -> np.ndarray:
    """Values (n, cols) of a shard as raw rows (a copy the caller may not change under us)."""
    if isinstance(values, np.ndarray) and values.dtype == np.dtype((np.void, spec.row_bytes)):
        return np.array(values, copy=True)
    if isinstance(values, np.ndarray) and values.dtype == _NUMPY.get(spec.dtype):  # skips torch: 3x faster
        return np.array(values, order="C").reshape(-1, spec.cols).view(np.dtype((np.void, spec.row_bytes)))[:, 0]
    t = torch.as_tensor(values).detach().to(spec.dtype).reshape(-1, spec.cols).contiguous()
    return row_view(t).copy()  # a numpy copy: torch's own copy is slow on a busy host with intra-op threads


def as_tensor(rows: np.ndarray, spec: ShardSpec) -> torch.Tensor:
    """Raw rows back as a (n, cols) tensor of the shard's dtype (a view when possible)."""
    raw = np.ascontiguousarray(rows).view(np.uint8)
    return torch.from_numpy(raw).view(spec.dtype).view(len(rows), spec.cols) if len(rows) else torch.zeros(0, spec.cols, dtype=spec.dtype)


@dataclass
class UndoLog:
    """Bytes and versions of rows at the last healthy point, saved on their first overwrite."""

    saved: np.ndarray  # bool per row
    chunks: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def remember(self, s: "Shard", rows: np.ndarray) -> None:
        new = rows[~self.saved[rows]]
        if len(new):
            self.saved[new] = True
            self.chunks.append((new, s.rows[new], s.row_versions[new]))

    @property
    def size(self) -> int:
        return sum(len(r) for r, _, _ in self.chunks)


@dataclass
class Shard:
    spec: ShardSpec
    weights: torch.Tensor  # the shard as the model sees it
    rows: np.ndarray  # the same memory, one raw element per row
    version: int
    row_versions: np.ndarray  # int64 per row
    cache: Deque[Tuple[int, float, np.ndarray]] = field(default_factory=deque)  # (version, time, sorted rows)
    cached_rows: int = 0
    oldest_answerable: int = 0  # deltas are offered to askers at versions >= this
    partial: List[np.ndarray] = field(default_factory=list)  # rows from incomplete deltas, beyond `version`
    change_norm: Optional[np.ndarray] = None  # size of each row's last change (scheduler importance)
    reads: Optional[np.ndarray] = None  # how often each row was read (scheduler importance)
    undo: Optional[UndoLog] = None
    healthy_version: int = 0


class ShardStore:
    """The shards of `layout` that one node holds, with versions, an update cache and a lock."""

    def __init__(self, layout: Layout, tensors: Dict[ShardKey, torch.Tensor], copy: bool = True, version: int = 0,
                 cache_rows: int = 1_000_000) -> None:
        self.layout = layout
        self.cache_rows = cache_rows
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.shards: Dict[int, Shard] = {}
        for key, w in tensors.items():
            if key not in layout.index:
                raise ValueError(f"shard {key} is not in the layout")
            spec = layout.specs[layout.index[key]]
            if tuple(w.shape) != (spec.rows, spec.cols) or w.dtype != spec.dtype:
                raise ValueError(f"shard {key}: tensor {tuple(w.shape)} {w.dtype}, layout says ({spec.rows}, {spec.cols}) {spec.dtype}")
            w = w.detach().clone() if copy else w.detach()
            rv = np.full(spec.rows, version, dtype=np.int64)
            self.shards[layout.index[key]] = Shard(spec, w, row_view(w), version, rv, oldest_answerable=version,
                                                   healthy_version=version)

    # ---- reading ---------------------------------------------------------------------------------
    def keys(self) -> List[ShardKey]:
        return [self.layout.specs[i].key for i in self.shards]

    def versions(self) -> Dict[ShardKey, int]:
        with self.lock:
            return {s.spec.key: s.version for s in self.shards.values()}

    def version_array(self) -> np.ndarray:
        """Versions in layout order; -1 for shards this node does not hold."""
        out = np.full(len(self.layout), -1, dtype=np.int64)
        with self.lock:
            for i, s in self.shards.items():
                out[i] = s.version
        return out

    def tensors(self) -> Dict[ShardKey, torch.Tensor]:
        return {s.spec.key: s.weights for s in self.shards.values()}

    def checksum(self) -> str:
        """sha256 over every held shard's bytes, in layout order."""
        h = hashlib.sha256()
        with self.lock:
            for i in sorted(self.shards):
                h.update(repr(self.layout.specs[i].key).encode())
                h.update(np.ascontiguousarray(self.shards[i].rows).view(np.uint8))  # no copy
        return h.hexdigest()

    def has_news(self, sinces: Dict[int, int]) -> bool:
        """Whether some shard moved away from the version an asker holds (call under `changed`)."""
        return any(self.shards[i].version != v for i, v in sinces.items())

    # ---- writer side -----------------------------------------------------------------------------
    def apply_update(self, key: ShardKey, rows, values) -> Delta:
        """Overwrite distinct `rows` of a shard with `values` (n, cols); returns what changed (the
        delta from the previous version, which a server can hand to askers level with it)."""
        i = self.layout.index[key]
        spec = self.layout.specs[i]
        rows = np.asarray(torch.as_tensor(rows).numpy() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        values = as_rows(values, spec)
        if len(values) != len(rows):
            raise ValueError(f"shard {key}: {len(rows)} rows but {len(values)} value rows")
        if not _increasing(rows):
            order = np.argsort(rows, kind="stable")
            rows, values = rows[order], values[order]
            if not _increasing(rows):
                raise ValueError(f"shard {key}: an update lists a row twice")
        if len(rows) and (rows[0] < 0 or rows[-1] >= spec.rows):
            raise ValueError(f"shard {key}: row ids outside [0, {spec.rows})")
        with self.changed:
            s = self.shards[i]
            s.version += 1
            if s.undo is not None:
                s.undo.remember(s, rows)
            if s.change_norm is not None:
                s.change_norm[rows] = (as_tensor(values, spec).float() - as_tensor(s.rows[rows], spec).float()).norm(dim=1).numpy()
            s.rows[rows] = values
            s.row_versions[rows] = s.version
            self._cache_add(s, s.version, rows)
            self.changed.notify_all()
            return Delta(i, s.version - 1, s.version, rows, values, np.full(len(rows), s.version, dtype=np.int64))

    def _cache_add(self, s: Shard, version: int, rows: np.ndarray) -> None:
        s.cache.append((version, time.time(), rows))
        s.cached_rows += len(rows)
        while s.cached_rows > self.cache_rows and len(s.cache) > 1:
            v, _, evicted = s.cache.popleft()
            s.cached_rows -= len(evicted)
            s.oldest_answerable = v  # an asker at v already has this change; older askers need the full shard

    def delta_since(self, shard: int, since: int, held: Optional[np.ndarray] = None) -> Delta:
        """What changed after `since`, leaving out rows the asker is known to hold at their current row
        version (`held`: a row version per row, -1 unknown). Askers older than the update cache get
        the full shard. Row versions are capped at the shard version: rows this node got beyond it
        (from incomplete deltas) travel as of the shard version, which is all a receiver may trust."""
        with self.lock:
            s = self.shards[shard]
            if since < s.oldest_answerable or since > s.version:
                return Delta(shard, since, s.version, None, s.rows.copy(), np.minimum(s.row_versions, s.version), full=True)
            parts = []
            for v, _, rows in reversed(s.cache):
                if v <= since:
                    break
                parts.append(rows)
            if not parts:
                rows = np.zeros(0, dtype=np.int64)
            else:
                rows = parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))
                rows = rows[s.row_versions[rows] > since]  # a replica's cache entry may span versions
            if held is not None and len(rows):
                rows = rows[s.row_versions[rows] > held[rows]]
            return Delta(shard, since, s.version, rows, s.rows[rows], np.minimum(s.row_versions[rows], s.version))

    def change_times(self, shard: int, row_versions: np.ndarray) -> np.ndarray:
        """When each row version was written here (seconds; versions no longer cached count as oldest)."""
        with self.lock:
            s = self.shards[shard]
            if not s.cache:
                return np.zeros(len(row_versions))
            versions = np.array([v for v, _, _ in s.cache])
            times = np.array([t for _, t, _ in s.cache])
            pos = np.searchsorted(versions, row_versions).clip(max=len(versions) - 1)
            return np.where(versions[pos] == row_versions, times[pos], times[0] - 1)

    # ---- reader side -----------------------------------------------------------------------------
    def apply_delta(self, d: Delta) -> bool:
        """Install a delta (False if it no longer applies: it starts beyond this shard's version).
        An incomplete one keeps the shard version, so the next pull asks again from the same point,
        telling what it already has."""
        with self.changed:
            s = self.shards[d.shard]
            old = s.version
            if d.full:  # rows held newer than the sender's (from incomplete deltas) stay
                if s.undo is not None:
                    s.undo.remember(s, np.arange(s.spec.rows))
                older = d.row_versions >= s.row_versions
                s.rows[older] = d.values[older]
                s.row_versions[older] = d.row_versions[older]
                s.version = d.version
                s.cache.clear()
                s.cached_rows = 0
                s.oldest_answerable = d.version
                beyond = np.flatnonzero(s.row_versions > s.version)
                s.partial = [beyond] if len(beyond) else []
                self.changed.notify_all()
                return True
            if d.since > old:
                return False
            rows, values, rv = d.rows, d.values, d.row_versions
            if s.partial or d.since < old:  # some rows may be here newer already (incomplete deltas)
                newer = rv > s.row_versions[rows]
                rows, values, rv = rows[newer], values[newer], rv[newer]
            if s.undo is not None:
                s.undo.remember(s, rows)
            s.rows[rows] = values
            s.row_versions[rows] = rv
            if not d.complete:
                s.partial.append(rows)
            elif d.version > old:
                # A replica serves its peers too: remember which rows this version brought.
                brought = np.unique(np.concatenate([d.rows, *s.partial])) if s.partial else d.rows
                s.version = d.version
                self._cache_add(s, d.version, brought)
                if s.partial or d.since < old:  # else every row is at d.version or older: none is beyond
                    beyond = brought[s.row_versions[brought] > s.version]  # still ahead, from incomplete deltas
                    s.partial = [beyond] if len(beyond) else []
            self.changed.notify_all()
            return True

    # ---- scheduler and state manager -------------------------------------------------------------
    def track_importance(self) -> None:
        """Keep each row's last change size and read count (what the priority scheduler ranks by)."""
        with self.lock:
            for s in self.shards.values():
                if s.change_norm is None:
                    s.change_norm = np.zeros(s.spec.rows, dtype=np.float32)
                    s.reads = np.zeros(s.spec.rows, dtype=np.float32)

    def record_reads(self, key: ShardKey, rows) -> None:
        self.track_importance()
        with self.lock:
            s = self.shards[self.layout.index[key]]
            np.add.at(s.reads, np.asarray(rows, dtype=np.int64), 1)

    def mark_healthy(self) -> None:
        """The current bytes are good: start a new undo log from here."""
        with self.lock:
            for s in self.shards.values():
                s.undo = UndoLog(np.zeros(s.spec.rows, dtype=bool))
                s.healthy_version = s.version

    def rollback(self) -> int:
        """Restore every shard to its bytes and versions at the last `mark_healthy`; returns rows restored."""
        restored = 0
        with self.changed:
            for s in self.shards.values():
                if s.undo is None:
                    raise RuntimeError("rollback without mark_healthy: no undo log is kept")
                for rows, values, versions in s.undo.chunks:
                    s.rows[rows] = values
                    s.row_versions[rows] = versions
                restored += s.undo.size
                s.undo = UndoLog(np.zeros(s.spec.rows, dtype=bool))
                s.version = s.healthy_version
                s.partial.clear()
                while s.cache and s.cache[-1][0] > s.version:  # never serve changes that were undone
                    _, _, rows = s.cache.pop()
                    s.cached_rows -= len(rows)
            self.changed.notify_all()
        return restored


def _increasing(rows: np.ndarray) -> bool:
    return len(rows) < 2 or bool((rows[1:] > rows[:-1]).all())
