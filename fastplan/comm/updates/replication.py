"""A trainer and its inference replicas as real processes, syncing shards while the trainer writes.

`run_stream` starts one trainer and N replicas (spawned processes, rendezvous through a
torch.distributed TCPStore on 127.0.0.1). Once every replica is connected, the trainer writes
training-step-like updates at an offered load (distinct rows per second, Zipf-skewed, every table
each step); replicas pull them peer to peer. It returns what every process saw: write and apply
times per shard version, bytes, CPU time, peak memory, peer errors, and whether every replica ended
byte-equal to the trainer. Replicas can be killed and restarted, or stop answering, mid-stream.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import resource
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Dict, List, Optional

import numpy as np
import torch

from fastplan.comm.updates.sync import SyncConfig


@dataclass
class StreamConfig:
    replicas: int = 4
    num_tables: int = 4
    rows: int = 50_000  # per table
    dim: int = 32
    rows_per_s: float = 10_000  # offered load: distinct rows changed per second, all tables together
    steps_per_s: float = 100  # the trainer writes every table once per step
    duration_s: float = 2.0
    zipf_a: float = 1.1
    cache_rows: int = 1_000_000
    scheduler: Optional[str] = None  # None, "priority" or "fifo"
    bandwidth_bytes_per_s: float = 2e6
    high_priority_every: int = 10  # every k-th step is a large change to hot rows (priority latency)
    log_rows: bool = False  # replicas log every row they receive (row-level latency; costly)
    kill_replica: Optional[int] = None  # rank killed at 1/3 of the stream, restarted at 2/3
    stall_replica: Optional[int] = None  # rank that stops answering at 1/3 of the stream
    converge_timeout_s: float = 30.0
    seed: int = 0
    sync: SyncConfig = field(default_factory=SyncConfig)

    @property
    def steps(self) -> int:
        return max(1, int(self.duration_s * self.steps_per_s))


def initial_store(cfg: StreamConfig):
    """Every process builds the same tables (one shard each) from the seed."""
    from fastplan.comm.updates.layout import Layout
    from fastplan.comm.updates.shard_store import ShardStore

    g = torch.Generator().manual_seed(cfg.seed)
    tables = {(f"t{i}", 0): torch.randn(cfg.rows, cfg.dim, generator=g) for i in range(cfg.num_tables)}
    return ShardStore(Layout.from_tensors(tables), tables, copy=False, cache_rows=cfg.cache_rows)


def step_rows(cfg: StreamConfig) -> List[List[np.ndarray]]:
    """rows[step][table]: the first distinct rows of a Zipf stream over a fixed shuffle of the table."""
    rng = np.random.default_rng(cfg.seed + 1)
    per_table = max(1, int(round(cfg.rows_per_s / cfg.steps_per_s / cfg.num_tables)))
    if per_table > cfg.rows:
        raise ValueError(f"{per_table} rows per table per step exceed the table's {cfg.rows} rows")
    shuffle = rng.permutation(cfg.rows)
    out = []
    for _ in range(cfg.steps):
        step = []
        for _ in range(cfg.num_tables):
            draws = 3 * per_table
            while True:
                ids, first = np.unique((rng.zipf(cfg.zipf_a, draws) - 1) % cfg.rows, return_index=True)
                if len(ids) >= per_table:
                    break
                draws *= 2
            step.append(np.sort(shuffle[ids[np.argsort(first)[:per_table]]]))
        out.append(step)
    return out


def rendezvous(port: int):
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))


def quiet() -> None:
    """TorchRec's planner and DDP notices are not news here; peer faults still log (fastplan.ekko)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("torchrec", "torch", "fastplan.planner"):
        logging.getLogger(name).setLevel(logging.ERROR)


def wait_keys(kv, keys: List[str], timeout_s: float, whom: str) -> None:
    """Wait until every key is set in the rendezvous store; on timeout name whom and which keys."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [k for k in keys if not kv.check([k])]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {whom}: {missing} never set")
        time.sleep(0.01)


def usage() -> Dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": r.ru_utime + r.ru_stime, "peak_rss_mb": r.ru_maxrss / 1024}


def _node(rank: int, cfg: StreamConfig, kv, store, source: bool, on_apply=None):
    from fastplan.comm.updates.scheduler import UpdateScheduler
    from fastplan.comm.updates.sync import SyncNode

    scheduler = None
    if cfg.scheduler:
        scheduler = UpdateScheduler(cfg.bandwidth_bytes_per_s, 0.01, policy=cfg.scheduler)
    node = SyncNode(rank, cfg.replicas + 1, store, kv, source=source, config=cfg.sync, scheduler=scheduler,
                    on_apply=on_apply)
    return node.start(pull=not source)


def _trainer(cfg: StreamConfig, port: int, out) -> None:
    quiet()
    torch.set_num_threads(1)
    kv = rendezvous(port)
    store = initial_store(cfg)
    if cfg.scheduler == "priority":
        store.track_importance()
    plan = step_rows(cfg)
    rng = np.random.default_rng(cfg.seed + 2)
    shifts = rng.standard_normal((cfg.steps, cfg.num_tables, cfg.dim)).astype(np.float32)
    node = _node(0, cfg, kv, store, source=True)
    wait_keys(kv, [f"ekko/ready/{r}" for r in range(1, cfg.replicas + 1)], 120, "replicas to start")
    deadline = time.monotonic() + 60
    while len(node.peers()) < cfg.replicas:  # every replica is pulling
        if time.monotonic() > deadline:
            missing = sorted(set(range(1, cfg.replicas + 1)) - node.peers())
            raise TimeoutError(f"trainer: replicas {missing} did not connect within 60 s")
        time.sleep(0.01)
    keys = store.keys()
    tables = store.tensors()
    writes = []  # (step, time written, hot)
    hot_rows = {}  # step -> rows per table (hot steps only)
    period = 1.0 / cfg.steps_per_s
    start = time.monotonic()
    kv.set("ekko/start", str(time.time()))
    usage_at_start = usage()
    for step in range(cfg.steps):
        delay = start + step * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        hot = bool(cfg.high_priority_every) and step % cfg.high_priority_every == 0
        scale = 3.0 if hot else 0.01
        updates = {}
        for t, key in enumerate(keys):
            rows = plan[step][t]
            if hot and cfg.scheduler == "priority":
                store.record_reads(key, np.tile(rows, 20))
            values = np.take(tables[key].numpy(), rows, axis=0)  # 2x faster than fancy indexing
            values += scale * shifts[step, t]
            updates[key] = (rows, values)
        node.publish(updates)
        writes.append((step, time.time(), hot))
        if hot:
            hot_rows[step] = plan[step]
    stream_usage = usage()
    kv.set("ekko/final_version", str(cfg.steps))
    # Hash once every replica holds the last step (or after a second): hashing the tables beside a
    # replica still applying it would delay the very step being measured.
    reached = [f"ekko/reached/{r}" for r in range(1, cfg.replicas + 1)]
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and not kv.check(reached):
        time.sleep(0.005)
    final = store.checksum()
    kv.set("ekko/final", final)
    deadline = time.monotonic() + cfg.converge_timeout_s
    converged: List[int] = []
    while time.monotonic() < deadline:
        converged = [r for r in range(1, cfg.replicas + 1) if kv.check([f"ekko/converged/{r}"])]
        if len(converged) == cfg.replicas:
            break
        time.sleep(0.05)
    kv.set("ekko/stop", "1")
    time.sleep(0.2)
    node.stop()
    out.put(("trainer", 0, {"writes": writes, "hot_rows": hot_rows, "stats": asdict(node.stats), "checksum": final,
                            "converged": converged, "errors": [asdict(e) for e in node.errors],
                            "rows_written": int(sum(len(r) for s in plan for r in s)), **usage(),
                            "stream_cpu_s": stream_usage["cpu_s"] - usage_at_start["cpu_s"]}))


def _replica(rank: int, cfg: StreamConfig, port: int, out, restarted: bool) -> None:
    quiet()
    torch.set_num_threads(1)
    kv = rendezvous(port)
    store = initial_store(cfg)
    applied = []  # (shard, shard version after, time)
    row_log = []  # (shard, time, rows, row versions) when cfg.log_rows

    def log(key, version, delta):
        now = time.time()
        applied.append((delta.shard, version, now))
        if cfg.log_rows and delta.n:
            rows = np.arange(delta.n) if delta.full else delta.rows.copy()
            row_log.append((delta.shard, now, rows, delta.row_versions.copy()))

    node = _node(rank, cfg, kv, store, source=False, on_apply=log)
    kv.set(f"ekko/ready/{rank}", "1")
    wait_keys(kv, ["ekko/start"], 120, "the trainer to start the stream")
    start = float(kv.get("ekko/start").decode())
    usage_at_start, stream_cpu = usage(), None
    stream_s = cfg.steps / cfg.steps_per_s
    reached = done = False
    while not kv.check(["ekko/stop"]):
        elapsed = time.time() - start
        if rank == cfg.kill_replica and not restarted and elapsed > stream_s / 3:
            os._exit(17)  # killed mid-stream
        if rank == cfg.stall_replica and elapsed > stream_s / 3:
            node.serving = False  # alive, but stops answering its peers
        if not reached and kv.check(["ekko/final_version"]):
            if min(store.versions().values()) >= int(kv.get("ekko/final_version").decode()):
                stream_cpu = usage()["cpu_s"] - usage_at_start["cpu_s"]
                kv.set(f"ekko/reached/{rank}", "1")
                reached = True
        if reached and not done and kv.check(["ekko/final"]):
            if store.checksum() == kv.get("ekko/final").decode():
                kv.set(f"ekko/converged/{rank}", "1")
                done = True
        time.sleep(0.05)  # rendezvous polls cost CPU the stream needs; latencies come from apply times
    node.stop()
    out.put(("replica", rank, {"applied": applied, "row_log": row_log, "stats": asdict(node.stats), "converged": done,
                               "restarted": restarted, "errors": [asdict(e) for e in node.errors], **usage(),
                               "stream_cpu_s": usage()["cpu_s"] - usage_at_start["cpu_s"] if stream_cpu is None else stream_cpu}))


# Rows land at random places in the tables, so with 4 KB pages nearly every row a node writes or
# reads costs a TLB miss (a quarter of a replica's CPU at 1 M rows/s): torch backs tensors of 2 MB or
# more with transparent huge pages when its processes start with this set.
HUGE_PAGES = ("THP_MEM_ALLOC_ENABLE", "1")


def _start(p) -> None:
    """Start a spawned process with huge pages for its tensors (spawn copies this environment)."""
    name, value = HUGE_PAGES
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        p.start()
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def run_stream(cfg: StreamConfig) -> Dict:
    """Run trainer + replicas to completion (bounded in time); always reaps the processes."""
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
        _start(p)
    results: Dict = {"replicas": {}, "restarted": False}
    stream_s = cfg.steps / cfg.steps_per_s
    limit = time.monotonic() + stream_s * 3 + cfg.converge_timeout_s + 120
    try:
        while len(results["replicas"]) + ("trainer" in results) < cfg.replicas + 1:
            if time.monotonic() > limit:
                missing = set(procs) - set(results["replicas"]) - ({0} if "trainer" in results else set())
                raise TimeoutError(f"ekko stream did not finish: ranks {sorted(missing)} never reported")
            k = cfg.kill_replica
            if k is not None and not results["restarted"] and not procs[k].is_alive():
                results["killed_exitcode"] = procs[k].exitcode
                time.sleep(stream_s / 3)  # stays dead for a third of the stream, then restarts empty-handed
                procs[k] = ctx.Process(target=_replica, args=(k, cfg, port, out, True))
                _start(procs[k])
                results["restarted"] = True
            try:
                role, rank, data = out.get(timeout=0.2)
            except queue_mod.Empty:
                reported = set(results["replicas"]) | ({0} if "trainer" in results else set())
                dead = [r for r, p in procs.items() if r not in reported and p.exitcode not in (None, 0)
                        and not (r == k and not results["restarted"])]
                if dead:
                    raise RuntimeError(f"ekko stream failed: ranks {dead} exited with {[procs[r].exitcode for r in dead]}")
                continue
            if role == "trainer":
                results["trainer"] = data
            else:
                results["replicas"][rank] = data
    finally:
        reap(procs.values())
        del master
    return results


def reap(procs) -> None:
    """Join each child process, killing those still alive after 10 s."""
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()


def propagation_latencies(results: Dict, high_priority: Optional[bool] = None) -> List[float]:
    """Seconds from each trainer step until every replica held all of it (every table at that step's
    version or later; with row logs, each written row at its version or later)."""
    per_replica = []
    for data in results["replicas"].values():
        applied = np.array(data["applied"], dtype=np.float64).reshape(-1, 3)
        per_replica.append((applied, _row_arrivals(data, results["trainer"]["hot_rows"])))
    out = []
    for step, t_write, hot in results["trainer"]["writes"]:
        if high_priority is not None and hot != high_priority:
            continue
        t_all = 0.0
        for applied, rows_at in per_replica:
            t = _held_at(applied, step + 1)
            if rows_at is not None and step in rows_at:
                t = min(t, rows_at[step])
            t_all = max(t_all, t)
        if np.isfinite(t_all):
            out.append(max(0.0, t_all - t_write))
    return out


def _held_at(applied: np.ndarray, version: int) -> float:
    """When every shard first reached `version` on one replica (inf if some never did)."""
    if not len(applied):
        return np.inf
    t_all = 0.0
    for shard in np.unique(applied[:, 0]):
        a = applied[applied[:, 0] == shard]
        reached = a[a[:, 1] >= version, 2]
        t_all = max(t_all, reached.min() if len(reached) else np.inf)
    return t_all


def _row_arrivals(data: Dict, hot_rows: Dict) -> Optional[Dict[int, float]]:
    """For each hot step: when its last row arrived on this replica at that step's version or later."""
    if not data["row_log"]:
        return None
    out = {}
    for step, tables in hot_rows.items():
        t_all = 0.0
        for shard, rows in enumerate(tables):
            rows = np.asarray(rows)
            first = np.full(len(rows), np.inf)
            for s, t, got, versions in data["row_log"]:
                if s == shard:
                    hit = np.isin(rows, got[versions >= step + 1])
                    first[hit] = np.minimum(first[hit], t)
            t_all = max(t_all, first.max())
        out[step] = t_all
    return out
