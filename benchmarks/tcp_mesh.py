"""The hand-written TCP mesh BLS sent over before it adopted ZeroMQ, kept only as a baseline for
`benchmarks/bls_transport.py` (not used by the library).

Framed (tag, iteration, nbytes) messages over one non-blocking TCP connection per peer pair, moved by
whichever thread waits (select), no background threads.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import Dict, List, Tuple

_FRAME = struct.Struct("<qqq")  # tag, iteration, nbytes
_CHUNK = 1 << 20


class PeerFailure(Exception):
    def __init__(self, peer: int, reason: str) -> None:
        super().__init__(reason)
        self.peer = peer


class PeerTimeout(Exception):
    def __init__(self, peers: List[int]) -> None:
        super().__init__(f"peers {peers} timed out")
        self.peers = peers


class SocketMesh:
    """One TCP connection per peer pair; addresses exchanged through the process group's store."""

    def __init__(self, store, rank: int, size: int, timeout_s: float, host: str = "127.0.0.1") -> None:
        self.rank = rank
        self.size = size
        self.socks: Dict[int, socket.socket] = {}
        self.inbox: Dict[Tuple[int, int, int], bytearray] = {}
        self.rbuf: Dict[int, bytearray] = {}
        self.wbuf: Dict[int, bytearray] = {}
        self.dead: Dict[int, str] = {}
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(size)
        store.set(f"mesh/{rank}", f"{host}:{listener.getsockname()[1]}")
        deadline = time.monotonic() + timeout_s
        for peer in range(rank + 1, size):  # connect to higher ranks, accept from lower ones
            store.wait([f"mesh/{peer}"])
            h, p = store.get(f"mesh/{peer}").decode().rsplit(":", 1)
            s = socket.create_connection((h, int(p)), timeout=max(1.0, deadline - time.monotonic()))
            s.sendall(struct.pack("<q", rank))
            self._adopt(peer, s)
        listener.settimeout(max(1.0, deadline - time.monotonic()))
        for _ in range(rank):
            s, _ = listener.accept()
            s.settimeout(timeout_s)
            (peer,) = struct.unpack("<q", _read_exact(s, 8))
            self._adopt(peer, s)
        listener.close()

    def _adopt(self, peer: int, s: socket.socket) -> None:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        self.socks[peer] = s
        self.rbuf[peer] = bytearray()
        self.wbuf[peer] = bytearray()

    # ---- sending -----------------------------------------------------------------------------
    def send(self, peer: int, tag: int, iteration: int, payload) -> None:
        if peer in self.dead:
            raise PeerFailure(peer, self.dead[peer])
        header = _FRAME.pack(tag, iteration, len(payload))
        buf = self.wbuf[peer]
        if not buf:  # common case: hand both pieces to the kernel without joining them first
            try:
                sent = self.socks[peer].sendmsg([header, payload])
            except BlockingIOError:
                sent = 0
            except OSError as e:
                self._fail(peer, f"connection lost while sending ({e})")
                return
            total = len(header) + len(payload)
            if sent == total:
                return
            rest = (header + bytes(payload))[sent:]
            buf += rest
            return
        buf += header
        buf += payload
        self._write(peer)

    def _write(self, peer: int) -> None:
        buf = self.wbuf[peer]
        while buf:
            try:
                n = self.socks[peer].send(buf[:_CHUNK])
            except BlockingIOError:
                return
            except OSError as e:
                self._fail(peer, f"connection lost while sending ({e})")
                return
            del buf[:n]

    def pending_sends(self) -> List[int]:
        return [p for p, b in self.wbuf.items() if b and p not in self.dead]

    # ---- receiving ---------------------------------------------------------------------------
    def has(self, peer: int, tag: int, iteration: int) -> bool:
        return (peer, tag, iteration) in self.inbox

    def recv(self, peer: int, tag: int, iteration: int, deadline: float) -> bytearray:
        """Block (progressing every socket) until the frame arrives; raise naming the peer otherwise."""
        key = (peer, tag, iteration)
        if key not in self.inbox and peer not in self.dead:
            self._read(peer)  # usually already in the kernel buffer: skip select
        while True:
            data = self.inbox.pop(key, None)
            if data is not None:
                return data
            if peer in self.dead:
                raise PeerFailure(peer, self.dead[peer])
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeout([peer])
            self.progress(min(left, 0.5))

    def progress(self, timeout: float) -> None:
        """Move bytes: read whatever arrived, write whatever is queued, waiting up to `timeout`."""
        live = {p: s for p, s in self.socks.items() if p not in self.dead}
        if not live:
            return
        writers = [live[p] for p in self.pending_sends() if p in live]
        readable, writable, _ = select.select(list(live.values()), writers, [], timeout)
        by_sock = {s: p for p, s in live.items()}
        for s in writable:
            self._write(by_sock[s])
        for s in readable:
            self._read(by_sock[s])

    def _read(self, peer: int) -> None:
        s = self.socks[peer]
        buf = self.rbuf[peer]
        while True:
            try:
                chunk = s.recv(_CHUNK)
            except BlockingIOError:
                break
            except OSError as e:
                self._fail(peer, f"connection lost ({e})")
                return
            if not chunk:
                self._fail(peer, "connection closed by peer (process exited?)")
                break
            buf += chunk
            if len(chunk) < _CHUNK:
                break
        while len(buf) >= _FRAME.size:
            tag, iteration, nbytes = _FRAME.unpack_from(buf)
            end = _FRAME.size + nbytes
            if len(buf) < end:
                break
            self.inbox[(peer, tag, iteration)] = buf[_FRAME.size : end]
            del buf[:end]

    def _fail(self, peer: int, reason: str) -> None:
        self.dead.setdefault(peer, reason)

    def close(self) -> None:
        for s in self.socks.values():
            try:
                s.close()
            except OSError:
                pass


def _read_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("peer closed during handshake")
        out += chunk
    return out

