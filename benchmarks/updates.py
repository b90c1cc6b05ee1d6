"""Propagation of embedding updates to inference replicas (Ekko-style peer pull), in one run.

1 trainer and 4 replicas as processes on 127.0.0.1 (rendezvous through a torch.distributed
TCPStore). The trainer writes a stream of sparse updates with Zipf-skewed rows; every 10th update is
a large change to hot rows (high priority). Reported: updates/s written, propagation latency p50/p99
from trainer write to every replica holding it, bytes sent vs broadcasting the updated full shard to
every replica, and high-priority latency under a bandwidth cap with the priority scheduler vs FIFO.

    python benchmarks/updates.py
    python benchmarks/updates.py --updates 2000 --cap-kbps 300
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastplan.comm.updates.replication import StreamConfig, propagation_latencies, run_stream  # noqa: E402


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] * 1000 if values else float("nan")


def summarize(name: str, cfg: StreamConfig, results) -> dict:
    nodes = list(results["replicas"].values()) + [results["trainer"]]
    writes = results["trainer"]["writes"]
    span = writes[-1][2] - writes[0][2] if len(writes) > 1 else float("nan")
    wire = sum(n["stats"]["bytes_sent"] + n["stats"]["bytes_requested"] for n in nodes)
    broadcast = len(writes) * cfg.rows * cfg.dim * 4 * cfg.replicas
    all_lat = propagation_latencies(results)
    hot_lat = propagation_latencies(results, high_priority=True)
    return {
        "run": name,
        "updates/s": len(writes) / span,
        "p50 ms": pct(all_lat, 0.5),
        "p99 ms": pct(all_lat, 0.99),
        "hot p50 ms": pct(hot_lat, 0.5),
        "hot p99 ms": pct(hot_lat, 0.99),
        "MB sent": wire / 1e6,
        "MB broadcast": broadcast / 1e6,
        "converged": f"{len(results['trainer']['converged'])}/{cfg.replicas}",
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--updates", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--write-interval-ms", type=float, default=2.0)
    ap.add_argument("--cap-kbps", type=float, default=400.0, help="bandwidth cap (KB/s per response stream) for the scheduler runs")
    args = ap.parse_args(argv)
    base = dict(replicas=args.replicas, updates=args.updates, rows=args.rows, dim=args.dim,
                write_interval_s=args.write_interval_ms / 1000)
    runs = [
        ("uncapped", StreamConfig(**base)),
        ("cap+priority", StreamConfig(**base, scheduler="priority", bandwidth_bytes_per_s=args.cap_kbps * 1000)),
        ("cap+fifo", StreamConfig(**base, scheduler="fifo", bandwidth_bytes_per_s=args.cap_kbps * 1000)),
    ]
    rows = []
    for name, cfg in runs:
        rows.append(summarize(name, cfg, run_stream(cfg)))
        r = rows[-1]
        if len(rows) == 1:
            print(" ".join(f"{k:>13}" for k in r))
        print(" ".join(f"{v:>13.2f}" if isinstance(v, float) else f"{v:>13}" for v in r.values()), flush=True)


if __name__ == "__main__":
    main()
