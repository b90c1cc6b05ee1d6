"""Run the online loop as processes: 2 DMP trainer ranks (gloo on 127.0.0.1) that publish every
step, and N inference replicas that serve requests while the updates land. `run_online` returns what
each process saw (step and apply times, serving latencies, peak memory, per-shard digests, whether
each replica's outputs equal the trainer's), always reaping its processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import queue as queue_mod
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Dict, List, Tuple

import numpy as np
import torch

from fastplan.comm.updates.replication import quiet, reap, rendezvous, usage, wait_keys

TRAINERS = 2
PREFIX = "online"


@dataclass
class OnlineConfig:
    replicas: int = 2
    num_tables: int = 4
    rows: int = 20_000  # per table
    dim: int = 16
    batch_size: int = 256  # per trainer rank
    ids_per_sample: int = 4  # per table
    steps: int = 50
    lr: float = 0.1
    zipf_a: float = 1.2
    serve_batch: int = 64
    converge_timeout_s: float = 60.0
    seed: int = 0


def tables(cfg: OnlineConfig):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    return [EmbeddingBagConfig(name=f"t{i}", feature_names=[f"f{i}"], embedding_dim=cfg.dim, num_embeddings=cfg.rows)
            for i in range(cfg.num_tables)]


def batch(cfg: OnlineConfig, rng: np.random.Generator, size: int):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    n = cfg.num_tables * size * cfg.ids_per_sample
    ids = (rng.zipf(cfg.zipf_a, n) - 1) % cfg.rows
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{i}" for i in range(cfg.num_tables)], values=torch.from_numpy(ids),
        lengths=torch.full((cfg.num_tables * size,), cfg.ids_per_sample))


class _Model(torch.nn.Module):
    def __init__(self, cfg: OnlineConfig) -> None:
        super().__init__()
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        self.sparse = EmbeddingBagCollection(tables=tables(cfg), device=torch.device("cpu"))
        self.dense = torch.nn.Linear(cfg.num_tables * cfg.dim, 1)

    def forward(self, kjt):
        return self.dense(self.sparse(kjt).values())


def pooled_bytes(pooled) -> bytes:
    """Pooled embeddings by feature name (a sharded EBC orders its output keys by sharding type)."""
    per_key = pooled.to_dict()
    return b"".join(per_key[k].detach().contiguous().numpy().astype("<f4").tobytes() for k in sorted(per_key))


def _trainer(rank: int, cfg: OnlineConfig, kv_port: int, pg_port: int, out) -> None:
    import torch.distributed as dist
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.model_tracker.types import DeltaTrackerConfig
    from torchrec.distributed.planner.types import ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from fastplan import FastShardingPlanner
    from fastplan.comm.updates.layout import Layout
    from fastplan.comm.updates.online import TrackedPublisher, layout_to_json, local_shards, shard_digests
    from fastplan.comm.updates.shard_store import ShardStore
    from fastplan.comm.updates.sync import SyncNode

    quiet()
    torch.set_num_threads(1)
    kv = rendezvous(kv_port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{pg_port}", rank=rank, world_size=TRAINERS,
                            timeout=timedelta(seconds=120))
    torch.manual_seed(cfg.seed)
    model = _Model(cfg)
    apply_optimizer_in_backward(torch.optim.SGD, model.sparse.parameters(), {"lr": cfg.lr})
    constraints = {t.name: ParameterConstraints(sharding_types=["table_wise", "column_wise"]) for t in tables(cfg)}
    planner = FastShardingPlanner(topology=Topology(world_size=TRAINERS, compute_device="cpu"), constraints=constraints,
                                  cache=None, debug=False)
    sharder = EmbeddingBagCollectionSharder()
    plan = planner.collective_plan(model, [sharder])
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=[sharder])
    dense_opt = torch.optim.SGD(dmp.module.dense.parameters(), lr=cfg.lr)
    tracker = dmp.init_torchrec_delta_tracker(DeltaTrackerConfig())
    live = local_shards(dmp, plan, "sparse")
    layout = Layout.from_plan(plan, {})
    if rank == 0:
        kv.set(f"{PREFIX}/layout", layout_to_json(layout))
    # version 1: a replica (version 0, empty) first gets every shard whole, then deltas
    store = ShardStore(layout, live, copy=True, version=1)
    node = SyncNode(rank, TRAINERS + cfg.replicas, store, kv, source=True).start(pull=False)
    publisher = TrackedPublisher(tracker, node, live, "sparse")
    wait_keys(kv, [f"{PREFIX}/ready/{r}" for r in range(cfg.replicas)], 120, "replicas to start")
    deadline = time.monotonic() + 60
    while len(node.peers()) < cfg.replicas:
        if time.monotonic() > deadline:
            missing = sorted(set(range(TRAINERS, TRAINERS + cfg.replicas)) - node.peers())
            raise TimeoutError(f"trainer {rank}: replicas (sync ranks) {missing} did not connect within 60 s")
        time.sleep(0.01)
    dist.barrier()
    rng = np.random.default_rng(cfg.seed + 1 + rank)
    steps = []  # (step, time published, {shard index: version}, rows published)
    losses = []
    usage0 = usage()
    t0 = time.time()
    for step in range(cfg.steps):
        loss = dmp(batch(cfg, rng, cfg.batch_size)).pow(2).mean()
        loss.backward()  # the fused optimizer updates the embedding shards in backward
        dense_opt.step()
        dense_opt.zero_grad()
        before = store.version_array()
        publisher.publish()
        after = store.version_array()
        changed = {int(i): int(after[i]) for i in np.flatnonzero(after != before)}
        steps.append((step, time.time(), changed, int(sum(store.shards[i].cache[-1][2].size for i in changed))))
        losses.append(float(loss))
    train_s = time.time() - t0
    cpu_s = usage()["cpu_s"] - usage0["cpu_s"]
    published = shard_digests(store.tensors())
    missed = [k for k, d in shard_digests(live).items() if d != published[k]]  # rows moved but never published
    kv.set(f"{PREFIX}/final/{rank}", json.dumps({"digests": published,
                                                 "versions": {f"{k[0]}/{k[1]}": v for k, v in store.versions().items()}}))
    eval_rng = np.random.default_rng(cfg.seed + 99)
    with torch.no_grad():
        pooled = dmp.module.sparse(batch(cfg, eval_rng, cfg.serve_batch))
        pooled = pooled.wait() if hasattr(pooled, "wait") else pooled
    if rank == 0:
        kv.set(f"{PREFIX}/expected", pooled_bytes(pooled))
    converged = []
    deadline = time.monotonic() + cfg.converge_timeout_s
    while time.monotonic() < deadline and len(converged) < cfg.replicas:
        converged = [r for r in range(cfg.replicas) if kv.check([f"{PREFIX}/converged/{r}"])]
        time.sleep(0.02)
    dist.barrier()
    kv.set(f"{PREFIX}/stop/{rank}", "1")
    wait_keys(kv, [f"{PREFIX}/stop/{r}" for r in range(TRAINERS)], 30, "the other trainer to finish")
    node.stop()
    dist.destroy_process_group()
    out.put(("trainer", rank, {"steps": steps, "losses": losses, "train_s": train_s, "cpu_s": cpu_s,
                               "tracker_missed": missed, "converged": converged, "stats": asdict(node.stats),
                               "errors": [asdict(e) for e in node.errors], "peak_rss_mb": usage()["peak_rss_mb"]}))


def _replica(index: int, cfg: OnlineConfig, kv_port: int, out) -> None:
    from fastplan.comm.updates.online import layout_from_json, replica_shards, shard_digests
    from fastplan.comm.updates.shard_store import ShardStore
    from fastplan.comm.updates.sync import SyncNode

    quiet()
    torch.set_num_threads(1)
    kv = rendezvous(kv_port)
    wait_keys(kv, [f"{PREFIX}/layout"], 120, "trainer rank 0 to publish the shard layout")
    layout = layout_from_json(kv.get(f"{PREFIX}/layout").decode())
    model = _Model(cfg).sparse
    for p in model.parameters():
        p.data.zero_()  # everything a replica serves comes over the wire
    model.eval()
    store = ShardStore(layout, replica_shards(layout, model), copy=False, version=0)
    applied = []  # (shard index, shard version, time)
    node = SyncNode(TRAINERS + index, TRAINERS + cfg.replicas, store, kv, source=False,
                    on_apply=lambda key, version, d: applied.append((d.shard, version, time.time()))).start(pull=True)
    kv.set(f"{PREFIX}/ready/{index}", "1")
    served: List[Tuple[float, float]] = []  # (time, seconds) per request
    stop = threading.Event()

    def serve() -> None:
        rng = np.random.default_rng(cfg.seed + 1000 + index)
        while not stop.is_set():
            kjt = batch(cfg, rng, cfg.serve_batch)
            t = time.perf_counter()
            with store.lock, torch.no_grad():  # rows are written under this lock: each is read whole
                model(kjt).values()
            served.append((time.time(), time.perf_counter() - t))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    finals = [f"{PREFIX}/final/{r}" for r in range(TRAINERS)] + [f"{PREFIX}/expected"]
    result = {"converged": False, "outputs_equal": False, "max_abs_diff": float("nan"), "missing": []}
    while not kv.check([f"{PREFIX}/stop/0"]):
        if not result["converged"] and all(kv.check([k]) for k in finals):
            want = {}
            for r in range(TRAINERS):
                want.update(json.loads(kv.get(f"{PREFIX}/final/{r}").decode())["digests"])
            with store.lock:
                have = shard_digests(store.tensors())
            result["missing"] = sorted(k for k in want if have.get(k) != want[k])
            if not result["missing"]:
                expected = np.frombuffer(kv.get(f"{PREFIX}/expected"), "<f4")
                with store.lock, torch.no_grad():
                    got = np.frombuffer(pooled_bytes(model(batch(cfg, np.random.default_rng(cfg.seed + 99), cfg.serve_batch))), "<f4")
                result.update(converged=True, outputs_equal=bool(np.array_equal(got, expected)),
                              max_abs_diff=float(np.abs(got - expected).max()))
                kv.set(f"{PREFIX}/converged/{index}", "1")
        time.sleep(0.02)
    stop.set()
    server.join(timeout=10)
    node.stop()
    out.put(("replica", index, {"applied": applied, "served": served, "stats": asdict(node.stats), **result,
                                "errors": [asdict(e) for e in node.errors], "peak_rss_mb": usage()["peak_rss_mb"]}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_online(cfg: OnlineConfig, timeout_s: float = 300) -> Dict:
    """Train, propagate and serve; bounded in time; processes always reaped. Raises naming the
    processes that failed or never reported."""
    import torch.distributed as dist

    kv_port, pg_port = _free_port(), _free_port()
    master = dist.TCPStore("127.0.0.1", kv_port, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = {("trainer", r): ctx.Process(target=_trainer, args=(r, cfg, kv_port, pg_port, out)) for r in range(TRAINERS)}
    procs.update({("replica", i): ctx.Process(target=_replica, args=(i, cfg, kv_port, out)) for i in range(cfg.replicas)})
    for p in procs.values():
        p.start()
    results: Dict = {"trainer": {}, "replicas": {}}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results["trainer"]) + len(results["replicas"]) < len(procs):
            try:
                role, rank, data = out.get(timeout=0.2)
                results["trainer" if role == "trainer" else "replicas"][rank] = data
                continue
            except queue_mod.Empty:
                pass
            reported = {("trainer", r) for r in results["trainer"]} | {("replica", r) for r in results["replicas"]}
            dead = [k for k, p in procs.items() if k not in reported and not p.is_alive() and p.exitcode != 0]
            if dead or time.monotonic() > deadline:
                what = f"exited with {[(k, procs[k].exitcode) for k in dead]}" if dead else f"did not report in {timeout_s} s"
                raise RuntimeError(f"online run failed: {what if dead else sorted(set(procs) - reported)} {'' if dead else what}")
    finally:
        reap(procs.values())
        del master
    return results


def step_latencies(results: Dict) -> List[float]:
    """Seconds from each published step until every replica held every shard it changed."""
    logs = [np.array(r["applied"], dtype=np.float64).reshape(-1, 3) for r in results["replicas"].values()]
    out = []
    for trainer in results["trainer"].values():
        for _, t_pub, changed, _ in trainer["steps"]:
            t_all = t_pub
            for log in logs:
                for shard, version in changed.items():
                    hit = log[(log[:, 0] == int(shard)) & (log[:, 1] >= version), 2]
                    t_all = max(t_all, hit.min() if len(hit) else np.inf)
            if np.isfinite(t_all):
                out.append(t_all - t_pub)
    return out
