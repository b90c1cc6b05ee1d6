"""Authenticated messages between the ranks of a job over ZeroMQ; libzmq's I/O thread moves the bytes.

`Mesh(store, rank, size)` binds one PULL socket per rank on 127.0.0.1 and connects one PUSH socket to
every peer's PULL; endpoints and a per-job secret are exchanged through the job's
torch.distributed store (the rendezvous every rank already trusts). Connections use ZeroMQ's PLAIN
mechanism (user = rank, password = the secret), checked by pyzmq's ZAP thread, so only members of
the job can deliver. A message is a fixed binary header (sender, tag, seq, payload size: four int64)
and one payload of bytes, in one frame (two from 64 KiB on, so that the payload leaves uncopied); small
messages held for a peer (`send(..., hold=True)`) leave back to back in one frame at `flush()`. Nothing
is deserialised beyond that header, a header that does not check out is an error naming the sender, and
oversized messages are refused by libzmq.

    mesh.send(peer, tag, seq, payload)   # never blocks: queued, then written by the I/O thread
                                         # (big payloads uncopied: returns a tracker)
    mesh.flush()                         # send what send(..., hold=True) held, one frame per peer
    mesh.recv(timeout_s) -> [Message]    # everything that arrived, waiting up to timeout_s for it
    mesh.lost() -> {peer: reason}        # peers that went away without saying goodbye
    mesh.close()                         # flush, say goodbye, close

Payloads of 64 KiB or more are sent without a copy unless asked (`send(..., copy=True)`). A peer
whose connection drops counts as lost only if its goodbye has not arrived within `grace_s` (its
last messages may still be in flight when the drop is seen).
"""

from __future__ import annotations

import logging
import math
import secrets
import struct
import time
from datetime import timedelta
from typing import Dict, List, NamedTuple, Optional

import zmq
import zmq.auth.thread
from zmq.utils.monitor import parse_monitor_message

_HEADER = struct.Struct("<qqqq")  # sender, tag, seq, payload bytes
_BYE = -1  # tag of the goodbye a closing rank sends to each peer
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: the enums' operators cost microseconds


class Message(NamedTuple):
    peer: int
    tag: int
    seq: int
    payload: memoryview  # read-only; stays valid while the Message is referenced


class MeshError(RuntimeError):
    """A peer misbehaved or could not be reached; `peer` names it."""

    def __init__(self, peer: int, reason: str) -> None:
        super().__init__(f"peer rank {peer}: {reason}")
        self.peer = peer


class Mesh:
    """One PULL socket in, one PUSH socket out per peer; endpoints and the job secret come from `store`."""

    def __init__(
        self,
        store,
        rank: int,
        size: int,
        timeout_s: float = 60.0,
        host: str = "127.0.0.1",
        max_message_bytes: int = 1 << 31,
        grace_s: float = 1.0,
    ) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in [0, {size})")
        self.rank, self.size, self.grace_s = rank, size, grace_s
        self.peers = [p for p in range(size) if p != rank]
        self._ctx = zmq.Context(io_threads=1)
        secret = _job_secret(store, rank, timeout_s)
        auth_log = logging.getLogger("fastplan.transport.auth")
        auth_log.setLevel(logging.INFO)  # pyzmq's debug lines would print the secret
        self._auth = zmq.auth.thread.ThreadAuthenticator(self._ctx, log=auth_log)
        self._auth.start()
        self._auth.configure_plain(domain="*", passwords={f"rank{p}": secret for p in range(size)})

        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.PLAIN_SERVER, 1)
        self._inbox.setsockopt(zmq.RCVHWM, 0)  # the caller's protocol bounds what is in flight
        self._inbox.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._inbox.setsockopt(zmq.LINGER, 0)
        port = self._inbox.bind_to_random_port(f"tcp://{host}")
        store.set(f"mesh/{rank}", f"tcp://{host}:{port}")

        self._outs: Dict[int, zmq.Socket] = {}
        self._monitors: Dict[zmq.Socket, int] = {}
        self._poller = zmq.Poller()
        self._poller.register(self._inbox, zmq.POLLIN)
        for p in self.peers:
            endpoint = _store_get(store, f"mesh/{p}", timeout_s, f"rank {rank} waited for peer rank {p}'s endpoint")
            d = self._ctx.socket(zmq.PUSH)
            d.setsockopt(zmq.PLAIN_USERNAME, f"rank{rank}".encode())
            d.setsockopt(zmq.PLAIN_PASSWORD, secret.encode())
            d.setsockopt(zmq.SNDHWM, 0)
            mon = d.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            d.connect(endpoint)
            self._outs[p] = d
            self._monitors[mon] = p
            self._poller.register(mon, zmq.POLLIN)
        self._dropped: Dict[int, tuple] = {}  # peer -> (monotonic time, reason)
        self._said_bye: set = set()
        self._error: Optional[MeshError] = None
        self._held: Dict[int, List[bytes]] = {}  # peer -> messages waiting for flush()

    def send(
        self, peer: int, tag: int, seq: int, payload=b"", copy: bool = False, hold: bool = False
    ) -> Optional[zmq.MessageTracker]:
        """Queue one message for `peer`; never blocks. Unless `copy`, a payload of `zmq.COPY_THRESHOLD`
        (64 KiB) or more is not copied: the returned tracker's `done` turns True once ZeroMQ no longer
        reads it (the caller must neither modify nor free the payload before). With `hold`, a smaller
        message waits for `flush()` and leaves in one frame with the others held for that peer."""
        view = memoryview(payload)
        header = _HEADER.pack(self.rank, tag, seq, view.nbytes)
        if copy or view.nbytes < zmq.COPY_THRESHOLD:
            self._held.setdefault(peer, []).append(header + view.cast("B"))
            if not hold:
                self._flush(peer)
            return None
        self._flush(peer)  # messages to a peer arrive in the order they were sent
        out = self._outs[peer]
        out.send(header, zmq.SNDMORE)
        return out.send(view, copy=False, track=True)

    def flush(self) -> None:
        """Send the held messages: one frame per peer (one wake-up of each side's I/O thread)."""
        for peer in list(self._held):
            self._flush(peer)

    def _flush(self, peer: int) -> None:
        held = self._held.pop(peer, None)
        if held:
            self._outs[peer].send(held[0] if len(held) == 1 else b"".join(held))

    def recv(self, timeout_s: float) -> List[Message]:
        """Every message that has arrived, waiting up to `timeout_s` for the first one. A malformed
        message raises `MeshError` naming its sender (after the good ones before it were returned);
        it is consumed, so calling `recv` again carries on."""
        out: List[Message] = []
        self._drain(out)
        if out or timeout_s <= 0:
            return out
        for sock, _ in self._poller.poll(math.ceil(timeout_s * 1000)):  # rounded up: no busy loop
            if sock in self._monitors:
                self._note_event(sock)
        self._drain(out)
        return out

    def lost(self) -> Dict[int, str]:
        """Peers whose connection dropped more than `grace_s` ago without a goodbye, with the reason."""
        now = time.monotonic()
        return {
            p: reason for p, (since, reason) in self._dropped.items()
            if p not in self._said_bye and now - since > self.grace_s
        }

    def close(self, linger_s: float = 1.0) -> None:
        """Say goodbye to every peer still open, give queued messages up to `linger_s` to go out, close."""
        if self._ctx.closed:
            return
        try:
            self._drain([])  # goodbyes that already arrived: those peers are gone, nothing more reaches them
        except MeshError:
            pass  # closing anyway: a malformed message left unread no longer matters
        for p in self._outs:
            if p not in self._said_bye:
                self.send(p, _BYE, 0)
            else:
                self._held.pop(p, None)
        for d in self._outs.values():
            d.setsockopt(zmq.LINGER, int(linger_s * 1000))
        for d in self._outs.values():
            d.disable_monitor()  # before closing the monitor socket: it writes a last event there
        for mon in self._monitors:
            mon.close(0)
        for d in self._outs.values():
            d.close()
        self._inbox.close(0)
        self._auth.stop()
        self._ctx.term()  # returns once the outgoing sockets have flushed (or their linger ran out)

    def _drain(self, out: List[Message]) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        try:
            self._read(out)
        except MeshError as e:
            if not out:
                raise
            self._error = e  # raised on the next call: first hand over what arrived before it

    def _read(self, out: List[Message]) -> None:
        inbox = self._inbox
        while inbox.get(_EVENTS) & _POLLIN:  # cheaper than a recv that raises zmq.Again
            frame = inbox.recv(zmq.NOBLOCK, copy=False)
            # The sender's rank as authenticated by the ZAP handler, whatever its headers claim.
            user = frame.get("User-Id")
            sender = int(user[4:]) if user.startswith("rank") and user[4:].isdigit() else -1
            if sender not in self._outs:
                self._discard_rest()
                raise MeshError(sender, f"message from {user}, not a peer of rank {self.rank}")
            data = frame.buffer
            if frame.more:  # one big message: its header, then the payload uncopied
                if len(data) != _HEADER.size:
                    self._discard_rest()
                    raise MeshError(sender, f"malformed message ({len(data)}-byte header) from {user} on rank {self.rank}")
                payload = inbox.recv(copy=False).buffer
                self._take(out, sender, data, 0, payload, bool(inbox.get(zmq.RCVMORE)))
                continue
            offset = 0  # small messages, back to back: header, payload, header, payload...
            while offset < len(data):
                if len(data) - offset < _HEADER.size:
                    raise MeshError(sender, f"malformed message ({len(data) - offset}-byte header) from {user} on rank {self.rank}")
                end = offset + _HEADER.size + _HEADER.unpack_from(data, offset)[3]
                self._take(out, sender, data, offset, data[offset + _HEADER.size:end], False)
                offset = end

    def _take(self, out: List[Message], sender: int, data, offset: int, payload: memoryview, extra: bool) -> None:
        """Check one message's header against its sender and payload, then keep it (or note a goodbye)."""
        peer, tag, seq, nbytes = _HEADER.unpack_from(data, offset)
        if peer != sender:
            self._discard_rest()
            raise MeshError(sender, f"rank{sender} sent a message claiming to come from rank {peer}")
        if payload.nbytes != nbytes or extra:
            self._discard_rest()
            raise MeshError(peer, f"rank {peer} announced {nbytes} bytes for message {seq} of tag {tag}, sent {payload.nbytes}")
        if tag == _BYE:
            self._said_bye.add(peer)
        else:
            out.append(Message(peer, tag, seq, payload))

    def _discard_rest(self) -> None:
        """Read the remaining parts of a bad message so the next one starts clean."""
        while self._inbox.get(zmq.RCVMORE):
            self._inbox.recv()

    def _note_event(self, mon: zmq.Socket) -> None:
        peer = self._monitors[mon]
        while True:
            try:
                event = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                reason = "refused our credentials (not a member of this job?)"
            else:
                reason = "connection closed (process exited?)"
            self._dropped.setdefault(peer, (time.monotonic(), reason))


def _job_secret(store, rank: int, timeout_s: float) -> str:
    if rank == 0:
        store.set("mesh/secret", secrets.token_hex(16))
    return _store_get(store, "mesh/secret", timeout_s, f"rank {rank} waited for rank 0's job secret").decode()


def _store_get(store, key: str, timeout_s: float, what: str) -> bytes:
    try:
        store.wait([key], timedelta(seconds=timeout_s))
    except Exception as e:  # the store raises a bare RuntimeError/DistStoreError on timeout
        raise TimeoutError(f"{what} ({key!r}) for {timeout_s:.0f} s: {e}") from None
    return store.get(key)
