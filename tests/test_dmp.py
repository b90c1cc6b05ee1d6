"""A fastplan plan drives DistributedModelParallel on 2 CPU/gloo processes and matches the unsharded module."""

from tests.multiproc import run_ranks


def _shard_and_compare(rank, world):
    import copy

    import torch
    import torch.distributed as dist
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner.types import ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from fastplan import FastShardingPlanner

    class CpuRowWiseSharder(EmbeddingBagCollectionSharder):
        """TorchRec offers row-wise on CPU only when asked; this test asks."""

        def sharding_types(self, compute_device_type):
            return super().sharding_types(compute_device_type) + ["row_wise"]

        def compute_kernels(self, sharding_type, compute_device_type):
            return ["dense"]

    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name="tw", feature_names=["f_tw"], embedding_dim=8, num_embeddings=50),
        EmbeddingBagConfig(name="rw", feature_names=["f_rw"], embedding_dim=8, num_embeddings=41),
        EmbeddingBagConfig(name="cw", feature_names=["f_cw"], embedding_dim=16, num_embeddings=30),
    ]
    model = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    reference = copy.deepcopy(model)
    constraints = {
        "tw": ParameterConstraints(sharding_types=["table_wise"]),
        "rw": ParameterConstraints(sharding_types=["row_wise"]),
        "cw": ParameterConstraints(sharding_types=["column_wise"], min_partition=8),
    }
    sharder = CpuRowWiseSharder()
    planner = FastShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints, cache=None, debug=False
    )
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    types = {name: ps.sharding_type for name, ps in plan.plan[""].items()}
    assert types == {"tw": "table_wise", "rw": "row_wise", "cw": "column_wise"}, types
    assert len(plan.plan[""]["cw"].ranks) == 2
    dmp = DistributedModelParallel(
        module=model, device=torch.device("cpu"), plan=plan, sharders=[sharder],
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
    )
    # Give the shards the reference weights (their state_dict views share storage with the kernels).
    full = reference.state_dict()
    for key, value in dmp.state_dict().items():
        source = full[key.split("module.")[-1]]
        for shard in value.local_shards():
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.detach().copy_(source[r0 : r0 + nr, c0 : c0 + nc])
    g = torch.Generator().manual_seed(100 + rank)
    keys = ["f_tw", "f_rw", "f_cw"]
    batch = 4
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=g)
    limits = torch.tensor([50, 41, 30]).repeat_interleave(batch)
    values = torch.cat([torch.randint(0, int(m), (int(n),), generator=g) for n, m in zip(lengths, limits)])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
    with torch.no_grad():
        out = dmp(kjt)
        out = out.wait() if hasattr(out, "wait") else out
        expected = reference(kjt)
    return float((out.values() - expected.values()).abs().max())


def test_sharded_forward_equals_unsharded_with_tw_rw_cw_tables():
    results = run_ranks(_shard_and_compare, world=2, timeout_s=180)
    for rank, (status, value) in sorted(results.items()):
        assert status == "ok", f"rank {rank}: {value}"
        assert value < 1e-6, f"rank {rank}: max abs difference {value}"  # float sum order differs across shards
