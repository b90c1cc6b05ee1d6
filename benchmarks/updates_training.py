"""Online updates end to end, in one run: 2 TorchRec DMP trainer ranks (gloo) train an
EmbeddingBagCollection with a fused SGD optimizer; after every step each rank publishes the rows
TorchRec's ModelDeltaTracker saw touched; N inference replicas pull them into an unsharded EBC
while a thread on each keeps answering requests.

One line: training steps/s, rows published/s, propagation latency p50/p99 (a step published ->
every replica holds every shard it changed), serving requests/s and latency p50/p99 per replica
while updates land, wire bytes over what had to travel (changed rows x replicas, plus the whole
shards each replica first syncs), peak RSS, and the final check:
every replica's shards byte-equal to the trainers' and its pooled outputs on an eval batch equal
to the DMP model's.

    python benchmarks/updates_training.py
    python benchmarks/updates_training.py --steps 200 --replicas 4
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastplan.comm.updates.online_stream import OnlineConfig, run_online, step_latencies  # noqa: E402


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] * 1000 if values else float("nan")


def summarize(cfg: OnlineConfig, r) -> dict:
    trainers, replicas = list(r["trainer"].values()), list(r["replicas"].values())
    train_s = max(t["train_s"] for t in trainers)
    rows = sum(n for t in trainers for *_, n in t["steps"])
    lat = step_latencies(r)
    served = [s for rep in replicas for _, s in rep["served"]]
    wire = sum(n["stats"]["bytes_out"] for n in trainers + replicas)
    full_rows = sum(n["stats"]["full_rows"] for n in trainers + replicas)  # a replica's first sync: whole shards
    needed = (rows * cfg.replicas + full_rows) * cfg.dim * 4
    return {
        "steps/s": cfg.steps / train_s,
        "rows/s": rows / train_s,
        "p50 ms": pct(lat, 0.5),
        "p99 ms": pct(lat, 0.99),
        "serve req/s": len(served) / len(replicas) / train_s,
        "serve p50 ms": pct(served, 0.5),
        "serve p99 ms": pct(served, 0.99),
        "wire/needed": wire / needed,
        "peak MB": max(n["peak_rss_mb"] for n in trainers + replicas),
        "byte-equal": f"{sum(rep['converged'] for rep in replicas)}/{cfg.replicas}",
        "outputs equal": f"{sum(rep['outputs_equal'] for rep in replicas)}/{cfg.replicas}",
        "errors": sum(len(n["errors"]) for n in trainers + replicas),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rows", type=int, default=100_000, help="rows per table (4 tables)")
    ap.add_argument("--batch-size", type=int, default=512, help="per trainer rank")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # TorchRec's planner notices; peer faults are counted in "errors"
    cfg = OnlineConfig(replicas=args.replicas, steps=args.steps, rows=args.rows, batch_size=args.batch_size)
    r = summarize(cfg, run_online(cfg))
    print(" ".join(f"{k:>13}" for k in r))
    print(" ".join(f"{v:>13.2f}" if isinstance(v, float) else f"{v:>13}" for v in r.values()), flush=True)


if __name__ == "__main__":
    main()
