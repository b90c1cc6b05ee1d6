"""Transports for the all-to-all(v) alone, side by side in one run: latency, throughput, CPU per call.

Every rank runs the same calls on each candidate (4 processes on 127.0.0.1 by default). Each call
moves one block between every pair of ranks; block sizes are drawn per call and pair uniformly in
[S/2, 3S/2] bytes (seeded, the same on every rank) for S in 1 KB .. 4 MB. Candidates:

- gloo-a2a:  torch.distributed.all_to_all_single on a gloo group (the synchronous reference).
- gloo-p2p:  isend/irecv per peer on a gloo group (sizes known on both sides, no header).
- tcp-mesh:  the hand-written framed TCP mesh BLS used before (`benchmarks/tcp_mesh.py`).
- zmq:       `fastplan.comm.transport.Mesh` (ZeroMQ, libzmq I/O thread, PLAIN-authenticated); blocks
             of 64 KB or more leave without a copy and a call completes once ZeroMQ released them.
- zmq-copy:  the same, every block copied into ZeroMQ's buffer when sent.

Reported per candidate and size: latency p50/p99 of one call waited at once (max over ranks), throughput
with `--depth` calls in flight (bytes received per rank per second, mean over ranks), and CPU time per
call (the process's CPU over all its threads, mean over ranks). Received bytes are checked on every call.

    python benchmarks/bls_transport.py
    python benchmarks/bls_transport.py --sizes 1024 4194304 --calls-scale 0.5
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = (1 << 10, 1 << 14, 1 << 18, 1 << 22)
TAG = 7


def _calls_for(size: int, scale: float) -> int:
    return max(10, int(scale * {1 << 10: 1500, 1 << 14: 1000, 1 << 18: 300}.get(size, 40)))


class Candidate:
    def flush(self):
        pass

    def close(self):
        pass


class GlooA2A(Candidate):
    def __init__(self, rank, world, store, timeout_s):
        import torch.distributed as dist

        self.dist, self.group = dist, dist.new_group(backend="gloo")

    def post(self, seq, out, inp, out_splits, in_splits):
        return self.dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)

    def wait(self, work):
        work.wait()


class GlooP2P(Candidate):
    def __init__(self, rank, world, store, timeout_s):
        import torch.distributed as dist

        self.dist, self.rank, self.world = dist, rank, world
        self.group = dist.new_group(backend="gloo")

    def post(self, seq, out, inp, out_splits, in_splits):
        works, o, i = [], 0, 0
        for p in range(self.world):
            if p == self.rank:
                out[o : o + out_splits[p]].copy_(inp[i : i + in_splits[p]])
            else:
                works.append(self.dist.irecv(out[o : o + out_splits[p]], src=p, group=self.group, tag=TAG))
                works.append(self.dist.isend(inp[i : i + in_splits[p]], dst=p, group=self.group, tag=TAG))
            o += out_splits[p]
            i += in_splits[p]
        return works

    def wait(self, works):
        for w in works:
            w.wait()


class _Framed(Candidate):
    """Shared a2a logic over a framed point-to-point mesh (send whole blocks, copy arrivals into place)."""

    def post(self, seq, out, inp, out_splits, in_splits):
        src = inp.numpy()
        offsets, sent, o, i = {}, [], 0, 0
        for p in range(self.world):
            if p == self.rank:
                out[o : o + out_splits[p]].copy_(inp[i : i + in_splits[p]])
            else:
                offsets[p] = (o, out_splits[p])
                sent.append(self._send(p, seq, memoryview(src[i : i + in_splits[p]])))
            o += out_splits[p]
            i += in_splits[p]
        return seq, out.numpy(), offsets, [t for t in sent if t is not None]

    def wait(self, handle):
        seq, dst, offsets, trackers = handle
        deadline = time.monotonic() + self.timeout_s
        for p, (o, n) in offsets.items():
            data = self._recv(p, seq, deadline)
            if len(data) != n:
                raise RuntimeError(f"peer {p} sent {len(data)} bytes for call {seq}, expected {n}")
            dst[o : o + n] = memoryview(data)
        for t in trackers:  # the input may be reused once the call completed: ZeroMQ must be done with it
            t.wait(max(0.0, deadline - time.monotonic()))


class TcpMesh(_Framed):
    def __init__(self, rank, world, store, timeout_s):
        from benchmarks.tcp_mesh import SocketMesh

        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.mesh = SocketMesh(store, rank, world, timeout_s)

    def _send(self, p, seq, payload):
        self.mesh.send(p, TAG, seq, payload)

    def _recv(self, p, seq, deadline):
        return self.mesh.recv(p, TAG, seq, deadline)

    def flush(self):  # bytes move only while someone waits: push ours out before a barrier
        while self.mesh.pending_sends():
            self.mesh.progress(0.1)

    def close(self):
        self.flush()
        self.mesh.close()


class Zmq(_Framed):
    copy = False

    def __init__(self, rank, world, store, timeout_s):
        from fastplan.comm.transport import Mesh

        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.mesh = Mesh(store, rank, world, timeout_s)
        self.inbox = {}

    def _send(self, p, seq, payload):
        return self.mesh.send(p, TAG, seq, payload, copy=self.copy)

    def _recv(self, p, seq, deadline):
        while (p, seq) not in self.inbox:
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer {p} did not deliver call {seq}")
            for m in self.mesh.recv(deadline - time.monotonic()):
                self.inbox[(m.peer, m.seq)] = m.payload
        return self.inbox.pop((p, seq))

    def close(self):
        self.mesh.close()


class ZmqCopy(Zmq):
    copy = True


TRANSPORTS = {"gloo-a2a": GlooA2A, "gloo-p2p": GlooP2P, "tcp-mesh": TcpMesh, "zmq": Zmq, "zmq-copy": ZmqCopy}


def _run_candidate(name, rank, world, args, store):
    import torch
    import torch.distributed as dist

    cls = TRANSPORTS[name]
    cand = cls(rank, world, dist.PrefixStore(f"{name}/", store), args.timeout)
    rows, seq = {}, itertools.count()  # call numbers never repeat: framed meshes key arrivals by them
    for size in args.sizes:
        calls = _calls_for(size, args.calls_scale)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + size)
        matrices = [torch.randint(size // 2, size * 3 // 2 + 1, (world, world), generator=gen) for _ in range(calls)]
        inp = torch.randint(0, 256, (int(max(m[rank].sum() for m in matrices)),), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(rank))
        splits = [(m[:, rank].tolist(), m[rank].tolist()) for m in matrices]
        outs = [torch.empty(max(sum(s[0]) for s in splits), dtype=torch.uint8) for _ in range(args.depth)]

        def call_range(splits, depth):
            """Run the calls with `depth` in flight; return each call's latency (s) from post to wait."""
            pending, lat = [], []
            for c, (o_spl, i_spl) in enumerate(splits):
                t = time.perf_counter()
                pending.append((t, cand.post(next(seq), outs[c % depth][: sum(o_spl)], inp[: sum(i_spl)], o_spl, i_spl)))
                if len(pending) >= depth:
                    t0, h = pending.pop(0)
                    cand.wait(h)
                    lat.append(time.perf_counter() - t0)
            for t0, h in pending:
                cand.wait(h)
            cand.flush()
            return lat

        call_range(splits[: max(2, calls // 10)], 1)  # warm-up: connections, buffers
        dist.barrier()
        lat = sorted(call_range(splits, 1))
        dist.barrier()
        cpu0, t0 = time.process_time(), time.perf_counter()
        call_range(splits, args.depth)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        dist.barrier()
        received = sum(sum(s[0]) - s[0][rank] for s in splits)
        rows[size] = {
            "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
            "gbps": received / elapsed / 1e9,
            "cpu_ms": cpu / calls * 1e3,
            "calls": calls,
        }
    cand.close()
    return rows


def _check_call(name, rank, world, store, timeout):
    """One call with known contents per candidate: every byte from every peer lands where it belongs."""
    import torch
    import torch.distributed as dist

    cls = TRANSPORTS[name]
    cand = cls(rank, world, dist.PrefixStore(f"check-{name}/", store), timeout)
    sizes = torch.tensor([[(s * 7 + d * 3) % 5 + 1 for d in range(world)] for s in range(world)]) * 1000
    inp = torch.cat([torch.full((int(sizes[rank, d]),), (rank * 16 + d) % 256, dtype=torch.uint8) for d in range(world)])
    out = torch.empty(int(sizes[:, rank].sum()), dtype=torch.uint8)
    cand.wait(cand.post(0, out, inp, sizes[:, rank].tolist(), sizes[rank].tolist()))
    cand.flush()
    expected = torch.cat([torch.full((int(sizes[s, rank]),), (s * 16 + rank) % 256, dtype=torch.uint8) for s in range(world)])
    cand.close()
    if not torch.equal(out, expected):
        raise AssertionError(f"{name}: rank {rank} received wrong bytes")


def _worker(rank, world, port, args, queue):
    import torch
    import torch.distributed as dist

    import fastplan.comm.transport  # noqa: F401 - imports before any timed or barrier-bounded step
    import benchmarks.tcp_mesh  # noqa: F401

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=args.timeout))
    store = dist.distributed_c10d._get_default_store()
    try:
        out = {}
        for name in args.candidates:
            _check_call(name, rank, world, store, args.timeout)
            dist.barrier()
            out[name] = _run_candidate(name, rank, world, args, store)
            dist.barrier()
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    import multiprocessing as mp
    import socket

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="mean block bytes per peer pair")
    ap.add_argument("--candidates", nargs="+", default=list(TRANSPORTS), choices=list(TRANSPORTS))
    ap.add_argument("--depth", type=int, default=4, help="calls in flight for the throughput figure")
    ap.add_argument("--calls-scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args(argv)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    try:
        per_rank = gather(queue, procs, args.timeout * 10)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    print(f"{args.world} ranks, seed {args.seed}, throughput with {args.depth} calls in flight")
    print(f"{'block':>8} {'transport':>9} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'GB/s':>7} {'cpu ms/call':>11} {'p50 vs gloo-a2a':>15}")
    for size in args.sizes:
        for name in args.candidates:
            rows = [per_rank[r][name][size] for r in range(args.world)]
            p50 = max(r["p50_ms"] for r in rows)
            ref = max(per_rank[r]["gloo-a2a"][size]["p50_ms"] for r in range(args.world)) if "gloo-a2a" in args.candidates else float("nan")
            print(
                f"{_fmt(size):>8} {name:>9} {rows[0]['calls']:>6} {p50:>8.3f} {max(r['p99_ms'] for r in rows):>8.3f} "
                f"{sum(r['gbps'] for r in rows) / len(rows):>7.3f} {sum(r['cpu_ms'] for r in rows) / len(rows):>11.3f} "
                f"{p50 / ref:>14.2f}x",
                flush=True,
            )


def gather(queue, procs, timeout_s: float) -> dict:
    """{rank: result} from every worker; fails fast, naming the rank, when one dies without reporting."""
    import queue as queue_mod

    results, deadline = {}, time.monotonic() + timeout_s
    while len(results) < len(procs):
        try:
            rank, value = queue.get(timeout=1.0)
            results[rank] = value
            continue
        except queue_mod.Empty:
            pass
        dead = [r for r, p in enumerate(procs) if r not in results and not p.is_alive()]
        if dead and queue.empty():
            raise RuntimeError(f"ranks {dead} exited without a result (exit codes {[procs[r].exitcode for r in dead]})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {sorted(set(range(len(procs))) - set(results))} did not report in {timeout_s:.0f} s")
    return results


def _fmt(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB"


if __name__ == "__main__":
    main()
