"""Bounded Lag Synchronous all-to-all(v) between processes, and a `"bls"` torch.distributed backend.

Semantics (see shared/reference/bls.md): every call site is a channel, call i of a channel is
iteration i. `post(i)` sends this rank's blocks tagged (channel, i) and returns a handle once every
peer's block of iteration i - L has arrived; `wait()` returns exactly what `all_to_all_single`
returns, `ready()` says without blocking whether it would. So a rank sends i only after every peer
sent i - L - 1 (post(i - 1) returned), "post(i) returned" implies every rank posted >= i - L, at
most L + 1 iterations are in flight per channel, and a peer's block can arrive at most L + 1
iterations ahead of this rank's posts (further ahead is a protocol error naming the peer). Lag 0
is the synchronous all-to-all (served by the inner gloo group's `all_to_all_single`); every other
collective goes to that gloo group too. Inside `batch(b)` (the pipeline) `post` never waits: blocks
the bound does not allow yet are held back (copied) and leave, in order, as soon as every peer's
block of i - L - 1 has arrived, so the rank computes ahead while its messages keep the bound; and
blocks under 64 KiB are held until `flush()` (or until this rank waits for anything), so the
all-to-alls of consecutive pipeline steps reach each peer as one message.

Blocks travel over `fastplan.comm.transport.Mesh` (ZeroMQ): libzmq's I/O thread moves bytes while
Python computes; an arriving block is copied straight into the output tensor of its post, or held
(at most L + 1 iterations per peer and channel) until this rank posts that iteration.

GPU plan (written, not run: no GPU was available). With NCCL the same protocol maps onto
`ProcessGroupNCCL` point-to-point calls on a side stream: `post(i)` issues `batch_isend_irecv`
(one `isend` of each peer's block, one `irecv` into each peer's slice of the output) on a dedicated
communication stream after an event recorded on the compute stream (inputs ready), and records an
arrival event on the communication stream; `ready()` / `arrived()` are `event.query()`, `wait()` makes the
consumer's stream wait on that event (no host sync). Block sizes are known on both sides from the
split sizes, so no header is needed; the lag rule becomes "before issuing iteration i, the host
waits on iteration i - L - 1's arrival event" (host-side `event.synchronize()` only when the bound
is hit). Tags become NCCL p2p groups per channel (or one group with calls ordered per channel), since
NCCL matches point-to-point calls by order. Buffers: L + 1 receive buffers per channel, reused.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import zmq

from fastplan.comm.transport import Mesh, MeshError, Message


class BLSError(RuntimeError):
    """A peer failed, misbehaved or did not deliver in time; the message names the rank and the iteration."""


class BLSTimeoutError(BLSError, TimeoutError):
    pass


class _Channel:
    """One call site: which iterations this rank posted, what each peer still owes for them."""

    def __init__(self, name: str, tag: int) -> None:
        self.name = name
        self.tag = tag
        self.posted = -1  # last iteration posted here
        self.slots: Dict[Tuple[int, int], np.ndarray] = {}  # (peer, iteration) -> destination bytes
        self.owed: Dict[int, int] = {}  # iteration -> blocks not yet arrived
        self.early: Dict[Tuple[int, int], Message] = {}  # blocks that arrived before this rank posted
        self.deferred: Dict[int, List[Tuple[int, bytes]]] = {}  # iteration -> (peer, block) the bound holds back
        self.posts = 0
        self.max_ahead = 0  # most iterations a peer's block arrived beyond this rank's last post

    def arrived(self, iteration: int) -> bool:
        return iteration <= self.posted and iteration not in self.owed

    def missing(self, iteration: int) -> List[int]:
        return sorted(p for (p, it) in self.slots if it == iteration) if iteration <= self.posted else []


class _BatchScope:
    """`with group.batch(b):` (a class, not a generator: entered several times per batch)."""

    __slots__ = ("local", "batch_id", "previous")

    def __init__(self, local: threading.local, batch_id: int) -> None:
        self.local, self.batch_id = local, batch_id

    def __enter__(self) -> None:
        self.previous = getattr(self.local, "id", None)
        self.local.id = self.batch_id

    def __exit__(self, *exc) -> None:
        self.local.id = self.previous


class BLSWork(dist.Work):
    """Handle of one posted iteration of one channel."""

    def __init__(self, group: "BLSProcessGroup", channel: _Channel, iteration: int, output: torch.Tensor, sends) -> None:
        super().__init__()
        self.group = group
        self.channel = channel
        self.iteration = iteration
        self.output = output
        self.sends = sends  # (peer, tracker) of blocks sent without a copy

    def arrived(self) -> bool:
        """Whether every peer's block is among what this rank already took in (no I/O)."""
        return self.channel.arrived(self.iteration)

    def ready(self) -> bool:
        """Whether every peer's block arrived, i.e. the output is complete (never blocks)."""
        if not self.channel.arrived(self.iteration):
            self.group.progress(0)
        return self.channel.arrived(self.iteration)

    def wait(self, timeout: Optional[timedelta] = None) -> bool:  # type: ignore[override]
        """Return once the output is complete and ZeroMQ no longer reads the input (it may be reused)."""
        # torch passes timedelta(0) for "no timeout given": the group's timeout applies then.
        limit = timeout.total_seconds() if timeout else self.group.timeout_s
        deadline = time.monotonic() + limit
        self.group._wait_arrived(self.channel, self.iteration, limit)
        for peer, tracker in self.sends:
            try:
                tracker.wait(max(0.0, deadline - time.monotonic()))
            except zmq.NotDone:
                raise BLSTimeoutError(
                    f"rank {self.group.rank()}: iteration {self.iteration} of channel {self.channel.name} still being "
                    f"sent to peer rank {peer} after {limit:.1f} s"
                ) from None
        self.sends = []
        return True

    def is_completed(self) -> bool:
        return self.ready()

    def missing(self) -> List[int]:
        """Peers whose block of this iteration has not arrived yet."""
        self.group.progress(0)
        return self.channel.missing(self.iteration)

    def result(self) -> List[torch.Tensor]:
        self.wait()
        return [self.output]


class BLSProcessGroup(dist.ProcessGroup):
    """A process group whose `all_to_all_single` is bounded-lag; every other collective goes to an
    inner gloo backend. Register with `register_bls_backend(lag)` and use `new_group(backend="bls")`."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: timedelta, lag: int) -> None:
        super().__init__(rank, size)
        if lag < 0:
            raise ValueError(f"lag must be >= 0, got {lag}")
        self.lag = lag
        self.timeout_s = timeout.total_seconds()
        self.peers = [p for p in range(size) if p != rank]
        self._rank, self._size = rank, size
        self._inner = dist.ProcessGroupGloo(dist.PrefixStore("bls-inner/", store), rank, size, timeout)
        self._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, self._inner)
        self._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        self._mesh = Mesh(dist.PrefixStore("bls-mesh/", store), rank, size, self.timeout_s) if lag else None
        self._channels: Dict[object, _Channel] = {}  # by name, or by (file, line, k) of the call site
        self._by_tag: Dict[int, _Channel] = {}
        self._unclaimed: Dict[int, List[Message]] = {}  # blocks of channels this rank has not used yet
        self._lock = threading.RLock()
        self._batch = threading.local()
        self._occurrences: Dict[int, Dict[Tuple[str, int], int]] = {}
        self._works: Dict[int, List[BLSWork]] = {}  # batch -> works posted under `batch(b)`, not yet taken
        self._released = False  # blocks held back by the bound were queued since the last progress()

    # ---- batch tagging (used by BLSInferencePipeline) --------------------------------------------
    def batch(self, batch_id: int) -> "_BatchScope":
        """Calls made inside (`with group.batch(b):`) belong to batch `batch_id`: the k-th call from a
        call site within a batch is channel (site, k), so a site called twice per batch (lengths,
        values) gets two channels whose iterations are batches, and the lag counts batches."""
        return _BatchScope(self._batch, batch_id)

    def flush(self) -> None:
        """Send the blocks posted inside `batch(b)` since the last flush: one message per peer."""
        if self._mesh is not None:
            with self._lock:
                self._mesh.flush()

    def take_works(self, batch_id: int) -> List[BLSWork]:
        """The works posted for `batch_id` since the last call (a pipeline stage's all-to-alls)."""
        return self._works.pop(batch_id, [])

    def end_batch(self, batch_id: int) -> None:
        """Forget the per-site call counts of a finished batch."""
        self._occurrences.pop(batch_id, None)
        self._works.pop(batch_id, None)

    def _channel_key(self) -> Tuple[str, int, Optional[int]]:
        """(file, line, k): the k-th call within the current batch from the first frame outside
        torch.distributed and this module (k is None outside a batch)."""
        f = sys._getframe(2)
        while f is not None and (f.f_code.co_filename == __file__ or _TORCH_DIST in f.f_code.co_filename):
            f = f.f_back
        site = (f.f_code.co_filename, f.f_lineno) if f is not None else ("unknown", 0)
        batch_id = getattr(self._batch, "id", None)
        if batch_id is None:
            return site + (None,)
        seen = self._occurrences.setdefault(batch_id, {})
        k = seen.get(site, 0)
        seen[site] = k + 1
        return site + (k,)

    def _channel(self, key) -> _Channel:
        ch = self._channels.get(key)
        if ch is None:
            if isinstance(key, str):
                name = key
            else:
                file, line, k = key
                name = f"{file}:{line}" + ("" if k is None else f"#{k}")
            tag = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=7).digest(), "little")
            if tag in self._by_tag:
                raise BLSError(f"rank {self._rank}: channels {name!r} and {self._by_tag[tag].name!r} share a tag")
            ch = self._channels[key] = self._by_tag[tag] = _Channel(name, tag)
            for msg in self._unclaimed.pop(tag, []):
                self._deliver(ch, msg)
        return ch

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return "bls"

    # ---- the collective --------------------------------------------------------------------------
    def post(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Optional[Sequence[int]] = None,
        input_split_sizes: Optional[Sequence[int]] = None,
        channel: Optional[str] = None,
    ) -> BLSWork:
        """Send this rank's blocks of the channel's next iteration i and return its handle once every
        peer's block of i - lag arrived (inside `batch(b)`: right after sending)."""
        size, me = self._size, self._rank
        src, dst = _bytes_of(input), _writable_bytes(output)
        if dst is None:
            raise ValueError(f"rank {me}: the bls backend needs a contiguous CPU output tensor without grad")
        out_off = _offsets(output_split_sizes, output, dst.nbytes, size, me)
        in_off = _offsets(input_split_sizes, input, src.nbytes, size, me)
        dst[out_off[me] : out_off[me + 1]] = src[in_off[me] : in_off[me + 1]]
        blocks = [src[in_off[p] : in_off[p + 1]] for p in range(size)]
        slots = [dst[out_off[p] : out_off[p + 1]] for p in range(size)]
        return self._post(channel, blocks, slots, output)

    def post_blocks(self, blocks: Sequence, channel: Optional[str] = None) -> BLSWork:
        """Like `post`, but `blocks[p]` (bytes) goes to rank p as it is and a peer's block is taken at
        whatever size it arrives: `work.output[p]` is rank p's block once the work is complete (a
        read-only view; `work.output[rank]` is this rank's own). For messages that carry their own size."""
        received: List = [None] * self._size
        received[self._rank] = memoryview(blocks[self._rank])
        return self._post(channel, blocks, [received] * self._size, received)

    def _post(self, channel: Optional[str], blocks: Sequence, slots: Sequence, output) -> BLSWork:
        """Send blocks[p] to every peer p; slots[p] receives p's block (a byte view to fill, or the
        list that gets it at index p)."""
        with self._lock:
            ch = self._channel(channel or self._channel_key())
            iteration = ch.posted + 1
            batch_id = getattr(self._batch, "id", None)
            held = batch_id is not None
            allowed = not ch.deferred and ch.arrived(iteration - self.lag - 1)
            if not held and not allowed:  # the bound, outside a batch: the caller waits
                self._wait_arrived(ch, iteration - self.lag - 1, self.timeout_s)
                allowed = True
            ch.posted = iteration
            if self.peers:
                ch.owed[iteration] = len(self.peers)
            sends, deferred = [], []
            for p in self.peers:
                ch.slots[(p, iteration)] = slots[p]
                early = ch.early.pop((p, iteration), None)
                if early is not None:
                    self._place(ch, early)
                if not allowed:  # copied: the caller may reuse its input once the work completes
                    deferred.append((p, bytes(blocks[p])))
                    continue
                tracker = self._send(ch, p, iteration, blocks[p], held)
                if tracker is not None:
                    sends.append((p, tracker))
            ch.posts += 1
            work = BLSWork(self, ch, iteration, output, sends)
            if deferred:
                ch.deferred[iteration] = deferred
                self._release(ch)  # an early block placed above may have met the bound already
            if held:
                self._works.setdefault(batch_id, []).append(work)
            else:
                self._wait_arrived(ch, iteration - self.lag, self.timeout_s)
            return work

    def _send(self, ch: _Channel, peer: int, iteration: int, block, hold: bool) -> Optional[zmq.MessageTracker]:
        try:
            return self._mesh.send(peer, ch.tag, iteration, block, hold=hold)
        except zmq.ZMQError as e:
            raise BLSError(f"rank {self._rank}: cannot send iteration {iteration} of channel {ch.name} to peer rank {peer}: {e}") from e

    def _release(self, ch: _Channel) -> None:
        """Send, in order, the held-back iterations whose bound is met (every peer's i - lag - 1 arrived)."""
        while ch.deferred:
            iteration = next(iter(ch.deferred))
            if not ch.arrived(iteration - self.lag - 1):
                return
            for peer, block in ch.deferred.pop(iteration):
                self._send(ch, peer, iteration, block, True)
            self._released = True

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        if self.lag == 0:
            return self._inner.alltoall_base(output, input, list(output_split_sizes or []), list(input_split_sizes or []))
        return self.post(output, input, output_split_sizes, input_split_sizes)

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        """What `torch.distributed.all_to_all_single` calls: served here in Python, without the round
        trip through torch's C++ dispatcher back into `alltoall_base` (tens of microseconds a call)."""
        return self.alltoall_base(output, input, output_split_sizes, input_split_sizes, opts)

    # ---- progress ---------------------------------------------------------------------------------
    def progress(self, timeout_s: float) -> bool:
        """Take in whatever arrived, waiting up to `timeout_s` for something; True if anything did.
        Raises naming the peer when one that still owes blocks has gone away."""
        with self._lock:
            try:
                if timeout_s > 0:
                    self._mesh.flush()  # never wait for peers with our blocks still held
                messages = self._mesh.recv(timeout_s)
            except MeshError as e:
                raise BLSError(f"rank {self._rank}: {e}") from None
            for msg in messages:
                ch = self._by_tag.get(msg.tag)
                if ch is None:
                    self._unclaimed.setdefault(msg.tag, []).append(msg)
                else:
                    self._deliver(ch, msg)
            if self._released:  # blocks the bound held back leave now, not at the next flush
                self._released = False
                self._mesh.flush()
            if not messages and timeout_s > 0:
                self._check_lost()
            return bool(messages)

    def _deliver(self, ch: _Channel, msg: Message) -> None:
        ahead = msg.seq - ch.posted
        if ahead > self.lag + 1:
            raise BLSError(
                f"rank {self._rank}: peer rank {msg.peer} sent iteration {msg.seq} of channel {ch.name} while this "
                f"rank posted only up to {ch.posted}: beyond lag {self.lag} (does it run with the same lag?)"
            )
        ch.max_ahead = max(ch.max_ahead, ahead)
        if (msg.peer, msg.seq) in ch.slots:
            self._place(ch, msg)
        else:
            ch.early[(msg.peer, msg.seq)] = msg

    def _place(self, ch: _Channel, msg: Message) -> None:
        target = ch.slots.pop((msg.peer, msg.seq))
        if isinstance(target, list):  # a self-sized block (post_blocks): kept as it arrived
            target[msg.peer] = msg.payload
        elif msg.payload.nbytes != target.nbytes:
            raise BLSError(
                f"rank {self._rank}: peer rank {msg.peer} sent {msg.payload.nbytes} bytes for iteration {msg.seq} of "
                f"channel {ch.name}, expected {target.nbytes} (do the ranks agree on the split sizes?)"
            )
        else:
            target[:] = msg.payload
        left = ch.owed[msg.seq] - 1
        if left:
            ch.owed[msg.seq] = left
        else:
            del ch.owed[msg.seq]
            if ch.deferred:
                self._release(ch)

    def _check_lost(self) -> None:
        lost = self._mesh.lost()
        for ch in self._channels.values():
            for (p, it) in ch.slots:
                if p in lost:
                    raise BLSError(
                        f"rank {self._rank}: peer rank {p} failed before delivering iteration {it} of channel "
                        f"{ch.name}: {lost[p]}"
                    )

    def _wait_arrived(self, ch: _Channel, iteration: int, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while not ch.arrived(iteration) and iteration >= 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BLSTimeoutError(
                    f"rank {self._rank}: {_peers(ch.missing(iteration))} did not deliver iteration {iteration} of "
                    f"channel {ch.name} within {limit_s:.1f} s"
                )
            self.progress(min(left, 0.25))

    # ---- inspection and teardown ------------------------------------------------------------------
    def lag_stats(self) -> Dict[str, Dict[str, int]]:
        """Per channel: iterations posted, and the most iterations a peer's block arrived ahead of ours."""
        return {ch.name: {"posts": ch.posts, "max_ahead": ch.max_ahead} for ch in self._channels.values()}

    def shutdown(self) -> None:
        """Say goodbye to the peers (after everything queued for them) and close the connections."""
        if self._mesh is not None:
            self._mesh.close()
        self._channels.clear()
        self._by_tag.clear()


def _peers(ranks: List[int]) -> str:
    return f"peer rank {ranks[0]}" if len(ranks) == 1 else f"peer ranks {', '.join(map(str, ranks))}"


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, flat (copied only if it is not contiguous)."""
    t = t.detach() if t.requires_grad else t
    if t.dtype in _NO_NUMPY:
        return _flat(t.contiguous().view(-1).view(torch.uint8).numpy())
    a = t.numpy()
    return _flat(a if a.flags.c_contiguous else np.ascontiguousarray(a))


def _writable_bytes(t: torch.Tensor) -> Optional[memoryview]:
    """A writable flat byte view of a contiguous CPU tensor's memory, or None."""
    if t.requires_grad or not t.is_cpu or not t.is_contiguous():
        return None
    return _flat(t.view(-1).view(torch.uint8).numpy() if t.dtype in _NO_NUMPY else t.numpy())


def _flat(a: np.ndarray) -> memoryview:
    return memoryview(a).cast("B") if a.size else memoryview(bytearray())


_NO_NUMPY = {torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex32}  # dtypes numpy lacks


def _offsets(splits: Optional[Sequence[int]], t: torch.Tensor, nbytes: int, size: int, rank: int) -> List[int]:
    """Byte offsets of the `size` blocks of `t`'s rows (equal blocks without split sizes)."""
    rows = t.size(0) if t.dim() else 1
    row = nbytes // rows if rows else 0
    if not splits:
        if rows % size:
            raise ValueError(f"rank {rank}: {rows} rows do not split evenly over {size} ranks (give split sizes)")
        return [i * (rows // size) * row for i in range(size + 1)]
    if len(splits) != size:
        raise ValueError(f"rank {rank}: split sizes must have {size} entries, got {len(splits)}")
    offsets = [o * row for o in itertools.accumulate(splits, initial=0)]
    if offsets[-1] != nbytes:
        raise ValueError(f"rank {rank}: split sizes {list(splits)} add up to {sum(splits)} rows, the tensor has {rows}")
    return offsets


_TORCH_DIST = "/torch/distributed/".replace("/", os.sep)


def register_bls_backend(lag: int, timeout_s: Optional[float] = None) -> None:
    """Register (or re-register with a new lag) the `"bls"` backend for `dist.new_group(backend="bls")`."""

    def create(store, rank, size, timeout):
        t = timedelta(seconds=timeout_s) if timeout_s is not None else timeout
        return BLSProcessGroup(store, rank, size, t, lag)

    dist.Backend._plugins.pop("BLS", None)
    if "bls" in dist.Backend.backend_list:
        dist.Backend.backend_list.remove("bls")
    dist.Backend.register_backend("bls", create, devices=["cpu"])


def new_bls_group(lag: int, timeout_s: Optional[float] = None, ranks: Optional[List[int]] = None) -> BLSProcessGroup:
    """A BLS process group over `ranks` (default: all); a collective call on every rank of the world."""
    register_bls_backend(lag, timeout_s)
    return dist.new_group(ranks=ranks, backend="bls")

