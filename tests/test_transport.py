"""The ZeroMQ mesh between ranks: messages arrive whole and named, outsiders cannot deliver, a member's
malformed message is an error naming it, a dead peer is reported by rank, opening and closing never hangs."""

import os
import time

from tests.multiproc import run_ranks


def _exchange(rank, world, cycles):
    import torch.distributed as dist

    from fastplan.comm.transport import Mesh

    store = dist.distributed_c10d._get_default_store()
    got = []
    for cycle in range(cycles):  # open and close repeatedly: every close must return
        mesh = Mesh(dist.PrefixStore(f"cycle{cycle}/", store), rank, world, timeout_s=30)
        trackers = []
        held = cycle % 2 == 1  # odd cycles: the small messages are held, then leave in one frame
        for p in mesh.peers:
            mesh.send(p, tag=9, seq=cycle, payload=b"", hold=held)
            mesh.send(p, tag=8, seq=cycle, payload=bytes([rank]) * 3, hold=held)
            big = bytes([rank, p]) * (40_000 * (1 + cycle % 2))  # 80 KB (sent uncopied) or 160 KB
            trackers.append(mesh.send(p, tag=7, seq=cycle, payload=big))  # sends what is held first
            mesh.send(p, tag=10, seq=cycle, payload=b"end", hold=held)
        mesh.flush()
        deadline = time.monotonic() + 30
        messages = []
        while len(messages) < 4 * len(mesh.peers) and time.monotonic() < deadline:
            messages += mesh.recv(1.0)
        # Sorted by peer only: each peer's messages stay in arrival order.
        got.append(sorted(((m.peer, m.tag, m.seq, len(m.payload), bytes(m.payload[:2])) for m in messages), key=lambda m: m[0]))
        for t in trackers:
            t.wait(30)
        mesh.close()
    return got


def test_messages_arrive_whole_from_the_named_peer_and_the_mesh_reopens_cleanly():
    world, cycles = 3, 12
    results = run_ranks(_exchange, world, args=(cycles,), timeout_s=120)
    for rank, (status, got) in results.items():
        assert status == "ok", f"rank {rank}: {got}"
        for cycle, messages in enumerate(got):
            size = 80_000 * (1 + cycle % 2)
            expected = [
                m for p in range(world) if p != rank
                for m in [(p, 9, cycle, 0, b""), (p, 8, cycle, 3, bytes([p, p])), (p, 7, cycle, size, bytes([p, rank])),
                          (p, 10, cycle, 3, b"en")]
            ]
            assert messages == expected, f"rank {rank}, cycle {cycle}"


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('FASTPLAN_PWNED', '/tmp/fastplan-pwned')}",))


def _outsiders(rank, world, marker):
    import pickle
    import socket

    import torch.distributed as dist
    import zmq

    from fastplan.comm.transport import _HEADER, Mesh, MeshError

    store = dist.distributed_c10d._get_default_store()
    mesh = Mesh(store, rank, world, timeout_s=30)
    os.environ["FASTPLAN_PWNED"] = marker
    if rank == 1:
        host, port = store.get("mesh/0").decode().removeprefix("tcp://").rsplit(":", 1)
        crafted = [_HEADER.pack(1, 7, 0, 0), pickle.dumps(_Exploit())]
        ctx = zmq.Context()
        for password in (b"guess", b"0" * 32, None):  # ZeroMQ peers without the job secret
            intruder = ctx.socket(zmq.PUSH)
            if password is not None:  # None: no credentials at all (ZeroMQ's NULL mechanism)
                intruder.setsockopt(zmq.PLAIN_USERNAME, b"rank1")
                intruder.setsockopt(zmq.PLAIN_PASSWORD, password)
            intruder.setsockopt(zmq.LINGER, 0)
            intruder.connect(f"tcp://{host}:{port}")
            intruder.send_multipart(crafted)
        with socket.create_connection((host, int(port))) as raw:  # raw bytes, no ZeroMQ handshake
            raw.sendall(b"".join(crafted) * 4)
        time.sleep(1.0)
        ctx.destroy(linger=0)
        mesh.send(0, tag=7, seq=1, payload=b"legit")
        mesh._outs[0].send(b"short header")  # a member's malformed message
        mesh._outs[0].send(b"x")
        time.sleep(1.0)
        mesh.close()
        return None
    received, error = [], None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and error is None:
        try:
            received += [(m.peer, m.tag, m.seq, bytes(m.payload)) for m in mesh.recv(0.5)]
        except MeshError as e:
            error = str(e)
    mesh.close()
    return received, error


def test_outsiders_cannot_deliver_and_nothing_received_is_unpickled(tmp_path):
    marker = str(tmp_path / "pwned")
    results = run_ranks(_outsiders, 2, args=(marker,), timeout_s=90)
    status, value = results[0]
    assert status == "ok", value
    received, error = value
    assert received == [(1, 7, 1, b"legit")]  # only the member's message, nothing from the intruders
    assert error is not None and "malformed" in error and "peer rank 1" in error
    assert not os.path.exists(marker)


def _dies(rank, world):
    import torch.distributed as dist

    from fastplan.comm.transport import Mesh

    mesh = Mesh(dist.distributed_c10d._get_default_store(), rank, world, timeout_s=30, grace_s=0.5)
    if rank == 2:
        time.sleep(1.0)
        os._exit(0)  # no goodbye
    deadline = time.monotonic() + 20
    while not mesh.lost() and time.monotonic() < deadline:
        mesh.recv(0.2)
    lost = mesh.lost()
    mesh.close()
    return lost


def test_a_peer_that_exits_without_goodbye_is_reported_lost_by_rank():
    results = run_ranks(_dies, 3, timeout_s=60)
    for rank in (0, 1):
        status, lost = results[rank]
        assert status == "ok", lost
        assert list(lost) == [2] and "closed" in lost[2]
