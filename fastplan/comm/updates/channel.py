"""One TCP connection between two ekko nodes: framed messages with deadlines and a size limit, and
an HMAC challenge-response in both directions proving that each end holds the job's secret and
the same shard layout. Until that handshake passes, a peer may send only a few hundred bytes.

Sockets block, with the kernel's send/receive timeouts as deadlines, so a message of any size moves
in one system call each way (MSG_WAITALL): a thread takes Python's GIL back once per message, not
once per socket buffer, which is what kept busy processes from filling the wire."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import struct
import time
from typing import Sequence, Tuple

import numpy as np

from fastplan.comm.updates.layout import Layout
from fastplan.comm.updates.wire import HEADER, Kind, WireError, decode_error, decode_handshake, encode_handshake, header, parse_header

PREAUTH_LIMIT = 256  # bytes a peer may send before it has authenticated
SOCKET_BUFFER = 4 << 20  # kernel buffer per direction (capped by net.core.wmem_max / rmem_max)
_RANKS = struct.Struct("<ii")
_TIMEVAL = struct.Struct("@ll")  # struct timeval


class PeerError(Exception):
    """A peer broke the protocol, failed to authenticate, or went away; names the peer."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"peer {peer} {reason}")
        self.peer = peer
        self.reason = reason


class PeerTimeout(PeerError):
    pass


def job_secret(kv, prefix: str = "ekko") -> bytes:
    """The job's shared secret: created once in the rendezvous store (atomically), read by every node."""
    return bytes.fromhex(kv.compare_set(f"{prefix}/secret", "", secrets.token_hex(32)).decode())


def _mac(secret: bytes, role: bytes, nonce_a: bytes, nonce_b: bytes, layout: Layout, client: int, server: int) -> bytes:
    msg = role + nonce_a + nonce_b + layout.digest + _RANKS.pack(client, server)
    return hmac.new(secret, msg, hashlib.sha256).digest()


class Channel:
    """Framed, deadline-bounded messages over one socket. `recv` returns a view into a buffer
    reused by the next `recv`."""

    def __init__(self, sock: socket.socket, peer: str, limit: int = PREAUTH_LIMIT) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):  # a reply leaves in one send, without waits
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        sock.settimeout(None)
        self.sock = sock
        self.peer = peer
        self.limit = limit
        self.bytes_out = 0
        self.bytes_in = 0
        self._head = bytearray(HEADER.size)
        self._buf = np.empty(0, np.uint8)

    def send(self, kind: Kind, count: int, bufs: Sequence = (), timeout: float = 10.0) -> int:
        views = [memoryview(b).cast("B") for b in bufs]
        views = [v for v in views if len(v)]
        n = sum(len(v) for v in views)
        views.insert(0, memoryview(header(kind, count, n)))
        deadline = time.monotonic() + timeout
        try:
            while views:
                self._deadline(socket.SO_SNDTIMEO, deadline)
                sent = self.sock.sendmsg(views[:512])
                while views and sent >= len(views[0]):
                    sent -= len(views.pop(0))
                if sent:
                    views[0] = views[0][sent:]
        except (socket.timeout, BlockingIOError):
            raise PeerTimeout(self.peer, f"did not take a {kind.name} message within {timeout:.1f} s") from None
        except OSError as e:
            raise PeerError(self.peer, f"connection lost while sending ({e})") from None
        self.bytes_out += HEADER.size + n
        return HEADER.size + n

    def recv(self, timeout: float, waiting_for: str = "a message") -> Tuple[Kind, int, memoryview]:
        deadline = time.monotonic() + timeout
        self._fill(memoryview(self._head), deadline, waiting_for)
        kind, count, n = parse_header(self._head, self.limit)  # WireError: the caller names the peer
        if len(self._buf) < n:  # grown geometrically and never zeroed: replies vary in size
            self._buf = np.empty(max(n, min(2 * len(self._buf), self.limit)), np.uint8)
        body = memoryview(self._buf)[:n]
        self._fill(body, deadline, waiting_for)
        self.bytes_in += HEADER.size + n
        if kind is Kind.ERROR:
            raise PeerError(self.peer, f"refused: {decode_error(body)}")
        return kind, count, body

    def _fill(self, view: memoryview, deadline: float, waiting_for: str) -> None:
        got = 0
        while got < len(view):
            try:
                self._deadline(socket.SO_RCVTIMEO, deadline)
                k = self.sock.recv_into(view[got:], 0, socket.MSG_WAITALL)
            except (socket.timeout, BlockingIOError):
                raise PeerTimeout(self.peer, f"did not answer {waiting_for} in time") from None
            except OSError as e:
                raise PeerError(self.peer, f"connection lost ({e})") from None
            if k == 0:
                raise PeerError(self.peer, "closed the connection")
            got += k

    def _deadline(self, option: int, deadline: float) -> None:
        """The kernel gives up on the next send/receive at `deadline` (raises socket.timeout if past)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout
        self.sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(int(left), max(1, int(left % 1 * 1e6))))

    def refuse(self, reason: str) -> None:
        """Tell the peer why it is being dropped (best effort), then close."""
        try:
            self.send(Kind.ERROR, 0, [reason.encode()[:4096]], timeout=0.5)
        except PeerError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def accept_peer(chan: Channel, secret: bytes, layout: Layout, rank: int, limit: int, timeout: float) -> int:
    """Server side of the handshake; returns the authenticated peer rank (raises PeerError)."""
    nonce = os.urandom(32)
    chan.send(Kind.HELLO, 0, [encode_handshake(nonce, layout.digest, rank)], timeout)
    kind, _, body = chan.recv(timeout, "the authentication challenge")
    if kind is not Kind.AUTH:
        raise PeerError(chan.peer, f"sent {kind.name} before authenticating")
    try:
        their_nonce, mac, their_rank = decode_handshake(body, "auth")
    except WireError as e:
        raise PeerError(chan.peer, f"sent a malformed message: {e}") from None
    if not hmac.compare_digest(mac, _mac(secret, b"client", nonce, their_nonce, layout, their_rank, rank)):
        raise PeerError(f"{chan.peer} (claims rank {their_rank})", "failed authentication (wrong job secret or shard layout)")
    chan.send(Kind.WELCOME, 0, [_mac(secret, b"server", their_nonce, nonce, layout, their_rank, rank)], timeout)
    chan.peer = f"rank {their_rank} ({chan.peer})"
    chan.limit = limit
    return their_rank


def connect_peer(addr: Tuple[str, int], peer_rank: int, secret: bytes, layout: Layout, rank: int, limit: int,
                 timeout: float) -> Channel:
    """Client side: connect, check the server's layout and rank, prove membership, verify the server's proof."""
    name = f"rank {peer_rank} ({addr[0]}:{addr[1]})"
    try:
        sock = socket.create_connection(addr, timeout=timeout)
    except OSError as e:
        raise PeerError(name, f"is unreachable ({type(e).__name__}: {e})") from None
    chan = Channel(sock, name)
    try:
        kind, _, body = chan.recv(timeout, "the connection greeting")
        if kind is not Kind.HELLO:
            raise PeerError(name, f"greeted with {kind.name}, expected HELLO")
        try:
            nonce, digest, their_rank = decode_handshake(body, "hello")
        except WireError as e:
            raise PeerError(name, f"sent a malformed greeting: {e}") from None
        if their_rank != peer_rank:
            raise PeerError(name, f"answers as rank {their_rank}")
        if digest != layout.digest:
            raise PeerError(name, "holds a different shard layout (plan) than this node")
        mine = os.urandom(32)
        chan.send(Kind.AUTH, 0, [encode_handshake(mine, _mac(secret, b"client", nonce, mine, layout, rank, peer_rank), rank)], timeout)
        kind, _, body = chan.recv(timeout, "the authentication reply")
        if kind is not Kind.WELCOME or len(body) != 32:
            raise PeerError(name, f"answered authentication with {kind.name}")
        if not hmac.compare_digest(bytes(body), _mac(secret, b"server", mine, nonce, layout, rank, peer_rank)):
            raise PeerError(name, "failed authentication (wrong job secret)")
    except BaseException:
        chan.close()
        raise
    chan.limit = limit
    return chan
