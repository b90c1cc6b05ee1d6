"""Ekko-style log-less peer-pull synchronisation of versioned shards between processes.

Every node (the trainer and each inference replica) serves its `ShardStore` on 127.0.0.1 and
publishes its address in a torch.distributed store. A replica pulls in Ekko's four steps:
(1) ask a peer for its shard versions, (2) receive them, (3) for each shard where some peer is
ahead, send the version it has and the rows it already holds beyond it, (4) receive only the rows
changed since. Any node that is ahead can serve (not only the trainer). A peer that is dead or
stops answering is skipped for a while and named in `errors`; the others keep syncing.
"""

from __future__ import annotations

import logging
import pickle
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fastplan.comm.updates.scheduler import UpdateScheduler
from fastplan.comm.updates.shard_store import Delta, ShardKey, ShardStore

logger = logging.getLogger("fastplan.sync")
_LEN = struct.Struct("<q")


def encode_delta(d: Delta, complete: bool) -> bytes:
    """Compact: a small pickled header, then raw row ids, row versions and values."""
    head = pickle.dumps((d.key, d.since, d.version, d.full, complete, tuple(d.values.shape), str(d.values.dtype)))
    body = [d.rows.numpy().tobytes(), d.row_versions.numpy().tobytes(), d.values.contiguous().view(-1).view(torch.uint8).numpy().tobytes()]
    return _LEN.pack(len(head)) + head + b"".join(body)


def decode_delta(data: bytes) -> Tuple[Delta, bool]:
    (n,) = _LEN.unpack_from(data)
    key, since, version, full, complete, shape, dtype = pickle.loads(data[8 : 8 + n])
    rows_n = shape[0]
    off = 8 + n
    rows = torch.frombuffer(bytearray(data[off : off + 8 * rows_n]), dtype=torch.int64) if rows_n else torch.zeros(0, dtype=torch.int64)
    off += 8 * rows_n
    vers = torch.frombuffer(bytearray(data[off : off + 8 * rows_n]), dtype=torch.int64) if rows_n else torch.zeros(0, dtype=torch.int64)
    off += 8 * rows_n
    dt = getattr(torch, dtype.replace("torch.", ""))
    values = torch.frombuffer(bytearray(data[off:]), dtype=dt).view(shape) if rows_n else torch.zeros(shape, dtype=dt)
    return Delta(tuple(key), since, version, rows, values, vers, full), complete


def _send_msg(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LEN.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv_msg(sock: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(sock, 8))
    return _recv_exact(sock, n)


@dataclass
class SyncStats:
    bytes_sent: int = 0  # everything this node wrote as a server (responses)
    bytes_requested: int = 0  # everything this node wrote as a client (requests)
    messages: int = 0
    changed_row_bytes: int = 0  # row ids + versions + values of the rows served
    delta_bytes: int = 0  # wire bytes of delta replies (full shards excluded)
    deltas: int = 0
    full_bytes: int = 0
    full_shards: int = 0
    pulls: int = 0
    applied: int = 0


@dataclass
class PeerError:
    rank: int
    when: float
    what: str


class SyncNode:
    """Serves a `ShardStore` and, for a replica, keeps pulling it up to date from its peers."""

    def __init__(
        self,
        rank: int,
        world: int,
        store: ShardStore,
        kv_store,  # a torch.distributed Store (TCPStore/FileStore/PrefixStore) for addresses
        pull_interval_s: float = 0.01,
        timeout_s: float = 2.0,
        cooldown_s: float = 2.0,
        scheduler: Optional[UpdateScheduler] = None,
        on_apply: Optional[Callable[[ShardKey, int, Delta], None]] = None,
    ) -> None:
        self.rank = rank
        self.world = world
        self.store = store
        self.kv = kv_store
        self.lock = threading.RLock()
        self.pull_interval_s = pull_interval_s
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self.scheduler = scheduler
        self.on_apply = on_apply
        self.stats = SyncStats()
        self.errors: List[PeerError] = []
        self.serving = True  # False: accept connections but never answer (a stalled peer)
        self.paused = False  # True: stop pulling (e.g. after a rollback, until the bad update is dealt with)
        self._stop = threading.Event()
        self._avoid: Dict[int, float] = {}
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self._threads = [threading.Thread(target=self._serve, daemon=True, name=f"ekko-serve-{rank}")]
        kv_store.set(f"ekko/addr/{rank}", f"127.0.0.1:{self._listener.getsockname()[1]}")

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, pull: bool) -> "SyncNode":
        if pull:
            self._threads.append(threading.Thread(target=self._pull_loop, daemon=True, name=f"ekko-pull-{self.rank}"))
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._listener.close()

    # ---- writer API --------------------------------------------------------------------------
    def write(self, key: ShardKey, rows: torch.Tensor, values: torch.Tensor) -> int:
        with self.lock:
            return self.store.apply_update(key, rows, values)

    # ---- server ------------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(self.timeout_s * 4)
                while not self._stop.is_set():
                    request = pickle.loads(_recv_msg(conn))
                    if not self.serving:
                        time.sleep(3600)  # stalled: holds the connection, never answers
                    kind = request[0]
                    if kind == "versions":  # steps 1-2: only the shards where this node is ahead
                        theirs = request[1]
                        with self.lock:
                            ahead = {k: v for k, v in self.store.versions().items() if v > theirs.get(k, -1)}
                        reply = pickle.dumps(ahead)
                    elif kind == "delta":  # steps 3-4
                        _, key, since, known = request
                        with self.lock:
                            delta = self.store.delta_since(key, since, known)
                            complete = True
                            if self.scheduler is not None and not delta.full:
                                delta, complete = self.scheduler.select(self.store, delta)
                        reply = encode_delta(delta, complete)
                        self.stats.changed_row_bytes += delta.payload_bytes()
                        if delta.full:
                            self.stats.full_shards += 1
                            self.stats.full_bytes += len(reply) + _LEN.size
                        else:
                            self.stats.deltas += 1
                            self.stats.delta_bytes += len(reply) + _LEN.size
                    else:
                        raise ValueError(f"unknown request {kind!r}")
                    _send_msg(conn, reply)
                    self.stats.bytes_sent += len(reply) + _LEN.size
                    self.stats.messages += 1
            except (ConnectionError, OSError, EOFError):
                return

    # ---- client ------------------------------------------------------------------------------
    def _connect(self, peer: int) -> Optional[socket.socket]:
        if not self.kv.check([f"ekko/addr/{peer}"]):
            return None  # not started yet: nothing to pull from it
        host, port = self.kv.get(f"ekko/addr/{peer}").decode().rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=self.timeout_s)
        s.settimeout(self.timeout_s)
        return s

    def _request(self, sock: socket.socket, request) -> bytes:
        payload = pickle.dumps(request)
        _send_msg(sock, payload)
        self.stats.bytes_requested += len(payload) + _LEN.size
        return _recv_msg(sock)

    def _peer_failed(self, peer: int, what: str) -> None:
        self._avoid[peer] = time.monotonic() + self.cooldown_s
        self.errors.append(PeerError(peer, time.time(), what))
        logger.warning("fastplan: rank %d: peer rank %d %s", self.rank, peer, what)

    def pull_once(self) -> int:
        """One round of the four steps against every reachable peer; returns shards advanced."""
        now = time.monotonic()
        peers = [p for p in range(self.world) if p != self.rank and self._avoid.get(p, 0) <= now]
        conns: Dict[int, socket.socket] = {}
        offers: Dict[int, Dict[ShardKey, int]] = {}
        with self.lock:
            mine = self.store.versions()
        try:
            for p in peers:  # steps 1-2
                try:
                    sock = self._connect(p)
                    if sock is None:
                        continue
                    conns[p] = sock
                    offers[p] = pickle.loads(self._request(sock, ("versions", mine)))
                except socket.timeout:
                    self._peer_failed(p, f"did not answer a version request within {self.timeout_s:.1f} s")
                except (ConnectionError, OSError) as e:
                    self._peer_failed(p, f"is unreachable ({type(e).__name__}: {e})")
            advanced = 0
            for key, version in mine.items():  # steps 3-4, from the peer furthest ahead
                best = max((p for p in offers if offers[p].get(key, -1) > version), key=lambda p: (offers[p][key], -p), default=None)
                if best is None:
                    continue
                with self.lock:
                    known = self.store.known_beyond(key)
                try:
                    delta, complete = decode_delta(self._request(conns[best], ("delta", key, version, known)))
                except socket.timeout:
                    self._peer_failed(best, f"did not answer a delta request within {self.timeout_s:.1f} s")
                    offers.pop(best)
                    continue
                except (ConnectionError, OSError) as e:
                    self._peer_failed(best, f"failed during a delta ({type(e).__name__}: {e})")
                    offers.pop(best)
                    continue
                with self.lock:
                    self.store.apply_delta(delta, complete)
                    new_version = self.store.shards[key].version
                self.stats.applied += 1
                advanced += 1
                if self.on_apply is not None:
                    self.on_apply(key, new_version, delta)
            self.stats.pulls += 1
            return advanced
        finally:
            for s in conns.values():
                s.close()

    def _pull_loop(self) -> None:
        while not self._stop.is_set():
            if self.paused:
                self._stop.wait(self.pull_interval_s)
                continue
            try:
                self.pull_once()
            except Exception as e:  # noqa: BLE001 - keep syncing; surface the error
                self.errors.append(PeerError(-1, time.time(), f"pull round failed: {type(e).__name__}: {e}"))
            self._stop.wait(self.pull_interval_s)
