"""The ekko wire: crafted bytes, pickles and strangers are refused by name, nothing is unpickled,
and the node keeps serving its real peers."""

import os
from dataclasses import replace
import pickle
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fastplan.comm.updates.channel import PeerError, connect_peer
from fastplan.comm.updates.layout import Layout
from fastplan.comm.updates.shard_store import ShardStore
from fastplan.comm.updates.sync import SyncConfig, SyncNode
from fastplan.comm.updates.wire import (
    MAX_PARTS, Ask, Delta, Kind, WireError, decode_delta_reply, decode_delta_request, encode_delta_reply, encode_delta_request,
    encode_part, header,
)

KEYS = [("a", 0), ("b", 0)]


def new_store(seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(64, 8, generator=g) for k in KEYS}
    return ShardStore(Layout.from_tensors(tensors), tensors)


class Boom:
    def __reduce__(self):
        return (os.mkdir, (BOOM_DIR,))


BOOM_DIR = ""


@pytest.fixture
def job(tmp_path):
    kv = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    cfg = SyncConfig(timeout_s=1.0, cooldown_s=0.05)
    source = SyncNode(0, 2, new_store(), kv, source=True, config=cfg).start(pull=False)
    yield kv, source, cfg
    source.stop()


def addr(kv, rank):
    host, port, _ = kv.get(f"ekko/addr/{rank}").decode().rsplit(":", 2)
    return host, int(port)


def wait_for(cond, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.01)


def replica_converges(kv, source, cfg):
    replica = SyncNode(1, 2, new_store(), kv, config=cfg).start(pull=True)
    try:
        source.publish({KEYS[0]: (torch.tensor([5, 1]), torch.ones(2, 8))})
        wait_for(lambda: replica.store.checksum() == source.store.checksum(), "the replica to converge")
        assert replica.store.versions() == source.store.versions()
        assert not replica.errors
    finally:
        replica.stop()


def test_a_pickle_sent_to_a_node_never_runs_and_the_node_keeps_serving(job, tmp_path):
    global BOOM_DIR
    kv, source, cfg = job
    BOOM_DIR = str(tmp_path / "pwned")
    payload = pickle.dumps(Boom())
    for framed in (payload, header(Kind.AUTH, 0, len(payload)) + payload):  # raw, and inside a valid header
        with socket.create_connection(addr(kv, 0), timeout=2) as s:
            s.sendall(framed)
            s.settimeout(2)
            got = b""
            try:
                while chunk := s.recv(4096):
                    got += chunk  # HELLO, then an ERROR saying why, then the node hangs up
            except ConnectionResetError:
                pass  # closed with our unread bytes in its buffer
        assert got[:4] == b"EKKO"
    assert not os.path.exists(BOOM_DIR)
    wait_for(lambda: len(source.errors) >= 2, "the node to record both strangers")
    assert all(e.rank == -1 and "127.0.0.1:" in e.what for e in source.errors), source.errors
    replica_converges(kv, source, cfg)


def test_a_peer_without_the_job_secret_is_refused_by_name(job):
    kv, source, cfg = job
    with pytest.raises(PeerError, match=r"rank 0 .*(refused|authentication)"):
        connect_peer(addr(kv, 0), 0, b"x" * 32, source.store.layout, 1, 1 << 20, timeout=2)
    wait_for(lambda: source.errors, "the node to record the failed authentication")
    assert "claims rank 1" in source.errors[0].what and "failed authentication" in source.errors[0].what
    replica_converges(kv, source, cfg)


def test_an_authenticated_peer_sending_garbage_or_oversized_messages_is_dropped_by_name(job):
    kv, source, cfg = job
    for kind, body, size in [(Kind.DELTA, pickle.dumps(Boom()), None), (Kind.DELTA, b"", 1 << 40),
                             (Kind.WELCOME, b"", None)]:
        chan = connect_peer(addr(kv, 0), 0, source.secret, source.store.layout, 1, 1 << 20, timeout=2)
        if size is None:
            chan.send(kind, 1, [body])
        else:
            chan.sock.sendall(header(kind, 1, size))
        with pytest.raises(PeerError, match="refused: malformed request"):
            chan.recv(2, "the refusal")
        chan.close()
    wait_for(lambda: len(source.errors) >= 3, "the node to record three faults")
    assert all("rank 1 (127.0.0.1:" in e.what for e in source.errors), source.errors
    assert "exceeds the limit" in source.errors[1].what
    replica_converges(kv, source, cfg)


def wire_bytes(bufs):
    return b"".join(np.ascontiguousarray(b).tobytes() if isinstance(b, np.ndarray) else bytes(b) for b in bufs)


def test_decoders_raise_only_wire_errors_on_mutated_bytes():
    store = new_store()
    store.apply_update(KEYS[0], torch.tensor([1, 9, 30]), torch.ones(3, 8))
    store.apply_update(KEYS[1], torch.arange(64), torch.zeros(64, 8))
    layout = store.layout
    parts = [encode_part(store.delta_since(0, 0)), encode_part(store.delta_since(1, 0))]
    reply = wire_bytes(encode_delta_reply(parts))
    request = wire_bytes(encode_delta_request([Ask(0, 0), Ask(1, 3)], 7))
    decoded = decode_delta_reply(reply, 2, layout)
    assert [d.rows.tolist() for d in decoded] == [[1, 9, 30], list(range(64))]
    assert decode_delta_request(request, 2, layout)[1] == 7
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(3000):
        for body, count, decode in ((reply, 2, decode_delta_reply), (request, 2, lambda *a: decode_delta_request(*a)[0])):
            b = bytearray(body)
            for _ in range(rng.integers(1, 4)):
                if rng.random() < 0.7 and len(b):
                    b[rng.integers(len(b))] = rng.integers(256)
                else:
                    b = b[: rng.integers(len(b) + 1)] if rng.random() < 0.5 else b + bytes(rng.integers(1, 16))
            try:
                out = decode(memoryview(bytes(b)), int(rng.integers(0, 4)) if i % 7 == 0 else count, layout)
            except WireError:
                outcomes["refused"] += 1
                continue
            outcomes["ok"] += 1
            for d in out:  # what got through is within the layout
                assert 0 <= d.shard < len(layout)
                if isinstance(d, Delta) and d.rows is not None and len(d.rows):
                    assert 0 <= d.rows.min() and d.rows.max() < layout.specs[d.shard].rows
                    assert d.since < d.row_versions.min() and d.row_versions.max() <= d.version
    assert outcomes["refused"] > 1000, outcomes


def test_a_shards_parts_must_chain_and_carry_no_row_version_above_their_own():
    store = new_store()
    steps = [store.apply_update(KEYS[0], torch.tensor([v, 20 + v]), torch.full((2, 8), float(v))) for v in range(2)]
    first, second = (encode_part(d) for d in steps)
    layout = store.layout
    assert [d.version for d in decode_delta_reply(wire_bytes(encode_delta_reply([first, second])), 2, layout)] == [1, 2]
    with pytest.raises(WireError, match=r"shard \('a', 0\): a part starting at 0 follows one reaching \(2"):
        decode_delta_reply(wire_bytes(encode_delta_reply([second, first])), 2, layout)
    lying = Delta(0, 0, 1, np.array([3, 4]), steps[0].values, np.array([1, 99]))  # row 4 "at v99": later updates skipped
    with pytest.raises(WireError, match=r"shard \('a', 0\): row version 99 outside \[1, 1\]"):
        decode_delta_reply(wire_bytes(encode_delta_reply([encode_part(lying)])), 1, layout)
    with pytest.raises(WireError, match="parts exceed the limit"):
        decode_delta_reply(memoryview(bytes(64)), MAX_PARTS + 1, layout)


def test_row_ids_are_checked_in_every_part_of_a_reply_and_the_part_at_fault_is_named():
    store = new_store()
    a = encode_part(store.apply_update(KEYS[0], torch.tensor([5, 40]), torch.ones(2, 8)))
    b = encode_part(store.apply_update(KEYS[1], torch.tensor([1, 2, 63]), torch.ones(3, 8)))
    layout = store.layout
    decoded = decode_delta_reply(wire_bytes(encode_delta_reply([a, b])), 2, layout)
    assert [d.rows.tolist() for d in decoded] == [[5, 40], [1, 2, 63]]  # b may start below where a ended
    for key, part, rows, message in ((KEYS[1], b, [2, 2, 63], "not strictly increasing"), (KEYS[1], b, [1, 2, 64], "64 out of range"),
                                     (KEYS[1], b, [-1, 2, 63], "-1 out of range"), (KEYS[0], a, [40, 5], "not strictly increasing")):
        bad = replace(part, rows=np.array(rows, "<i4"))
        parts = [a, bad] if part is b else [bad, b]
        with pytest.raises(WireError, match=rf"shard \('{key[0]}', 0\), row ids: row id.*{message}"):
            decode_delta_reply(wire_bytes(encode_delta_reply(parts)), 2, layout)
