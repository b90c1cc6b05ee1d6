"""`BLSInferencePipeline`: sharded inference driven by data arrival, at most `lag` batches ahead of a peer.

Each batch goes through TorchRec's stages: input dist (ids out: lengths and values in one
self-sized message per peer, `kjt.py`, where TorchRec's own `KJTAllToAll` first exchanges split
sizes and then the ids), lookup + output dist (pooled embeddings back), dense part. A stage starts
as soon as the all-to-alls it consumes have arrived from every peer (`BLSWork.arrived()`); stages
run in batch order, so outputs come out in order and bit-identical to the synchronous forward. Each
step takes, in this order: the oldest batch whose ids arrived (or, for a KJT that still goes through
TorchRec's two all-to-alls, its split sizes: its ids go out); else the next batch,
if the lag bound allows (every peer's blocks of that stage of batch b - L - 1 arrived), fewer than
`max_in_flight` are held and the source has one (it may yield `NotYet`); else the oldest batch
whose pooled embeddings arrived (dense part) or whose ids arrived (lookup, embeddings go out).
Communication goes first because peers wait for it. A rank blocks on the transport, with a
deadline, only when nothing can move. With L = 0 this is exactly the stock sharded forward.

A source that yields `NotYet(seconds)` (an inference service between requests) lets the pipeline
carry on with the batches it holds: it asks again once that time has passed, so a batch does not
wait for its successor's arrival, and latency at a load below saturation is the synchronous path's.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from fastplan.comm.bls.kjt import self_sized_input_dist

Batch = Tuple[Any, KeyedJaggedTensor]  # (dense input, sparse features)
# What a batch waits for: its input dist's first all-to-all (the self-sized ids; TorchRec's: split
# sizes), its second (none when self-sized; TorchRec's: the ids), its pooled embeddings.
_INPUT, _FEATURES, _POOLED = 0, 1, 2


@dataclass(frozen=True)
class NotYet:
    """Yielded by a source that has no batch yet: ask again in at most `seconds`."""

    seconds: float


@dataclass
class _InFlight:
    index: int
    dense_in: Any
    ctx: Any
    stage: int  # _INPUT, _FEATURES or _POOLED
    awaitable: Any
    works: List[Any] = field(default_factory=list)


class BLSInferencePipeline:
    """Runs `dense(dense_input, sharded_ebc(features))` over batches, eagerly, with a bounded lag.

    Args:
        sparse: a sharded EmbeddingBagCollection (e.g. `dmp.module.sparse`).
        dense: `dense(dense_input, keyed_tensor) -> output`, the rest of the model.
        lag: batches a rank may run ahead of the slowest peer (0: synchronous).
        group: the BLS process group the model was sharded on (needed for lag > 0).
        max_in_flight: batches this rank holds at once (default 3 * lag + 1: each of the three stages
            `lag` batches ahead of the next, as many as a pipeline that defers each wait by `lag`).
    """

    def __init__(
        self,
        sparse: nn.Module,
        dense: Callable[[Any, KeyedTensor], Any],
        lag: int,
        group: Any = None,
        max_in_flight: Optional[int] = None,
    ) -> None:
        if lag < 0:
            raise ValueError(f"lag must be >= 0, got {lag}")
        for stage in ("create_context", "input_dist", "compute_and_output_dist"):
            if not hasattr(sparse, stage):
                raise TypeError(f"{type(sparse).__name__} is not a sharded module (no {stage}()); shard it first")
        if lag and not hasattr(group, "take_works"):
            raise TypeError(f"lag {lag} needs the BLS process group the model was sharded on, got {group!r}")
        self.sparse = sparse
        self.dense = dense
        self.lag = lag
        self.group = group
        self.max_in_flight = max_in_flight or 3 * lag + 1
        if lag:
            self_sized_input_dist(sparse, group)  # ids go out in one message per peer, no split sizes first

    def run(self, batches: Iterable[Batch]) -> Iterator[Any]:
        """Yield the output of every batch, in order."""
        if self.lag == 0:
            yield from self._synchronous(batches)
            return
        source = iter(batches)
        flight: Deque[_InFlight] = deque()
        posted: Dict[int, List[Any]] = {}  # batch -> its input dist's works, kept for the lag rule
        next_index, exhausted, idle_since, source_due = 0, False, None, 0.0
        while flight or not exhausted:
            self.group.progress(0)  # take in what arrived; the checks below only look
            # Communication first (it is cheap and peers wait for it), then the oldest batch's compute.
            item = self._first_at(flight, _INPUT)
            if item is None and not exhausted and len(flight) < self.max_in_flight \
                    and time.monotonic() >= source_due and self._lag_allows(posted, next_index):
                batch = next(source, None)
                if batch is None:
                    exhausted = True
                    continue
                if isinstance(batch, NotYet):
                    source_due = time.monotonic() + batch.seconds
                else:
                    self._start(flight, posted, next_index, *batch)
                    next_index += 1
                    idle_since = None
                    continue
            item = item or self._first_at(flight, _POOLED) or self._first_at(flight, _FEATURES)
            if item is not None:
                idle_since = None
                if item.stage == _FEATURES:
                    # What the steps since the last lookup posted leaves before this one: peers wait for it.
                    # Not before the (short) dense part: each flush costs a wake-up of both I/O threads.
                    self.group.flush()
                output = self._step(flight, item, posted)
                if output is not None:
                    yield output
                continue
            # Nothing can move until a peer delivers (or the source has a batch): block on the transport.
            now = time.monotonic()
            idle_since = idle_since or now
            if flight and now - idle_since > self.group.timeout_s:
                self._raise_stalled(flight)
            wait = min(0.25, self.group.timeout_s)
            if not exhausted and source_due > now:
                wait = min(wait, source_due - now)
            self.group.progress(wait)
        self.group.flush()

    def _first_at(self, flight: Deque[_InFlight], stage: int) -> Optional[_InFlight]:
        """The oldest batch waiting at `stage` if its data arrived. (What it posts next may have to wait
        for the lag bound: the group holds those blocks back, the rank computes on.)"""
        # Stages run in batch order: every batch ahead of the first one at `stage` is past it.
        item = next((i for i in flight if i.stage == stage), None)
        if item is None or not all(w.arrived() for w in item.works):
            return None
        return item

    def _start(self, flight: Deque[_InFlight], posted, b: int, dense_in: Any, features: KeyedJaggedTensor) -> None:
        ctx = self.sparse.create_context()
        with self.group.batch(b):
            awaitable = self.sparse.input_dist(ctx, features)
        item = _InFlight(b, dense_in, ctx, _INPUT, awaitable, self.group.take_works(b))
        posted[b] = item.works
        flight.append(item)

    def _step(self, flight: Deque[_InFlight], item: _InFlight, posted) -> Optional[Any]:
        """Move `item` one stage on; returns its output when it finishes."""
        b = item.index
        with self.group.batch(b):
            value = item.awaitable.wait()
            if item.stage == _POOLED:
                flight.popleft()
                self.group.end_batch(b)
                for key in [k for k in posted if k <= b - self.lag - 1]:
                    del posted[key]
                return self.dense(item.dense_in, value)
            if item.stage == _INPUT:
                item.awaitable = value
            else:
                item.awaitable = self.sparse.compute_and_output_dist(item.ctx, value)
        item.stage += 1
        item.works = self.group.take_works(b)
        return None

    def _lag_allows(self, posted, b: int) -> bool:
        """Starting batch b (its ids go out) needs every peer's ids of batch b - lag - 1: a rank takes
        at most `lag` batches beyond the one it waits for."""
        works = posted.get(b - self.lag - 1)
        return works is None or all(w.arrived() for w in works)

    def _raise_stalled(self, flight: Deque[_InFlight]) -> None:
        for item in flight:  # the oldest unfinished work raises, naming the peers it waits for
            for w in item.works:
                w.wait(timedelta(milliseconds=1))
        raise RuntimeError(f"no progress in {self.group.timeout_s} s with batches {[i.index for i in flight]} in flight")

    def _synchronous(self, batches: Iterable[Batch]) -> Iterator[Any]:
        for batch in batches:
            if isinstance(batch, NotYet):
                time.sleep(batch.seconds)
                continue
            dense_in, features = batch
            ctx = self.sparse.create_context()
            ids = self.sparse.input_dist(ctx, features).wait().wait()
            yield self.dense(dense_in, self.sparse.compute_and_output_dist(ctx, ids).wait())
