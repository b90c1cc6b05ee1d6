"""From tables to a skew-tolerant sharded inference loop in a few lines (2 CPU processes, gloo).

    .venv/bin/python examples/bls_inference.py
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.distributed.planner.types import Topology

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastplan import FastShardingPlanner  # noqa: E402
from fastplan.comm import BLSConfig, wire_bls  # noqa: E402
from fastplan.models import SmallDLRM, random_batches, report_tables  # noqa: E402

WORLD = 2


def worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    tables = report_tables(12)
    torch.manual_seed(0)
    model = SmallDLRM(tables)
    planner = FastShardingPlanner(
        topology=Topology(world_size=WORLD, compute_device="cpu"), debug=False, inference_comm=BLSConfig(lag=2)
    )
    pipeline = wire_bls(model, planner)  # plans (collective_plan), shards on a "bls" group, lag 2
    with torch.no_grad():
        for b, scores in enumerate(pipeline.run(random_batches(tables, 8, 16, seed=rank))):
            if rank == 0:
                print(f"batch {b}: mean score {scores.mean().item():+.5f}")
    pipeline.group.shutdown()
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port,), nprocs=WORLD, join=True)
