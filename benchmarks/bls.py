"""Bounded-lag inference vs the synchronous forward and every pipelined baseline, side by side in one run.

A small DLRM (tables sharded by fastplan, table-wise) runs sharded inference on gloo processes on
127.0.0.1. Each batch's lookup does injected work (a sleep, seeded per batch and rank):

- balanced:  every rank `base` ms.
- jitter:    plus an exponential delay per rank and batch (mean `jitter` ms, capped at 30 ms).
- skew:      one hot rank per batch (seeded) gets 4x the ids in its batch and `hot` ms more work.
- straggler: the last rank always does `hot / 2` ms more.

Modes:
- sync:       the stock sharded forward (every all-to-all waited at once).
- torchrec:   TorchRec's `EvalPipelineSparseDist` (input dist of batch i+1 overlaps the forward of
              batch i; the one of TorchRec's eval pipelines that runs on CPU/gloo:
              `EvalPipelineCPUSparse` needs pinned memory and a GPU for the dense part).
- control-L:  plain async gloo all_to_all_single with every wait deferred by L batches per stage
              (input dist b, splits b-L, lookup b-2L, dense b-3L).
- bls-L:      `BLSInferencePipeline` on the "bls" group: stages start when their data arrived, at
              most L batches ahead of the slowest peer.

Each mode runs twice per scenario. Closed loop (the source hands out batches as fast as they are
taken): ms/batch (slowest rank), latency p50/p99 from the moment the pipeline takes a batch from its
source to its output (TorchRec's loader thread takes a batch one step before its pipeline starts
it), CPU ms per batch (all threads, mean over ranks), peak RSS during the mode (max over ranks).
Open loop (`--load`, default 0.7): batch b is due at start + b * interval, the interval being sync's
closed-loop ms/batch / load, so every mode runs below saturation; latency p50/p99 counts from the
due time (waiting for the pipeline included) and is divided by sync's. A saturating source keeps any
pipeline full, so latency is only comparable here. The fixed-delay pipelines (torchrec, control)
block in their source until the next batch is due; the BLS pipeline's source answers `NotYet` and it
carries on meanwhile. `identical`: batches bitwise equal to the sync run in both passes. The last
column divides bls-L's closed-loop ms/batch by the best of torchrec and control-L.

    python benchmarks/bls.py                          # 4 ranks, writes bls.png
    python benchmarks/bls.py --world-sizes 2 4 --batches 60 --seed 3
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import sys
import time
import warnings
from collections import deque

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCENARIOS = ("balanced", "jitter", "skew", "straggler")


def _delay_ms(scenario: str, batch: int, rank: int, world: int, args) -> float:
    rng = random.Random(hash((batch, rank, args.seed)) & 0xFFFFFFFF)
    base = args.base
    if scenario == "jitter":
        return base + min(30.0, rng.expovariate(1.0 / args.jitter))
    if scenario == "skew":
        return base + (args.hot if rank == _hot_rank(batch, world, args.seed) else 0.0)
    if scenario == "straggler":
        return base + (args.hot / 2 if rank == world - 1 else 0.0)
    return base


def _hot_rank(batch: int, world: int, seed: int) -> int:
    return random.Random(batch * 7919 + seed).randrange(world)


def inject_lookup_work(sparse, delay_ms) -> None:
    """Sleep `delay_ms(b)` before the b-th lookup of this sharded module (every pipeline looks up in order)."""
    lookup = sparse.compute_and_output_dist
    count = iter(range(1 << 62))

    def delayed(ctx, features):
        time.sleep(delay_ms(next(count)) / 1000.0)
        return lookup(ctx, features)

    sparse.compute_and_output_dist = delayed


def deferred_waits(sparse, dense, lag: int, batches):
    """The async control: at step s, input dist of s, splits of s-L, lookup of s-2L, dense of s-3L."""
    first, second, pooled, dense_in, ctx = {}, {}, {}, {}, {}
    source, n, s = iter(batches), None, 0
    while n is None or s < n + 3 * lag:
        if n is None:
            batch = next(source, None)
            if batch is None:
                n = s
            else:
                dense_in[s], features = batch
                ctx[s] = sparse.create_context()
                first[s] = sparse.input_dist(ctx[s], features)
        if s - lag in first:
            second[s - lag] = first.pop(s - lag).wait()
        b = s - 2 * lag
        if b in second:
            pooled[b] = sparse.compute_and_output_dist(ctx[b], second.pop(b).wait())
        b = s - 3 * lag
        if b in pooled:
            del ctx[b]
            yield dense(dense_in.pop(b), pooled.pop(b).wait())
        s += 1


def _modes(args) -> list:
    lagged = [f"{kind}-{L}" for kind in ("control", "bls") for L in args.lags]
    return ["sync"] + [m for m in ["torchrec"] + lagged if args.modes is None or m.split("-")[0] in args.modes]


def _rank_main(rank: int, world: int, args) -> dict:
    import torch
    import torch.distributed as dist
    from torchrec.datasets.utils import Batch as TorchRecBatch
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner.types import ParameterConstraints, Topology
    from torchrec.distributed.train_pipeline import EvalPipelineSparseDist
    from torchrec.distributed.types import ShardingEnv

    from fastplan import FastShardingPlanner
    from fastplan.comm import BLSInferencePipeline, new_bls_group
    from fastplan.models import SmallDLRM, random_batches, report_tables

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)  # one intra-op thread per rank: ranks share the cores without spin contention

    class DenseSharder(EmbeddingBagCollectionSharder):
        def compute_kernels(self, sharding_type, device):
            return ["dense"]

    class BatchDLRM(SmallDLRM):
        """TorchRec's pipelines call model(batch) and take (loss, output)."""

        def forward(self, batch):
            out = self.dense(batch.dense_features, self.sparse(batch.sparse_features))
            return out.sum(), out

    tables = report_tables(args.tables, seed=1)
    constraints = {t.name: ParameterConstraints(sharding_types=["table_wise"]) for t in tables}
    planner = FastShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints, cache=None, debug=False
    )
    sharders = [DenseSharder()]

    def model(cls=SmallDLRM):
        torch.manual_seed(0)
        return cls(tables, dense_in=16, hidden=64)

    plan = planner.collective_plan(model(), sharders)

    def run_mode(scenario, mode, batches, interval_s, reference):
        """One pass of `mode` over `batches`: closed loop (interval_s None) or one batch due every interval_s."""
        lag = int(mode.split("-")[1]) if "-" in mode else 0
        group = new_bls_group(lag, timeout_s=120) if mode.startswith("bls") else dist.new_group(backend="gloo")
        cls = BatchDLRM if mode == "torchrec" else SmallDLRM
        dmp = DistributedModelParallel(model(cls), device=torch.device("cpu"), plan=plan, sharders=sharders,
                                       env=ShardingEnv.from_process_group(group))
        dmp.eval()
        inner = dmp.module
        inject_lookup_work(inner.sparse, lambda b: _delay_ms(scenario, b, rank, world, args))
        issued = deque()
        # Only the BLS pipeline takes a source that may answer "not yet"; the others block in next().
        clock = {"t0": 0.0}

        def source(items):
            return arrivals(items, interval_s, clock["t0"], issued, waits=not mode.startswith("bls"))

        if mode == "torchrec":
            pipe = EvalPipelineSparseDist(dmp, torch.optim.SGD(dmp.parameters(), lr=0.0), torch.device("cpu"))

            def outputs():
                feed = source([TorchRecBatch(d, k, torch.zeros(d.size(0))) for d, k in batches])
                while True:
                    try:
                        yield pipe.progress(feed)
                    except StopIteration:
                        return
        elif mode.startswith("control"):
            outputs = lambda: deferred_waits(inner.sparse, inner.dense, lag, source(batches))  # noqa: E731
        else:
            pipe = BLSInferencePipeline(inner.sparse, inner.dense, lag, group=group if lag else None)
            outputs = lambda: pipe.run(source(batches))  # noqa: E731

        dist.barrier()
        _reset_peak_rss()
        latencies, got = [], []
        cpu_start, start = time.process_time(), time.perf_counter()
        clock["t0"] = start
        with torch.no_grad():
            for out in outputs():
                latencies.append((time.perf_counter() - issued.popleft()) * 1000)
                got.append(out)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        peak_mb = _peak_rss_mb()
        dist.barrier()
        if hasattr(group, "shutdown"):
            group.shutdown()
        latencies.sort()
        reference = reference if reference is not None else got
        return got, {
            "ms_per_batch": elapsed * 1000 / args.batches,
            "p50": latencies[len(latencies) // 2],
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "identical": sum(torch.equal(a, b) for a, b in zip(got, reference)) if len(got) == args.batches else 0,
            "cpu_ms_per_batch": cpu * 1000 / args.batches,
            "peak_mb": peak_mb,
        }

    results = {}
    modes = _modes(args)
    for scenario in args.scenarios:
        hot = {b for b in range(args.batches) if _hot_rank(b, world, args.seed) == rank}
        scale = {b: 4 for b in hot} if scenario == "skew" else {}
        batches = random_batches(tables, args.batches, args.batch_size, seed=1000 + rank, dense_in=16, hot_feature_scale=scale)
        reference = None
        for mode in modes:  # the first mode is sync: its outputs are the reference
            got, results[(scenario, mode)] = run_mode(scenario, mode, batches, None, reference)
            reference = reference or got
        if args.load:
            # Offer `load` x the synchronous path's throughput (its slowest rank's, agreed by every rank).
            sync_ms = torch.tensor([results[(scenario, "sync")]["ms_per_batch"]])
            dist.all_reduce(sync_ms, op=dist.ReduceOp.MAX)
            interval_s = float(sync_ms) / 1000 / args.load
            for mode in modes:
                _, r = run_mode(scenario, mode, batches, interval_s, reference)
                closed = results[(scenario, mode)]
                closed.update({"open_p50": r["p50"], "open_p99": r["p99"], "open_ms": interval_s * 1000,
                               "identical": min(closed["identical"], r["identical"])})
    return results


def arrivals(items, interval_s, t0, issued, waits=True):
    """Yield `items`; with `interval_s`, item b is due at t0 + b * interval_s (an open-loop source, as
    requests reach a service): `waits` sleeps until then, else `NotYet` is yielded meanwhile. `issued`
    gets each item's due time (closed loop: the time it was taken)."""
    from fastplan.comm import NotYet

    for b, item in enumerate(items):
        due = time.perf_counter() if interval_s is None else t0 + b * interval_s
        while (now := time.perf_counter()) < due:
            if waits:
                time.sleep(due - now)
            else:
                yield NotYet(due - now)
        issued.append(due)
        yield item


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS count of this process (Linux), so each mode reports its own peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) / 1024


def _worker(rank, world, port, args, queue):
    import torch.distributed as dist
    from datetime import timedelta

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        queue.put((rank, _rank_main(rank, world, args)))
    finally:
        dist.destroy_process_group()


def run_world(world: int, args) -> dict:
    import multiprocessing as mp
    import socket

    from benchmarks.bls_transport import gather

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        per_rank = gather(queue, procs, args.timeout)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    merged = {}
    for key in per_rank[0]:
        rows = [per_rank[r][key] for r in range(world)]
        merged[key] = {
            "ms_per_batch": max(r["ms_per_batch"] for r in rows),  # the job is as fast as its slowest rank
            "p50": max(r["p50"] for r in rows),
            "p99": max(r["p99"] for r in rows),
            "identical": min(r["identical"] for r in rows),
            "cpu": sum(r["cpu_ms_per_batch"] for r in rows) / len(rows),
            "peak_mb": max(r["peak_mb"] for r in rows),
        }
        for k in ("open_p50", "open_p99", "open_ms"):
            if k in rows[0]:
                merged[key][k] = max(r[k] for r in rows)
    return merged


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[4])
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    ap.add_argument("--lags", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--modes", nargs="+", choices=["torchrec", "control", "bls"], help="baselines to run beside sync (default all)")
    ap.add_argument("--batches", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tables", type=int, default=16)
    ap.add_argument("--base", type=float, default=2.0, help="ms of lookup work per batch on every rank")
    ap.add_argument("--jitter", type=float, default=8.0, help="mean ms of exponential jitter")
    ap.add_argument("--hot", type=float, default=20.0, help="extra ms on the hot rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load", type=float, default=0.7,
                    help="open-loop pass: offer this fraction of sync's throughput, report latency (0: skip)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--plot", default="bls.png")
    args = ap.parse_args(argv)
    if any(L < 1 for L in args.lags):
        ap.error("--lags must be >= 1 (lag 0 is the sync mode)")

    print(f"seed {args.seed}, {args.batches} batches of {args.batch_size}, {args.tables} tables; open loop at "
          f"{args.load:g} x sync's throughput" if args.load else "", flush=True)
    open_cols = f" {'p50 open':>8} {'p99 open':>8} {'open/sync':>9}" if args.load else ""
    print(f"{'ranks':>5} {'scenario':>10} {'mode':>10} {'ms/batch':>9} {'vs sync':>8} {'p50 ms':>8} {'p99 ms':>8}{open_cols} "
          f"{'identical':>10} {'cpu ms/b':>9} {'peak MB':>8} {'vs best baseline':>17}", flush=True)
    table = {}
    for world in args.world_sizes:
        res = run_world(world, args)
        for scenario in args.scenarios:
            sync = res[(scenario, "sync")]
            if args.load:
                print(f"{world:>5} {scenario:>10} open loop: one batch due every {sync['open_ms']:.1f} ms", flush=True)
            for (sc, mode), r in res.items():
                if sc != scenario:
                    continue
                table[(world, sc, mode)] = r
                versus = ""
                baselines = [res[(sc, m)]["ms_per_batch"] for m in ("torchrec", f"control-{mode.split('-')[-1]}") if (sc, m) in res]
                if mode.startswith("bls") and baselines:
                    versus = f"{r['ms_per_batch'] / min(baselines):>16.2f}x"
                opened = f" {r['open_p50']:>8.1f} {r['open_p99']:>8.1f} {r['open_p50'] / sync['open_p50']:>8.2f}x" if args.load else ""
                print(
                    f"{world:>5} {sc:>10} {mode:>10} {r['ms_per_batch']:>9.2f} {sync['ms_per_batch'] / r['ms_per_batch']:>7.2f}x "
                    f"{r['p50']:>8.1f} {r['p99']:>8.1f}{opened} {r['identical']:>5}/{args.batches:<4} "
                    f"{r['cpu']:>9.2f} {r['peak_mb']:>8.0f} {versus}",
                    flush=True,
                )
    if args.plot:
        _plot(table, args)


def _plot(table, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = _modes(args)
    worlds = args.world_sizes
    fig, axes = plt.subplots(2, len(worlds), figsize=(6.5 * len(worlds), 7), squeeze=False)
    width = 0.8 / len(modes)
    for col, world in enumerate(worlds):
        p50 = ("open_p50", f"p50 latency at {args.load:g} x sync's rate, ms") if args.load else ("p50", "p50 latency, ms")
        for row, (key, label) in enumerate((("ms_per_batch", "ms / batch"), p50)):
            ax = axes[row][col]
            for i, mode in enumerate(modes):
                ys = [table[(world, sc, mode)][key] for sc in args.scenarios]
                ax.bar([x + i * width for x in range(len(args.scenarios))], ys, width, label=mode)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(args.scenarios))], args.scenarios)
            ax.set(title=f"{world} ranks, seed {args.seed}", ylabel=label)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
