"""Ekko-style log-less peer-pull synchronisation of versioned shards between processes.

Every node (a trainer rank or an inference replica) serves its `ShardStore` over TCP and publishes
its address in the job's rendezvous store. A replica pulls from every peer at once, one thread per
peer, in Ekko's four steps: (1) send its shard versions, (2) receive the peer's, (3) for shards
where the peer is ahead, send the version it holds, (4) receive only the rows changed since,
applied straight into the shard tensors.

A source (the trainer rank that writes a shard) is always ahead or level, so with a source steps
1 and 3 travel as one request that the source holds until it has news (a long poll), and steps 2
and 4 as its reply. A source encodes each published step once and answers an asker that is a few
steps behind with those steps in order (no per-asker work); under a bandwidth cap it remembers,
per connection, which rows it already sent, so a cut-short delta is not sent again. Other peers
are probed every `probe_interval_s` (`quiet_probe_interval_s` while live sources serve all they
hold), for shards whose source has stopped answering: replicas serve each other what a missing
source cannot. A shard is fetched by one thread at a time. A peer that
is dead, stalls, fails authentication or sends malformed bytes is named in `errors` and left alone
for `cooldown_s`; the node keeps serving.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple

import numpy as np

from fastplan.comm.updates.channel import Channel, PeerError, accept_peer, connect_peer, job_secret
from fastplan.comm.updates.layout import ShardKey
from fastplan.comm.updates.scheduler import UpdateScheduler
from fastplan.comm.updates.shard_store import ShardStore
from fastplan.comm.updates.wire import (
    COMPLETE, MAX_PARTS, REPLY_BYTES, Ask, Delta, EncodedPart, Kind, WireError, decode_delta_reply, decode_delta_request,
    decode_versions, encode_delta_reply, encode_delta_request, encode_part, max_body,
)

logger = logging.getLogger("fastplan.ekko")
MAX_WAIT_MS = 10_000  # the longest long poll a peer may ask for


@dataclass
class SyncConfig:
    timeout_s: float = 2.0  # a peer must answer within this (beyond the wait it was asked to hold)
    cooldown_s: float = 1.0  # a failed peer is left alone this long
    min_interval_s: float = 0.002  # at least this between pulls from a source: rows batch up meanwhile
    long_poll_s: float = 0.5  # a source holds a pull this long, waiting for news
    probe_interval_s: float = 0.1  # how often peers that are not sources are asked
    quiet_probe_interval_s: float = 1.0  # ... while a live source serves every shard they hold (to see them go)
    max_connections: int = 64
    prefix: str = "ekko"  # key prefix in the rendezvous store
    step_bytes: int = 16 << 20  # encoded steps a source keeps per shard; askers further behind get one delta
    host: str = "127.0.0.1"


@dataclass
class SyncStats:
    bytes_out: int = 0  # every byte this node wrote (replies, requests, handshakes)
    bytes_in: int = 0
    deltas: int = 0  # delta parts served (full shards excluded)
    built: int = 0  # parts built for one asker (the rest were published steps, encoded once for all)
    delta_rows: int = 0
    full_shards: int = 0
    full_rows: int = 0
    pulls: int = 0  # delta requests this node made
    versions_served: int = 0  # version exchanges (connects and probes) this node answered
    applied: int = 0  # parts applied
    rows_applied: int = 0


@dataclass
class PeerFault:
    rank: int  # -1 when the peer never authenticated
    when: float
    what: str


@dataclass
class _Peer:
    rank: int
    chan: Optional[Channel] = None
    source: bool = False
    holds: List[int] = field(default_factory=list)  # layout indices of the shards it serves
    avoid_until: float = 0.0
    epoch: int = 0  # the node's epoch when this connection opened


@dataclass
class _Steps:
    """A source's latest published steps of one shard, encoded once, in version order."""

    parts: Deque[EncodedPart] = field(default_factory=deque)
    nbytes: int = 0


class SyncNode:
    """Serves a `ShardStore` and, for a replica, keeps pulling it up to date from its peers."""

    def __init__(self, rank: int, world: int, store: ShardStore, kv, source: bool = False,
                 config: Optional[SyncConfig] = None, scheduler: Optional[UpdateScheduler] = None,
                 on_apply: Optional[Callable[[ShardKey, int, Delta], None]] = None, secret: Optional[bytes] = None) -> None:
        self.rank = rank
        self.world = world
        self.store = store
        self.kv = kv
        self.source = source
        self.config = config or SyncConfig()
        self.scheduler = scheduler
        self.on_apply = on_apply
        self.secret = secret if secret is not None else job_secret(kv, self.config.prefix)
        self.limit = max_body(store.layout)
        self.stats = SyncStats()
        self.errors: List[PeerFault] = []
        self.serving = True  # False: keep connections but never answer (a stalled peer, for tests)
        self.paused = False  # True: pulls stop and replies in flight are dropped (see `pause`)
        self._epoch = 0  # bumped by `resume`: pull connections opened before it are reopened
        self._stop = threading.Event()
        self._lock = threading.Lock()  # stats, errors, claims, open channels, encoded parts
        self._claimed: Set[int] = set()
        self._source_answered: Dict[int, float] = {}  # shard -> when its source last answered a pull
        self._open: Set[Channel] = set()
        self._authenticated: Dict[Channel, int] = {}
        self._steps: Dict[int, _Steps] = {}
        self._threads: List[threading.Thread] = []
        self._listener = socket.create_server((self.config.host, 0), backlog=self.config.max_connections)
        self._listener.settimeout(0.2)
        role = "source" if source else "replica"
        kv.delete_key(f"{self.config.prefix}/left/{rank}")
        kv.set(f"{self.config.prefix}/addr/{rank}", f"{self.config.host}:{self._listener.getsockname()[1]}:{role}")

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self, pull: bool) -> "SyncNode":
        self._spawn(self._accept_loop, "accept")
        if pull:
            for p in range(self.world):
                if p != self.rank:
                    self._spawn(self._pull_loop, f"pull-{p}", _Peer(p))
        return self

    def _spawn(self, target, name: str, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True, name=f"ekko-{self.rank}-{name}")
        self._threads.append(t)
        t.start()

    def stop(self) -> None:
        """Leave the job: peers that lose their connection to this node see that it left."""
        self.kv.set(f"{self.config.prefix}/left/{self.rank}", "1")
        self._stop.set()
        with self.store.changed:
            self.store.changed.notify_all()
        with self._lock:
            for chan in list(self._open):
                try:
                    chan.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self._threads:
            t.join(timeout=5)
        self._listener.close()

    def publish(self, updates: Dict[ShardKey, Tuple[object, object]]) -> Dict[ShardKey, int]:
        """Write one training step ({shard: (rows, values)}): waiting pulls wake once, and each shard's
        step is encoded once, here, for every asker. Returns the new versions."""
        with self.store.changed:
            written = [self.store.apply_update(key, rows, values) for key, (rows, values) in updates.items()]
            if self.scheduler is None:
                with self._lock:
                    for d in written:
                        self._keep_step(d)
        return {self.store.layout.specs[d.shard].key: d.version for d in written}

    def _keep_step(self, d: Delta) -> None:
        steps = self._steps.setdefault(d.shard, _Steps())
        if steps.parts and steps.parts[-1].entry[3] != d.since:  # the store was written around publish
            steps.parts.clear()
            steps.nbytes = 0
        part = encode_part(d)
        steps.parts.append(part)
        steps.nbytes += part.nbytes
        oldest = self.store.shards[d.shard].oldest_answerable  # older askers get the full shard
        while len(steps.parts) > 1 and (steps.nbytes > self.config.step_bytes or steps.parts[0].entry[2] < oldest):
            steps.nbytes -= steps.parts.popleft().nbytes

    def pause(self) -> None:
        """Stop pulling, and drop replies in flight (call under `store.lock` to order it with a
        rollback: no delta lands after it)."""
        with self.store.lock:
            self.paused = True

    def resume(self) -> None:
        """Pull again, on fresh connections: what peers remember having sent us predates a pause
        (and perhaps a rollback)."""
        with self.store.lock:
            self._epoch += 1
            self.paused = False

    def peers(self) -> Set[int]:
        """Ranks of the peers connected and authenticated to this node's server."""
        with self._lock:
            return set(self._authenticated.values())

    def _fault(self, rank: int, what: str) -> None:
        if self._stop.is_set():
            return  # peers going away at shutdown is not news
        with self._lock:
            self.errors.append(PeerFault(rank, time.time(), what))
        logger.warning("fastplan ekko: rank %d: %s", self.rank, what)

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for k, v in amounts.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def _track(self, chan: Channel, add: bool) -> None:
        with self._lock:
            (self._open.add if add else self._open.discard)(chan)
        if not add:
            self._count(bytes_out=chan.bytes_out, bytes_in=chan.bytes_in)
            chan.bytes_out = chan.bytes_in = 0
            chan.close()

    # ---- server ----------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            chan = Channel(conn, f"{addr[0]}:{addr[1]}")
            if len(self._open) >= self.config.max_connections:
                self._fault(-1, f"peer {chan.peer} refused: {self.config.max_connections} connections already open")
                chan.refuse("too many connections")
                continue
            self._track(chan, True)
            self._spawn(self._serve, f"serve-{addr[1]}", chan)

    def _serve(self, chan: Channel) -> None:
        rank = -1
        layout = self.store.layout
        held: Dict[int, np.ndarray] = {}  # shard -> row versions sent to this peer in incomplete deltas
        try:
            rank = accept_peer(chan, self.secret, layout, self.rank, self.limit, self.config.timeout_s)
            with self._lock:
                self._authenticated[chan] = rank
            while not self._stop.is_set():
                kind, count, body = chan.recv(3600, "a request")
                if not self.serving:
                    self._stop.wait()  # stalled: holds the connection, never answers
                    return
                if kind is Kind.VERSIONS:  # steps 1-2
                    decode_versions(body, count, layout)
                    mine = self.store.version_array()
                    chan.send(Kind.VERSIONS_REPLY, len(mine), [mine], self.config.timeout_s)
                    self._count(versions_served=1)
                elif kind is Kind.DELTA:  # steps 3-4
                    self._send_deltas(chan, *decode_delta_request(body, count, layout), held)
                else:
                    raise WireError(f"unexpected {kind.name} message")
        except WireError as e:
            self._fault(rank, f"peer {chan.peer} sent a malformed request: {e}")
            chan.refuse(f"malformed request: {e}")
        except PeerError as e:
            if rank < 0:  # never authenticated: wrong secret, a stranger, a stall during the handshake
                self._fault(rank, str(e))
                chan.refuse(e.reason)
            # after authentication a lost connection is the client's business (it retries)
        finally:
            with self._lock:
                self._authenticated.pop(chan, None)
            self._track(chan, False)

    def _send_deltas(self, chan: Channel, asks: List[Ask], wait_ms: int, held: Dict[int, np.ndarray]) -> None:
        store, layout = self.store, self.store.layout
        missing = [layout.specs[a.shard].key for a in asks if a.shard not in store.shards]
        if missing:
            raise WireError(f"asked for shards {missing} that this node does not hold")
        sinces = {a.shard: a.since for a in asks}
        deadline = time.monotonic() + min(wait_ms, MAX_WAIT_MS) / 1000
        with store.changed:  # hold the pull until some asked shard has news
            while not self._stop.is_set() and not store.has_news(sinces) and deadline > time.monotonic():
                store.changed.wait(deadline - time.monotonic())
        parts, size = [], 0
        for part in (p for a in asks for p in self._answer(a, held)):
            size += part.nbytes
            if parts and (size > REPLY_BYTES or len(parts) == MAX_PARTS):
                break  # the asker gets the rest next time
            parts.append(part)
        sent = chan.send(Kind.DELTA_REPLY, len(parts), encode_delta_reply(parts), self.config.timeout_s)
        full = [p.n for p in parts if p.full]
        self._count(full_shards=len(full), full_rows=sum(full), deltas=len(parts) - len(full),
                    delta_rows=sum(p.n for p in parts) - sum(full))
        for p in parts:
            shard, flags, _, version, _ = p.entry
            if flags & COMPLETE:
                held.pop(shard, None)  # the asker reaches our version: nothing beyond it to remember
            else:
                mine = held.setdefault(shard, np.full(layout.specs[shard].rows, -1, np.int64))
                mine[p.rows] = version if p.versions is None else p.versions
        if self.scheduler is not None:
            self._stop.wait(sent / self.scheduler.bytes_per_s)  # pace: the stream stays under the cap

    def _answer(self, a: Ask, held: Dict[int, np.ndarray]) -> List[EncodedPart]:
        """The parts bringing an asker from `a.since` up to date: the published steps since then
        when this source still has them all, else one delta built for it."""
        if self.store.shards[a.shard].version == a.since:
            return []
        with self._lock:
            steps = self._steps.get(a.shard)
            if steps and steps.parts[0].entry[2] <= a.since < steps.parts[-1].entry[3]:
                skip = a.since - steps.parts[0].entry[2]  # steps are consecutive versions
                return list(steps.parts)[skip:]
        return [self._build(a, held)]

    def _build(self, a: Ask, held: Dict[int, np.ndarray]) -> EncodedPart:
        """One delta for one asker; `held` (per connection) says which rows we already sent it, at
        which row version, in deltas a scheduler cut short."""
        self._count(built=1)
        d = self.store.delta_since(a.shard, a.since, held.get(a.shard))
        if self.scheduler is not None and not d.full:
            d = self.scheduler.select(self.store, [d])[0]
        return encode_part(d)

    # ---- client ----------------------------------------------------------------------------------
    def _pull_loop(self, peer: _Peer) -> None:
        cfg = self.config
        while not self._stop.is_set():
            if self.paused or time.monotonic() < peer.avoid_until:
                self._stop.wait(cfg.min_interval_s if self.paused else peer.avoid_until - time.monotonic())
                continue
            if peer.chan is not None and peer.epoch != self._epoch:  # resumed: the peer's memory of us is stale
                self._track(peer.chan, False)
                peer.chan = None
            try:
                if peer.chan is None and not self._connect(peer):
                    self._stop.wait(cfg.probe_interval_s)
                    continue
                if peer.source:
                    self._pull_source(peer)
                else:
                    self._probe(peer)
            except (PeerError, WireError) as e:
                what = str(e) if isinstance(e, PeerError) else f"peer rank {peer.rank} sent a malformed reply: {e}"
                if not self.kv.check([f"{cfg.prefix}/left/{peer.rank}"]):  # a peer that left is not a fault
                    self._fault(peer.rank, what)
                peer.avoid_until = time.monotonic() + cfg.cooldown_s
                if peer.chan is not None:
                    self._track(peer.chan, False)
                    peer.chan = None
                continue
            self._stop.wait(cfg.min_interval_s if peer.source else self._probe_interval(peer))
        if peer.chan is not None:
            self._track(peer.chan, False)

    def _connect(self, peer: _Peer) -> bool:
        key = f"{self.config.prefix}/addr/{peer.rank}"
        if not self.kv.check([key]):
            return False  # not started yet: nothing to pull from it
        host, port, role = self.kv.get(key).decode().rsplit(":", 2)
        cfg = self.config
        peer.epoch = self._epoch
        peer.chan = connect_peer((host, int(port)), peer.rank, self.secret, self.store.layout, self.rank, self.limit, cfg.timeout_s)
        self._track(peer.chan, True)
        peer.source = role == "source"
        peer.holds = [int(i) for i in np.flatnonzero(self._versions_of(peer) >= 0) if int(i) in self.store.shards]
        return True

    def _versions_of(self, peer: _Peer) -> np.ndarray:
        """Steps 1-2: send this node's versions, receive the peer's."""
        chan, layout = peer.chan, self.store.layout
        chan.send(Kind.VERSIONS, len(layout), [self.store.version_array()], self.config.timeout_s)
        kind, count, body = chan.recv(self.config.timeout_s, "a version request")
        if kind is not Kind.VERSIONS_REPLY:
            raise WireError(f"answered a version request with {kind.name}")
        return decode_versions(body, count, layout)

    def _claim(self, shards) -> List[int]:
        with self._lock:
            claim = [i for i in shards if i not in self._claimed]
            self._claimed.update(claim)
        return claim

    def _pull_source(self, peer: _Peer) -> None:
        """Steps 1+3 in one request that the source holds until it has news; 2+4 in its reply."""
        claim = self._claim(peer.holds)
        try:
            if claim:
                self._fetch(peer, claim, int(self.config.long_poll_s * 1000))
        finally:
            with self._lock:
                self._claimed.difference_update(claim)

    def _probe(self, peer: _Peer) -> None:
        """The four steps with a peer that is not a source, for shards that peer has newer and that
        no source is serving (relaying what a live source sends anyway only adds work)."""
        theirs = self._versions_of(peer)
        mine = self.store.version_array()
        orphaned = time.monotonic() - self.config.timeout_s
        claim = self._claim([i for i in peer.holds
                             if theirs[i] > mine[i] and self._source_answered.get(i, -np.inf) < orphaned])
        try:
            if claim:
                self._fetch(peer, claim, 0)
        finally:
            with self._lock:
                self._claimed.difference_update(claim)

    def _probe_interval(self, peer: _Peer) -> float:
        """Probes find nothing to fetch while sources answer for all a peer holds: then they only
        check the peer is there, and rarely (each costs both ends a version exchange)."""
        answered = time.monotonic() - self.config.timeout_s
        if all(self._source_answered.get(i, -np.inf) >= answered for i in peer.holds):
            return self.config.quiet_probe_interval_s
        return self.config.probe_interval_s

    def _fetch(self, peer: _Peer, shards: List[int], wait_ms: int) -> None:
        store, cfg = self.store, self.config
        mine = store.version_array()
        asks = [Ask(i, int(mine[i])) for i in shards]
        peer.chan.send(Kind.DELTA, len(asks), encode_delta_request(asks, wait_ms), cfg.timeout_s)
        kind, count, body = peer.chan.recv(wait_ms / 1000 + cfg.timeout_s, "a delta request")
        if kind is not Kind.DELTA_REPLY:
            raise WireError(f"answered a delta request with {kind.name}")
        parts = decode_delta_reply(body, count, store.layout)
        unasked = {d.shard for d in parts} - set(shards)
        if unasked:
            raise WireError(f"sent shards {sorted(store.layout.specs[i].key for i in unasked)} it was not asked for")
        if peer.source:
            self._source_answered.update(dict.fromkeys(shards, time.monotonic()))
        applied = rows = 0
        with store.lock:
            if self.paused:
                self._count(pulls=1)
                return  # paused (rolled back) while this pull was in flight
            for d in parts:
                if store.apply_delta(d):
                    applied, rows = applied + 1, rows + d.n
                    if self.on_apply is not None:
                        self.on_apply(store.layout.specs[d.shard].key, store.shards[d.shard].version, d)
        self._count(pulls=1, applied=applied, rows_applied=rows)
