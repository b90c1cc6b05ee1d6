"""Run a function on N local processes (gloo on 127.0.0.1), bounded in time, always cleaned up."""

import multiprocessing as mp
import queue as queue_mod
import time
import socket
import traceback
from datetime import timedelta


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, pg_timeout_s, queue, args):
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=pg_timeout_s),
        )
        queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, args=(), timeout_s: float = 120, pg_timeout_s: float = 60):
    """Returns {rank: ("ok", value) | ("error", text)}; raises TimeoutError if a rank hangs."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, pg_timeout_s, queue, args)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world:
            try:
                rank, status, value = queue.get(timeout=0.5)
                results[rank] = (status, value)
                continue
            except queue_mod.Empty:
                pass
            for r, p in enumerate(procs):  # a rank that died without reporting
                if r not in results and not p.is_alive() and queue.empty():
                    results[r] = ("exited", p.exitcode)
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(results))} did not finish in {timeout_s} s")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return results
