"""A trainer and its inference replicas as real processes, syncing shards while the trainer writes.

`run_stream` starts one trainer and N replicas (spawned processes, rendezvous through a
torch.distributed TCPStore on 127.0.0.1), streams Zipf-skewed sparse updates into the trainer's
shards, lets replicas pull them peer to peer, and returns what every process saw: write and apply
times per version, bytes, peer errors, and whether every replica ended byte-equal to the trainer.
Replicas can be killed and restarted, or stop answering, mid-stream.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import numpy as np
import torch


@dataclass
class StreamConfig:
    replicas: int = 4
    num_tables: int = 4
    rows: int = 2000
    dim: int = 16
    updates: int = 300
    rows_per_update: int = 32
    zipf_a: float = 1.2
    write_interval_s: float = 0.002
    pull_interval_s: float = 0.005
    timeout_s: float = 1.0
    cache_rows: int = 20_000
    scheduler: Optional[str] = None  # None, "priority" or "fifo"
    bandwidth_bytes_per_s: float = 2e6
    high_priority_every: int = 10  # every k-th update is a large, hot change (priority latency)
    kill_replica: Optional[int] = None  # rank killed at 1/3 of the stream, restarted at 2/3
    stall_replica: Optional[int] = None  # rank that stops answering at 1/3 of the stream
    converge_timeout_s: float = 60.0
    seed: int = 0


def initial_shards(cfg: StreamConfig) -> Dict:
    """The shards the plan puts on rank 0 (deterministic; every process builds the same)."""
    from torchrec.distributed.planner.types import ParameterConstraints, Topology
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from fastplan import FastShardingPlanner
    from fastplan.comm.updates.shard_store import ShardStore
    from fastplan.models import ebc

    tables = [EmbeddingBagConfig(name=f"t{i}", feature_names=[f"f{i}"], embedding_dim=cfg.dim, num_embeddings=cfg.rows)
              for i in range(cfg.num_tables)]
    constraints = {t.name: ParameterConstraints(sharding_types=["table_wise"]) for t in tables}
    plan = FastShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints,
                               cache=None, debug=False).plan(ebc(tables), [_sharder()])
    g = torch.Generator().manual_seed(cfg.seed)
    init = {t.name: torch.randn(cfg.rows, cfg.dim, generator=g) for t in tables}
    return ShardStore.from_plan(plan, 0, init=init, cache_rows=cfg.cache_rows)


def _sharder():
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    return EmbeddingBagCollectionSharder()


def checksum(store) -> str:
    h = hashlib.sha256()
    for key in sorted(store.shards):
        h.update(repr(key).encode())
        h.update(store.shards[key].weights.numpy().tobytes())
    return h.hexdigest()


def _kv(port: int):
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=__import__("datetime").timedelta(seconds=60))


def _node(rank: int, cfg: StreamConfig, kv, store, pull: bool, on_apply=None):
    from fastplan.comm.updates.scheduler import UpdateScheduler
    from fastplan.comm.updates.sync import SyncNode

    scheduler = None
    if cfg.scheduler:
        scheduler = UpdateScheduler(cfg.bandwidth_bytes_per_s, cfg.pull_interval_s, policy=cfg.scheduler)
    return SyncNode(rank, cfg.replicas + 1, store, kv, pull_interval_s=cfg.pull_interval_s, timeout_s=cfg.timeout_s,
                    scheduler=scheduler, on_apply=on_apply).start(pull=pull)


def _trainer(cfg: StreamConfig, port: int, out) -> None:
    torch.set_num_threads(1)
    kv = _kv(port)
    store = initial_shards(cfg)
    node = _node(0, cfg, kv, store, pull=False)
    rng = np.random.default_rng(cfg.seed + 1)
    keys = store.keys()
    writes = []  # (key, version, time, high priority)
    kv.set("ekko/start", str(time.time()))
    for i in range(cfg.updates):
        key = keys[int(rng.integers(len(keys)))]
        rows = np.unique((rng.zipf(cfg.zipf_a, cfg.rows_per_update) - 1) % cfg.rows)
        hot = cfg.high_priority_every and i % cfg.high_priority_every == 0
        scale = 3.0 if hot else 0.01
        with node.lock:
            current = store.shards[key].weights[torch.from_numpy(rows)]
            values = current + scale * torch.randn(len(rows), cfg.dim)
            if hot:
                store.record_reads(key, torch.from_numpy(rows).repeat(20))
        version = node.write(key, torch.from_numpy(rows), values)
        writes.append((key, version, time.time(), bool(hot), rows.tolist()))
        time.sleep(cfg.write_interval_s)
    with node.lock:
        final = checksum(store)
    kv.set("ekko/final", final)
    deadline = time.monotonic() + cfg.converge_timeout_s
    converged = []
    while time.monotonic() < deadline:
        converged = [r for r in range(1, cfg.replicas + 1) if kv.check([f"ekko/converged/{r}"])]
        if len(converged) == cfg.replicas:
            break
        time.sleep(0.05)
    kv.set("ekko/stop", "1")
    time.sleep(0.2)
    node.stop()
    out.put(("trainer", 0, {"writes": writes, "stats": asdict(node.stats), "checksum": final,
                            "converged": converged, "errors": [asdict(e) for e in node.errors]}))


def _replica(rank: int, cfg: StreamConfig, port: int, out, restarted: bool) -> None:
    torch.set_num_threads(1)
    kv = _kv(port)
    store = initial_shards(cfg)
    applied = []  # (key, shard version after, time, rows received, their row versions)

    def log(key, version, delta):
        applied.append((key, version, time.time(), delta.rows.tolist(), delta.row_versions.tolist()))

    node = _node(rank, cfg, kv, store, pull=True, on_apply=log)
    start = float(kv.get("ekko/start").decode()) if kv.check(["ekko/start"]) else time.time()
    stream_s = cfg.updates * cfg.write_interval_s
    done = False
    while not kv.check(["ekko/stop"]):
        elapsed = time.time() - start
        if rank == cfg.kill_replica and not restarted and elapsed > stream_s / 3:
            os._exit(17)  # killed mid-stream
        if rank == cfg.stall_replica and elapsed > stream_s / 3:
            node.serving = False  # alive, but stops answering its peers
        if not done and kv.check(["ekko/final"]):
            with node.lock:
                mine = checksum(store)
            if mine == kv.get("ekko/final").decode():
                kv.set(f"ekko/converged/{rank}", mine)
                done = True
        time.sleep(0.01)
    node.stop()
    out.put(("replica", rank, {"applied": applied, "stats": asdict(node.stats), "converged": done,
                               "restarted": restarted, "errors": [asdict(e) for e in node.errors]}))


def run_stream(cfg: StreamConfig) -> Dict:
    """Run trainer + replicas to completion (bounded by `converge_timeout_s`); always reaps processes."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = {0: ctx.Process(target=_trainer, args=(cfg, port, out))}
    for r in range(1, cfg.replicas + 1):
        procs[r] = ctx.Process(target=_replica, args=(r, cfg, port, out, False))
    for p in procs.values():
        p.start()
    results: Dict = {"replicas": {}, "restarted": False}
    stream_s = cfg.updates * cfg.write_interval_s
    limit = time.monotonic() + stream_s * 3 + cfg.converge_timeout_s + 120
    try:
        expected = cfg.replicas + 1
        while len(results["replicas"]) + ("trainer" in results) < expected:
            if time.monotonic() > limit:
                raise TimeoutError("ekko stream did not finish")
            k = cfg.kill_replica
            if k is not None and not results["restarted"] and not procs[k].is_alive():
                time.sleep(stream_s / 3)  # stays dead for a third of the stream, then restarts empty-handed
                procs[k] = ctx.Process(target=_replica, args=(k, cfg, port, out, True))
                procs[k].start()
                results["restarted"] = True
                results["killed_exitcode"] = 17
            try:
                role, rank, data = out.get(timeout=0.2)
            except queue_mod.Empty:
                continue
            if role == "trainer":
                results["trainer"] = data
            else:
                results["replicas"][rank] = data
    finally:
        for p in procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        del master
    return results


def propagation_latencies(results: Dict, high_priority: Optional[bool] = None) -> List[float]:
    """Seconds from each trainer write until every replica held all its rows at that version or later."""
    per_replica = []
    for data in results["replicas"].values():
        arrivals: Dict = {}  # (key, row) -> [(row version, time)] in arrival order
        for key, _, t, rows, versions in data["applied"]:
            for r, v in zip(rows, versions):
                arrivals.setdefault((tuple(key), r), []).append((v, t))
        per_replica.append(arrivals)
    out = []
    for key, version, t_write, hot, rows in results["trainer"]["writes"]:
        if high_priority is not None and hot != high_priority:
            continue
        t_all = 0.0
        for arrivals in per_replica:
            for r in rows:
                times = [t for v, t in arrivals.get((tuple(key), r), []) if v >= version]
                if not times:
                    t_all = None
                    break
                t_all = max(t_all, min(times))
            if t_all is None:
                break
        if t_all is not None:
            out.append(max(0.0, t_all - t_write))
    return out
