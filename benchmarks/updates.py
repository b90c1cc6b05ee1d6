"""Propagation of embedding updates to inference replicas (Ekko-style peer pull), in one run.

1 trainer and 4 replicas as processes on 127.0.0.1. The trainer writes every table once per step
(100 steps/s) with Zipf-skewed distinct rows, at offered loads of 10 k, 100 k and 1 M rows/s.
One line per run: rows/s propagated (rows written / time until the last step was on every
replica), propagation latency p50/p99 from a step's write to every replica holding it, wire bytes
(everything every node sent, handshakes and requests included) over the changed rows' values x
replicas, convergence (sha256 of every replica = trainer), CPU cores busy during the stream (all
processes), peak RSS of the largest process, the share of parts a server built for one asker (the
rest are published steps encoded once for every asker). "of bound": rows/s over the hardware bound measured
first in the same run (loopback TCP bytes/s / (row bytes x replicas): the source sends every row to
every replica). Then high-priority latency under a bandwidth cap, priority scheduler vs FIFO.

    python benchmarks/updates.py
    python benchmarks/updates.py --loads 1000000 --duration 5
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastplan.comm.updates.replication import StreamConfig, propagation_latencies, run_stream  # noqa: E402


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] * 1000 if values else float("nan")


def loopback_bytes_per_s(total: int = 512 << 20, chunk: int = 4 << 20) -> float:
    """What one TCP stream on 127.0.0.1 carries here (sender and receiver threads, no framing)."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    buf = np.ones(chunk, np.uint8)

    def send() -> None:
        for _ in range(total // chunk):
            client.sendall(buf)

    sink = bytearray(chunk)
    t = time.perf_counter()
    sender = threading.Thread(target=send)
    sender.start()
    got = 0
    while got < total:
        got += conn.recv_into(sink)
    sender.join()
    elapsed = time.perf_counter() - t
    for s in (conn, client, server):
        s.close()
    return total / elapsed


def memcpy_bytes_per_s(total: int = 256 << 20) -> float:
    src, dst = np.ones(total, np.uint8), np.empty(total, np.uint8)
    np.copyto(dst, src)
    t = time.perf_counter()
    for _ in range(4):
        np.copyto(dst, src)
    return 4 * total / (time.perf_counter() - t)


def summarize(name: str, cfg: StreamConfig, results, bound_rows_per_s: float) -> dict:
    trainer = results["trainer"]
    nodes = list(results["replicas"].values()) + [trainer]
    writes = trainer["writes"]
    lat = propagation_latencies(results)
    hot = propagation_latencies(results, high_priority=True)
    span = writes[-1][1] + (lat[-1] if len(lat) == len(writes) else float("nan")) - writes[0][1]
    changed = trainer["rows_written"] * cfg.dim * 4 * cfg.replicas
    wire = sum(n["stats"]["bytes_out"] for n in nodes)
    errors = sum(len(n["errors"]) for n in nodes)
    parts = sum(n["stats"]["deltas"] + n["stats"]["full_shards"] for n in nodes)
    return {
        "run": name,
        "offered rows/s": cfg.rows_per_s,
        "rows/s": trainer["rows_written"] / span,
        "of bound": trainer["rows_written"] / span / bound_rows_per_s,
        "p50 ms": pct(lat, 0.5),
        "p99 ms": pct(lat, 0.99),
        "hot p50 ms": pct(hot, 0.5),
        "hot p99 ms": pct(hot, 0.99),
        "wire/changed": wire / changed,
        "wire MB": wire / 1e6,
        "converged": f"{len(trainer['converged'])}/{cfg.replicas}",
        "cores": sum(n["stream_cpu_s"] for n in nodes) / (writes[-1][1] - writes[0][1]),
        "peak MB": max(n["peak_rss_mb"] for n in nodes),
        "errors": errors,
        "built/parts": sum(n["stats"]["built"] for n in nodes) / max(1, parts),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--loads", type=float, nargs="+", default=[1e4, 1e5, 1e6], help="offered rows/s")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds of writing per run")
    ap.add_argument("--rows", type=int, default=250_000, help="rows per table (4 tables)")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--cap-load", type=float, default=1e4, help="offered rows/s for the capped runs")
    ap.add_argument("--cap-kbps", type=float, default=1000.0, help="bandwidth cap, KB/s per response stream")
    ap.add_argument("--no-cap", action="store_true", help="skip the priority vs FIFO runs")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("fastplan.ekko").setLevel(logging.ERROR)  # peer errors are counted in the table
    base = dict(replicas=args.replicas, rows=args.rows, dim=args.dim, duration_s=args.duration)
    runs = [(f"{load / 1000:g}k", StreamConfig(**base, rows_per_s=load)) for load in args.loads]
    if not args.no_cap:
        for policy in ("priority", "fifo"):
            runs.append((f"cap+{policy}", StreamConfig(**base, rows_per_s=args.cap_load, scheduler=policy, log_rows=True,
                                                       bandwidth_bytes_per_s=args.cap_kbps * 1000)))
    tcp, mem = loopback_bytes_per_s(), memcpy_bytes_per_s()
    row_bytes = args.dim * 4
    bound = tcp / (row_bytes * args.replicas)  # the source sends every changed row to every replica
    print(f"hardware: loopback TCP {tcp / 1e9:.2f} GB/s, memcpy {mem / 1e9:.2f} GB/s -> bound "
          f"{bound / 1e6:.2f} M rows/s of {row_bytes} B to {args.replicas} replicas from one source", flush=True)
    first = True
    for name, cfg in runs:
        r = summarize(name, cfg, run_stream(cfg), bound)
        if first:
            print(" ".join(f"{k:>14}" for k in r))
            first = False
        print(" ".join(f"{v:>14.2f}" if isinstance(v, float) else f"{v:>14}" for v in r.values()), flush=True)


if __name__ == "__main__":
    main()
