"""Shard an EmbeddingBagCollection with FastShardingPlanner and train it with DistributedModelParallel
on 2 CPU processes (gloo, 127.0.0.1).

    .venv/bin/python examples/train_dmp.py
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner.types import Topology
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastplan import FastShardingPlanner  # noqa: E402
from fastplan.models import ebc, report_tables  # noqa: E402

WORLD = 2
NUM_TABLES = 20


def worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    tables = report_tables(NUM_TABLES)
    model = ebc(tables, device="cpu")
    apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.05})
    planner = FastShardingPlanner(topology=Topology(world_size=WORLD, compute_device="cpu"), debug=False)
    sharder = EmbeddingBagCollectionSharder()
    plan = planner.collective_plan(model, [sharder])  # each rank plans; ranks compare a hash
    if rank == 0:
        print(planner.last_report.table())
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=[sharder])
    keys = [f for t in tables for f in t.feature_names]
    g = torch.Generator().manual_seed(rank)
    for step in range(5):
        lengths = torch.randint(0, 3, (len(keys) * 8,), generator=g)
        limits = torch.tensor([t.num_embeddings for t in tables]).repeat_interleave(8)
        values = torch.cat([torch.randint(0, int(m), (int(n),), generator=g) for n, m in zip(lengths, limits)])
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
        out = dmp(kjt)
        out = out.wait() if hasattr(out, "wait") else out
        loss = out.values().pow(2).mean()
        loss.backward()  # the fused optimizer updates the sharded tables in backward
        if rank == 0:
            print(f"step {step}: loss {loss.item():.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port,), nprocs=WORLD, join=True)
