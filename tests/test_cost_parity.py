"""The vectorized cost model reproduces TorchRec's estimators: perf within 1e-6 relative, storage exact."""

import random

import pytest
import torch
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.estimator import EmbeddingPerfEstimatorFactory
from torchrec.distributed.planner.types import ParameterConstraints, Topology
from torchrec.distributed.types import CacheParams
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from fastplan.planner.cost import PERF_FIELDS, CostModel, fast_model_applies
from fastplan.planner.search_space import build_search_space
from fastplan.planner.tables import collect_tables


def random_constraints(rng, names):
    out = {}
    for name in names:
        if rng.random() < 0.5:
            n = rng.choice([1, 2])
            out[name] = ParameterConstraints(
                pooling_factors=[rng.uniform(0.3, 40) for _ in range(n)],
                num_poolings=[rng.choice([1.0, 2.0]) for _ in range(n)] if rng.random() < 0.5 else None,
                batch_sizes=[rng.choice([64, 512, 1000]) for _ in range(n)] if rng.random() < 0.5 else None,
                is_weighted=rng.random() < 0.3,
                min_partition=rng.choice([None, 32, 64]),
                cache_params=CacheParams(load_factor=rng.choice([0.1, 0.5])) if rng.random() < 0.3 else None,
            )
    return out


def compare(module, sharders, topology, constraints, batch_size):
    ref = EmbeddingEnumerator(topology, batch_size=batch_size, constraints=constraints).enumerate(module, sharders)
    tables = collect_tables(module, sharders, topology.compute_device, batch_size, constraints)
    config = EmbeddingPerfEstimatorFactory.create("default_estimator", topology=topology, constraints=constraints).config
    assert fast_model_applies(config)
    space = build_search_space(tables, CostModel(topology, config))
    index = {
        (tables[t].name, st, k): o
        for o, (t, st, k) in enumerate(zip(space.opt_table.tolist(), space.opt_type.tolist(), space.opt_kernel.tolist()))
    }
    assert len(index) == len(ref), "fastplan must offer exactly TorchRec's options"
    checked = 0
    for so in ref:
        sl = space.shards(index[(so.name, so.sharding_type, so.compute_kernel)])
        assert len(so.shards) == sl.stop - sl.start, so.name
        for k, shard in enumerate(so.shards):
            i = sl.start + k
            where = f"{so.name} {so.sharding_type}/{so.compute_kernel} shard {k}"
            assert list(shard.size) == space.shard_size[i].tolist(), where
            assert list(shard.offset) == space.shard_offset[i].tolist(), where
            for field, mine in zip(PERF_FIELDS, space.shard_perf[i].tolist()):
                theirs = getattr(shard.perf, field)
                assert mine == pytest.approx(theirs, rel=1e-6, abs=1e-300), f"{where} {field}"
            assert (shard.storage.hbm, shard.storage.ddr) == (int(space.shard_hbm[i]), int(space.shard_ddr[i])), where
            checked += 1
    return checked


@pytest.mark.parametrize("seed", range(6))
def test_perf_and_storage_match_torchrec_on_random_tables(seed):
    rng = random.Random(seed)
    configs = [
        EmbeddingBagConfig(
            name=f"t{i}",
            feature_names=[f"f{i}"],
            embedding_dim=rng.choice([4, 8, 16, 48, 64, 128, 256, 384]),
            num_embeddings=rng.randint(1, 200_000),
            data_type=rng.choice(list(__import__("torchrec").modules.embedding_configs.DataType)[:2]),
        )
        for i in range(25)
    ]
    module = EmbeddingBagCollection(tables=configs, device=torch.device("meta"), is_weighted=seed % 3 == 0)
    world, local, device = rng.choice([(8, 8, "cuda"), (16, 4, "cuda"), (24, 8, "cuda"), (4, 2, "cpu"), (2, 1, "cpu")])
    topology = Topology(world_size=world, local_world_size=local, compute_device=device, hbm_cap=rng.choice([2**30, 2**34]))
    constraints = random_constraints(rng, [c.name for c in configs])
    assert compare(module, [EmbeddingBagCollectionSharder()], topology, constraints, rng.choice([128, 512, 4096])) > 0


def test_sequence_embeddings_match_torchrec():
    rng = random.Random(7)
    configs = [
        EmbeddingConfig(name=f"s{i}", feature_names=[f"s{i}"], embedding_dim=64, num_embeddings=rng.randint(10, 5000))
        for i in range(12)
    ]
    module = EmbeddingCollection(tables=configs, device=torch.device("meta"))
    topology = Topology(world_size=8, local_world_size=4, compute_device="cuda")
    assert compare(module, [EmbeddingCollectionSharder()], topology, random_constraints(rng, [c.name for c in configs]), 512) > 0
