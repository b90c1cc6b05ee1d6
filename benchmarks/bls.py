"""BLS all-to-all vs synchronous all-to-all vs the async control, side by side in one run.

A small DLRM (tables sharded by fastplan, table-wise) runs sharded inference on 2 and 4 gloo
processes on 127.0.0.1. Each batch's lookup does injected work (a sleep, seeded per batch and rank):

- balanced:  every rank `base` ms.
- jitter:    plus an exponential delay per rank and batch (mean `jitter` ms, capped at 30 ms).
- skew:      one hot rank per batch (seeded) gets 4x the ids in its batch and `hot` ms more work.
- straggler: the last rank always does `hot / 2` ms more.

Modes: sync (the stock forward: every all-to-all waited at once), control-L (plain async gloo
all_to_all_single, waits deferred by L batches with the same schedule), bls-L (the "bls" backend,
L in 1, 2, 4). Every batch's output is compared bitwise with the sync run.

    python benchmarks/bls.py                 # 2 and 4 ranks, writes bls.png
    python benchmarks/bls.py --world-sizes 4 --batches 60
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCENARIOS = ("balanced", "jitter", "skew", "straggler")


def _delay_ms(scenario: str, batch: int, rank: int, world: int, args) -> float:
    rng = random.Random(hash((batch, rank, args.seed)) & 0xFFFFFFFF)
    hot_rank = random.Random(batch * 7919 + args.seed).randrange(world)
    base = args.base
    if scenario == "jitter":
        return base + min(30.0, rng.expovariate(1.0 / args.jitter))
    if scenario == "skew":
        return base + (args.hot if rank == hot_rank else 0.0)
    if scenario == "straggler":
        return base + (args.hot / 2 if rank == world - 1 else 0.0)
    return base


def _rank_main(rank: int, world: int, args) -> dict:
    import torch
    import torch.distributed as dist
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner.types import ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv

    from fastplan import FastShardingPlanner
    from fastplan.comm import BLSInferencePipeline, new_bls_group
    from fastplan.models import SmallDLRM, random_batches, report_tables

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)  # one intra-op thread per rank: ranks share 2 cores without spin contention

    class DenseSharder(EmbeddingBagCollectionSharder):
        def compute_kernels(self, sharding_type, device):
            return ["dense"]

    tables = report_tables(args.tables, seed=1)
    constraints = {t.name: ParameterConstraints(sharding_types=["table_wise"]) for t in tables}
    planner = FastShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints, cache=None, debug=False
    )
    sharders = [DenseSharder()]

    def model():
        torch.manual_seed(0)
        return SmallDLRM(tables, dense_in=16, hidden=64)

    plan = planner.collective_plan(model(), sharders)
    results = {}
    reference = {}
    modes = ["sync"] + [f"control-{L}" for L in args.lags] + [f"bls-{L}" for L in args.lags]
    for scenario in args.scenarios:
        hot = {b for b in range(args.batches) if random.Random(b * 7919 + args.seed).randrange(world) == rank}
        scale = {b: 4 for b in hot} if scenario == "skew" else {}
        batches = random_batches(tables, args.batches, args.batch_size, seed=1000 + rank, dense_in=16, hot_feature_scale=scale)
        for mode in modes:
            lag = 0 if mode == "sync" else int(mode.split("-")[1])
            group = new_bls_group(lag, timeout_s=120) if mode.startswith("bls") else dist.new_group(backend="gloo")
            dmp = DistributedModelParallel(model(), device=torch.device("cpu"), plan=plan, sharders=sharders,
                                           env=ShardingEnv.from_process_group(group))
            dmp.eval()
            inner = dmp.module

            def before_lookup(b, scenario=scenario):
                time.sleep(_delay_ms(scenario, b, rank, world, args) / 1000.0)

            pipe = BLSInferencePipeline(inner.sparse, inner.dense, lag, group=group, before_lookup=before_lookup)
            issued = {}

            def source():
                for b, batch in enumerate(batches):
                    issued[b] = time.perf_counter()
                    yield batch

            dist.barrier()
            latencies, outputs = [], []
            cpu_start = time.process_time()
            start = time.perf_counter()
            with torch.no_grad():
                for b, out in enumerate(pipe.run(source())):
                    latencies.append((time.perf_counter() - issued[b]) * 1000)
                    outputs.append(out)
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
            dist.barrier()
            if mode == "sync":
                reference[scenario] = outputs
            identical = sum(torch.equal(a, b) for a, b in zip(outputs, reference[scenario]))
            latencies.sort()
            results[(scenario, mode)] = {
                "ms_per_batch": elapsed * 1000 / args.batches,
                "p50": latencies[len(latencies) // 2],
                "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
                "identical": identical,
                "cpu_ms_per_batch": cpu * 1000 / args.batches,
            }
            if hasattr(group, "shutdown"):
                group.shutdown()
    return results


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

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        per_rank = dict(queue.get(timeout=args.timeout) for _ in range(world))
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
        }
    return merged


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    ap.add_argument("--lags", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batches", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tables", type=int, default=16)
    ap.add_argument("--base", type=float, default=2.0, help="ms of lookup work per batch on every rank")
    ap.add_argument("--jitter", type=float, default=8.0, help="mean ms of exponential jitter")
    ap.add_argument("--hot", type=float, default=20.0, help="extra ms on the hot rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--plot", default="bls.png")
    args = ap.parse_args(argv)

    header = f"{'ranks':>5} {'scenario':>10} {'mode':>10} {'ms/batch':>9} {'vs sync':>8} {'p50 ms':>8} {'p99 ms':>8} {'identical':>10} {'cpu ms/b':>9}"
    print(header, flush=True)
    table = {}
    for world in args.world_sizes:
        res = run_world(world, args)
        for scenario in args.scenarios:
            sync = res[(scenario, "sync")]["ms_per_batch"]
            for (sc, mode), r in res.items():
                if sc != scenario:
                    continue
                table[(world, sc, mode)] = r
                print(
                    f"{world:>5} {sc:>10} {mode:>10} {r['ms_per_batch']:>9.2f} {sync / r['ms_per_batch']:>7.2f}x "
                    f"{r['p50']:>8.1f} {r['p99']:>8.1f} {r['identical']:>5}/{args.batches:<4} {r['cpu']:>9.2f}",
                    flush=True,
                )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(args.world_sizes), figsize=(6 * len(args.world_sizes), 4), squeeze=False)
        modes = ["sync"] + [f"control-{L}" for L in args.lags] + [f"bls-{L}" for L in args.lags]
        for ax, world in zip(axes[0], args.world_sizes):
            width = 0.8 / len(modes)
            for i, mode in enumerate(modes):
                ys = [table[(world, sc, mode)]["ms_per_batch"] for sc in args.scenarios]
                ax.bar([x + i * width for x in range(len(args.scenarios))], ys, width, label=mode)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(args.scenarios))], args.scenarios)
            ax.set(title=f"{world} ranks", ylabel="ms / batch")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
