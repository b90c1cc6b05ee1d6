"""fastplan's walk of the module for `HeuristicalStorageReservation` leaves every rank exactly the
memory TorchRec's own `reserve` leaves, and the same state on the reservation."""

import random
import warnings

import pytest
import torch
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError, Topology
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from fastplan.planner.reservation import reserve

SHARDERS = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def model(seed: int) -> nn.Module:
    """Embedding collections among dense layers, buffers and a parameter shared by two layers."""
    rng = random.Random(seed)
    bags = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t{i}", feature_names=[f"f{i}"], embedding_dim=rng.choice([4, 12, 64]),
                           num_embeddings=rng.randint(10, 10**6)) for i in range(rng.randint(1, 30))
    ], device=torch.device("meta"))
    seqs = EmbeddingCollection(tables=[
        EmbeddingConfig(name=f"s{i}", feature_names=[f"g{i}"], embedding_dim=16, num_embeddings=rng.randint(10, 10**5))
        for i in range(rng.randint(1, 5))
    ], device=torch.device("meta"))
    m = nn.Module()
    m.over = nn.Sequential(nn.Linear(rng.randint(1, 999), 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    m.inner = nn.Module()
    m.inner.bags, m.inner.seqs = bags, seqs
    m.inner.again = m.over  # reachable twice
    m.tied = nn.Linear(7, 3)
    m.tied.weight = m.over[2].weight
    m.register_buffer("step", torch.zeros(rng.randint(1, 99), dtype=torch.float64))
    return m


def capacities(topology: Topology):
    return [(d.storage.hbm, d.storage.ddr, d.storage.ssd) for d in topology.devices]


def both(module, topology, reservation_args, batch_size=512, constraints=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchRec's advice against this reservation
        theirs, mine = (HeuristicalStorageReservation(**reservation_args) for _ in range(2))
    expected = theirs.reserve(topology=topology, batch_size=batch_size, module=module, sharders=SHARDERS,
                              constraints=constraints)
    got = reserve(mine, topology, batch_size, module, SHARDERS, constraints)
    return expected, got, theirs, mine


@pytest.mark.parametrize("seed", range(6))
def test_each_rank_keeps_what_torchrec_leaves_it(seed):
    rng = random.Random(seed)
    module = model(seed)
    names = [n for n, _ in module.named_parameters() if n.startswith("inner.") and n.endswith(".weight")]
    constraints = {
        n.split(".")[-2]: ParameterConstraints(pooling_factors=[rng.uniform(0.1, 30) for _ in range(2)],
                                               batch_sizes=[rng.choice([64, 300]), 1000] if rng.random() < 0.5 else None)
        for n in names if rng.random() < 0.5
    }
    device = rng.choice(["cuda", "cpu"])
    topology = Topology(world_size=rng.choice([2, 8, 24]), local_world_size=2, compute_device=device,
                        hbm_cap=2**34, ddr_cap=2**36)
    before = capacities(topology)
    args = {"percentage": rng.choice([0.0, 0.15, 0.37]), "parameter_multiplier": rng.choice([6.0, 4.3, 1])}
    if seed == 5:
        args["dense_tensor_estimate"] = 123_457
    expected, got, theirs, mine = both(module, topology, args, rng.choice([1, 512, 999]), constraints)
    assert capacities(got) == capacities(expected)
    assert (mine._dense_storage, mine._kjt_storage) == (theirs._dense_storage, theirs._kjt_storage)
    assert capacities(mine.last_reserved_topology) == capacities(theirs.last_reserved_topology)
    assert mine.last_reserved_topology is not got  # a copy, as TorchRec keeps
    assert capacities(topology) == before  # untouched


def test_a_module_that_walks_its_own_way_gets_torchrecs_walk():
    class Hides(nn.Module):  # TorchRec's walk goes through each module's named_modules()
        def named_modules(self, memo=None, prefix="", remove_duplicate=True):
            yield prefix, self

    module = model(0)
    module.hidden = Hides()
    module.hidden.big = nn.Linear(1000, 1000)
    expected, got, _, _ = both(module, Topology(world_size=2, compute_device="cuda"), {"percentage": 0.1})
    assert capacities(got) == capacities(expected)
    module.hidden = nn.Linear(1000, 1000)
    assert capacities(both(module, Topology(world_size=2, compute_device="cuda"), {"percentage": 0.1})[0]) != \
        capacities(expected)  # the hidden layer mattered


def test_too_little_memory_raises_torchrecs_error():
    with pytest.raises(PlannerError, match="negative available hbm storage"):
        both(model(1), Topology(world_size=2, compute_device="cuda", hbm_cap=1000), {"percentage": 0.1})
