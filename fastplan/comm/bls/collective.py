"""Bounded Lag Synchronous all-to-all(v) between processes, and a `"bls"` torch.distributed backend.

Semantics (see shared/reference/bls.md): every call site is a channel, call i of a channel is
iteration i. `post(i)` sends this rank's blocks tagged (channel, i) and returns a handle once every
peer's block of iteration i - L has arrived; the handle's `wait()` returns exactly what
`all_to_all_single` returns. A rank receives iteration i of a peer only after posting i itself,
and a peer can be at most L iterations ahead, so at most L + 1 iterations are buffered per peer.
Blocks travel as (channel, iteration, size)-framed messages over `transport.SocketMesh`; a size
that does not match the split sizes is an error naming the peer, not an abort. Lag 0 is the inner
gloo group's `all_to_all_single`.
"""

from __future__ import annotations

import itertools
import math
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from fastplan.comm.transport import PeerFailure, PeerTimeout, SocketMesh


class BLSError(RuntimeError):
    """A peer failed or did not deliver in time; the message names the rank and the iteration."""


class BLSTimeoutError(BLSError, TimeoutError):
    pass


@dataclass
class LagStats:
    """Instrumentation, to check the bound holds: the largest lag seen, and how far ahead peers delivered."""

    max_lag: int = 0  # max over posts of (iteration - oldest iteration received from a peer)
    max_ahead: int = 0  # max iterations a peer had delivered beyond this rank's last post
    posts: int = 0


class _Channel:
    """One call site: what each peer still owes this rank, and what has arrived."""

    def __init__(self, group: "BLSProcessGroup", tag: int, name: str) -> None:
        self.group = group
        self.tag = tag
        self.name = name
        self.lock = threading.RLock()
        self.posted = -1  # last iteration posted locally
        self.arrived: Dict[int, int] = {p: -1 for p in group.peers}  # peer -> last iteration received
        self.pending: Dict[int, List] = {p: [] for p in group.peers}  # peer -> [(iteration, out view)]
        self.stats = LagStats()

    def wait_for(self, iteration: int, deadline: float) -> None:
        """Receive, in order, until every peer's block of `iteration` arrived; raise naming the peer."""
        mesh = self.group._mesh
        me = self.group.rank()
        with self.lock:
            for peer in self.group.peers:
                while self.arrived[peer] < iteration:
                    it, out = self.pending[peer][0]
                    try:
                        data = mesh.recv(peer, self.tag, it, deadline)
                    except PeerTimeout:
                        raise BLSTimeoutError(
                            f"rank {me}: peer rank {peer} did not deliver iteration {it} of channel {self.name} "
                            f"within {self.group.timeout_s:.1f} s"
                        ) from None
                    except PeerFailure as e:
                        raise BLSError(
                            f"rank {me}: peer rank {peer} failed before delivering iteration {it} of channel "
                            f"{self.name}: {e}"
                        ) from None
                    is_bytes = isinstance(out, np.ndarray)
                    nbytes = out.nbytes if is_bytes else out.numel() * out.element_size()
                    if len(data) != nbytes:
                        raise BLSError(
                            f"rank {me}: peer rank {peer} sent {len(data)} bytes for iteration {it} of channel "
                            f"{self.name}, expected {nbytes} (do the ranks agree on the split sizes?)"
                        )
                    if nbytes and is_bytes:
                        out[:] = np.frombuffer(data, dtype=np.uint8)
                    elif nbytes:
                        out.copy_(torch.frombuffer(data, dtype=out.dtype).view(out.shape))
                    self.pending[peer].pop(0)
                    self.arrived[peer] = it

    def missing(self, iteration: int) -> List[int]:
        """Peers whose block of `iteration` is neither consumed nor already received."""
        with self.lock:
            self.group._mesh.progress(0)
            return [
                p for p in self.group.peers
                if self.arrived[p] < iteration and not self.group._mesh.has(p, self.tag, iteration)
            ]


class BLSWork(dist.Work):
    """Handle of one posted iteration; `wait()` returns once every peer's block arrived."""

    def __init__(self, channel: _Channel, iteration: int, output: torch.Tensor) -> None:
        super().__init__()
        self.channel = channel
        self.iteration = iteration
        self.output = output

    def wait(self, timeout: timedelta = None) -> bool:  # type: ignore[override]
        limit = timeout.total_seconds() if timeout else self.channel.group.timeout_s
        self.channel.wait_for(self.iteration, time.monotonic() + limit)
        return True

    def is_completed(self) -> bool:
        return not self.missing()

    def missing(self) -> List[int]:
        """Peers whose block of this iteration has not arrived yet."""
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
        self._mesh = SocketMesh(dist.PrefixStore("bls-mesh/", store), rank, size, self.timeout_s)
        self._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, self._inner)
        self._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        self._channels: Dict[str, _Channel] = {}
        self._lock = threading.Lock()
        self._batch = threading.local()
        self._occurrences: Dict[int, Dict[str, int]] = {}

    @contextmanager
    def batch(self, batch_id: int) -> Iterator[None]:
        """Calls made inside belong to batch `batch_id`: the k-th call from a call site within a batch
        is channel (site, k), so a site called twice per batch (lengths, values) gets two channels
        whose iterations are batches, and the lag counts batches."""
        previous = getattr(self._batch, "id", None)
        self._batch.id = batch_id
        try:
            yield
        finally:
            self._batch.id = previous

    def end_batch(self, batch_id: int) -> None:
        """Forget the per-site call counts of a finished batch."""
        self._occurrences.pop(batch_id, None)

    def _channel_name(self) -> str:
        site = _call_site()
        batch_id = getattr(self._batch, "id", None)
        if batch_id is None:
            return site
        seen = self._occurrences.setdefault(batch_id, {})
        k = seen.get(site, 0)
        seen[site] = k + 1
        return f"{site}#{k}"

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return "bls"

    def _channel(self, name: str) -> _Channel:
        with self._lock:
            ch = self._channels.get(name)
            if ch is None:
                ch = _Channel(self, tag=1000 + len(self._channels), name=name)
                self._channels[name] = ch
            return ch

    def post(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Optional[Sequence[int]] = None,
        input_split_sizes: Optional[Sequence[int]] = None,
        channel: Optional[str] = None,
    ) -> BLSWork:
        """Send this rank's blocks of the channel's next iteration and return its handle."""
        ch = self._channel(channel or self._channel_name())
        size = self._size
        out_splits = list(output_split_sizes) if output_split_sizes else [output.size(0) // size] * size
        in_splits = list(input_split_sizes) if input_split_sizes else [input.size(0) // size] * size
        out_offsets = list(itertools.accumulate(out_splits, initial=0))
        in_offsets = list(itertools.accumulate(in_splits, initial=0))
        me = self._rank
        # Bytes as numpy views (no per-block tensor ops); shared memory with `output`.
        src = input.contiguous().view(-1).view(torch.uint8).cpu().numpy()
        dst = _byte_view(output)
        in_row = input.element_size() * math.prod(input.shape[1:])
        out_row = output.element_size() * math.prod(output.shape[1:])
        with ch.lock:
            iteration = ch.posted + 1
            # Lag rule, checked before sending so that "posted i" implies every peer posted >= i - L.
            ch.wait_for(iteration - self.lag, time.monotonic() + self.timeout_s)
            ch.posted = iteration
            for p in self.peers:
                if dst is not None:
                    target = dst[out_offsets[p] * out_row : out_offsets[p + 1] * out_row]
                else:
                    target = output.narrow(0, out_offsets[p], out_splits[p])
                ch.pending[p].append((iteration, target))
        for p in self.peers:
            try:
                self._mesh.send(p, ch.tag, iteration, memoryview(src[in_offsets[p] * in_row : in_offsets[p + 1] * in_row]))
            except PeerFailure as e:
                raise BLSError(f"rank {me}: cannot send iteration {iteration} of channel {ch.name} to peer rank {p}: {e}") from None
        output.narrow(0, out_offsets[me], out_splits[me]).copy_(input.narrow(0, in_offsets[me], in_splits[me]))
        with ch.lock:
            oldest = min(ch.arrived.values()) if ch.arrived else iteration
            ch.stats.posts += 1
            ch.stats.max_lag = max(ch.stats.max_lag, iteration - oldest)
            ahead = [it - iteration for (_, t, it) in self._mesh.inbox if t == ch.tag]
            ch.stats.max_ahead = max(ch.stats.max_ahead, max(ahead, default=0))
        return BLSWork(ch, iteration, output)

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        if self.lag == 0:
            return self._inner.alltoall_base(output, input, list(output_split_sizes or []), list(input_split_sizes or []))
        return self.post(output, input, output_split_sizes, input_split_sizes)

    def flush(self, timeout_s: Optional[float] = None) -> None:
        """Push out everything this rank queued for its peers (call before tearing the group down)."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        while self._mesh.pending_sends():
            if time.monotonic() > deadline:
                raise BLSTimeoutError(f"rank {self.rank()}: peers {self._mesh.pending_sends()} did not take our blocks")
            self._mesh.progress(0.1)

    def lag_stats(self) -> Dict[str, LagStats]:
        return {name: ch.stats for name, ch in self._channels.items()}

    def shutdown(self) -> None:
        """Flush, then close the connections to the peers."""
        try:
            self.flush()
        finally:
            self._mesh.close()
            self._channels.clear()


def _byte_view(t: torch.Tensor) -> Optional[np.ndarray]:
    """A writable uint8 numpy view of a contiguous CPU tensor's memory, or None."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.requires_grad:
        return None
    return t.view(-1).view(torch.uint8).numpy()


def _call_site() -> str:
    """The first frame outside torch.distributed and this module: one channel per call site."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name != __file__ and "/torch/distributed/" not in name.replace("\\", "/"):
            return f"{name}:{f.f_lineno}"
        f = f.f_back
    return "unknown"


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
