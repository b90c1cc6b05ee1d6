"""Inputs TorchRec's planner handles, fastplan handles too: wide column-wise tables, memory that is
tight but sufficient, hosts, device groups, feature processors, key-value tables and a user's
performance model. Each plan is checked with TorchRec's own estimators and placement rules
(`benchmarks/fuzz.py: score`)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrec.distributed.planner.types import ParameterConstraints, Topology
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from fastplan import FastShardingPlanner, InfeasiblePlanError
from fastplan.models import ebc, report_tables

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import fuzz  # noqa: E402


def checked_plan(module, topology, constraints=None, **planner_args):
    """fastplan's plan, after TorchRec's estimators confirm it fits and uses only TorchRec's options."""
    kw = dict(topology=topology, constraints=constraints, debug=False, cache=None, **planner_args)
    plan = FastShardingPlanner(**kw).plan(module, fuzz._sharders())
    case = fuzz.Case(0, topology.world_size, topology.local_world_size, topology.compute_device, 512, 1.0, False,
                     module, constraints or {}, 0)
    case.topology = topology
    verdict, _, detail = fuzz.score(case, plan)
    assert verdict == "fits", detail
    return plan


def bags(*dims_rows, **kw):
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t{i}", feature_names=[f"f{i}"], embedding_dim=d, num_embeddings=r)
        for i, (d, r) in enumerate(dims_rows)
    ], device=torch.device("meta"), **kw)


@pytest.mark.parametrize("world,dim", [(2, 512), (4, 1024), (8, 1152), (8, 2048)])
def test_column_wise_tables_with_more_shards_than_ranks(world, dim):
    plan = checked_plan(bags((dim, 50_000), (16, 1000)), Topology(world_size=world, compute_device="cuda"),
                        {"t0": ParameterConstraints(sharding_types=["column_wise", "table_column_wise"])})
    assert len(plan.plan[""]["t0"].ranks) > world  # several shards of one table share a rank


def test_memory_that_is_tight_but_sufficient_is_planned():
    # The report's 100 tables on 4 ranks: TorchRec plans at 13.0 MB of HBM per rank (measured, 17 s).
    topology = Topology(world_size=4, compute_device="cuda", hbm_cap=13_000_000, ddr_cap=1024)
    checked_plan(ebc(report_tables(100)), topology)


def test_memory_that_is_too_small_is_proven_infeasible_naming_tables_and_reservation():
    topology = Topology(world_size=4, compute_device="cuda", hbm_cap=12_000_000, ddr_cap=1024)
    with pytest.raises(InfeasiblePlanError) as e:
        FastShardingPlanner(topology=topology, cache=None, debug=False).plan(ebc(report_tables(100)), fuzz._sharders())
    assert e.value.proven and e.value.error_type.name == "INSUFFICIENT_STORAGE"
    text = str(e.value)
    assert "table_" in text and "rank" in text and "Storage reservation" in text


@pytest.mark.parametrize("sharding_type", ["table_row_wise", "table_column_wise"])
def test_host_sharded_tables_stay_inside_one_host(sharding_type):
    module = bags(*[(256 + 64 * i, 200_000) for i in range(6)])
    topology = Topology(world_size=16, local_world_size=8, compute_device="cuda")
    plan = checked_plan(module, topology, {f"t{i}": ParameterConstraints(sharding_types=[sharding_type]) for i in range(6)})
    for ps in plan.plan[""].values():  # `score` checked it too: this says what the rule is
        assert len({r // 8 for r in ps.ranks}) == 1


def test_a_device_group_constraint_is_not_an_unknown_table():
    constraints = {"t0": ParameterConstraints(device_group="cpu"), "t1": ParameterConstraints(sharding_types=["table_wise"])}
    plan = checked_plan(bags((64, 10_000), (32, 5000)), Topology(world_size=2, compute_device="cuda"), constraints)
    assert plan.plan[""]["t1"].sharding_type == "table_wise"


def test_feature_processed_bags_are_offered_what_torchrec_offers_them():
    from torchrec.distributed.fp_embeddingbag import FeatureProcessedEmbeddingBagCollectionSharder
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.modules.feature_processor_ import PositionWeightedModuleCollection
    from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection

    module = FeatureProcessedEmbeddingBagCollection(
        bags((64, 2_000_000), (32, 5000), is_weighted=True),
        PositionWeightedModuleCollection({"f0": 10, "f1": 10}, device=torch.device("meta")),
    )
    topology = Topology(world_size=4, compute_device="cuda")
    sharders = [FeatureProcessedEmbeddingBagCollectionSharder()]
    planner = FastShardingPlanner(topology=topology, cache=None, debug=False)
    planner.plan(module, sharders)

    def offered(options):
        return sorted({(so.name, so.sharding_type, so.compute_kernel) for so in options})

    ours = offered(planner._enumerator.last_stored_search_space)
    assert ours == offered(EmbeddingEnumerator(topology, batch_size=512).enumerate(module, sharders))
    assert not any(st in ("row_wise", "table_row_wise") for _, st, _ in ours)


def test_a_key_value_kernel_with_an_ssd_tier_is_planned():
    topology = Topology(world_size=2, compute_device="cuda", ssd_cap=1 << 40)
    plan = checked_plan(bags((64, 1_000_000), (32, 5000)), topology,
                        {"t0": ParameterConstraints(compute_kernels=["key_value"])})
    assert plan.plan[""]["t0"].compute_kernel == "key_value"


def test_a_performance_model_alone_chooses_among_the_candidates():
    class PreferHighRanks:  # rates plans with their shards on high ranks best
        def __init__(self):
            self.rated = []

        def rate(self, plan):
            self.rated.append(-sum(s.rank for so in plan for s in so.shards))
            return self.rated[-1]

    model = PreferHighRanks()
    topology = Topology(world_size=4, compute_device="cuda")
    planner = FastShardingPlanner(topology=topology, performance_model=model, cache=None, debug=False)
    planner.plan(ebc(report_tables(12)), fuzz._sharders())
    assert len(model.rated) >= 2
    assert -sum(s.rank for so in planner._best_plan for s in so.shards) == min(model.rated)


def test_the_plan_does_not_depend_on_the_hash_seed_on_torchrecs_estimator_path():
    # A device-group constraint sends costing through TorchRec's enumerator, whose option order
    # follows set iteration order (PYTHONHASHSEED).
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import fuzz, torch;"
        "from torchrec.distributed.planner.types import ParameterConstraints as C, Topology;"
        "from fastplan import FastShardingPlanner; from fastplan.models import ebc, report_tables;"
        "from fastplan.cache.agreement import plan_hash, table_digests;"
        "cs = {f'table_{i}': C(device_group='cuda', sharding_types=['table_wise','row_wise','column_wise','data_parallel'])"
        " for i in range(0, 30, 3)};"
        "p = FastShardingPlanner(topology=Topology(world_size=4, compute_device='cuda'), constraints=cs, cache=None, debug=False);"
        "print(plan_hash(table_digests(p.plan(ebc(report_tables(30)), fuzz._sharders()))))"
    )
    hashes = set()
    for seed in ("1", "3"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT,
                             env={"PYTHONHASHSEED": seed, "PATH": "", "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr[-2000:]
        hashes.add(out.stdout.strip().splitlines()[-1])
    assert len(hashes) == 1, hashes


def test_grid_sharding_asked_for_by_a_constraint_is_planned_as_torchrec_plans_it():
    from torchrec.distributed.planner import EmbeddingShardingPlanner

    module = bags((256, 100_000), (16, 1000))
    topology = Topology(world_size=16, local_world_size=8, compute_device="cuda")
    constraints = {"t0": ParameterConstraints(sharding_types=["grid_shard"])}
    ours = checked_plan(module, topology, constraints)
    theirs = EmbeddingShardingPlanner(topology=topology, constraints=constraints, debug=False).plan(module, fuzz._sharders())
    assert ours.plan[""]["t0"].sharding_type == "grid_shard"
    assert str(ours) == str(theirs)


def test_tables_are_found_as_torchrecs_sharders_and_enumerator_find_them():
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner.types import ShardingOption
    from torchrec.modules.embedding_configs import EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingCollection

    from fastplan.planner.tables import module_pooled, shardable_parameters

    shared = bags((8, 10), (8, 10), (4, 20))
    shared.embedding_bags["t1"].weight = shared.embedding_bags["t0"].weight  # named_parameters() yields it once
    ec = EmbeddingCollection(tables=[EmbeddingConfig(name="seq", embedding_dim=4, num_embeddings=10, feature_names=["s"])],
                             device=torch.device("meta"))
    for module, sharder in ((shared, EmbeddingBagCollectionSharder()), (ec, EmbeddingCollectionSharder())):
        assert shardable_parameters(sharder, module) == sharder.shardable_parameters(module)
    nested = torch.nn.Sequential(torch.nn.ModuleDict({"bags": shared, "inner": torch.nn.Sequential(ec)}))
    for module in (nested, shared, ec):
        for path in ("seq", "t0", "other", ""):
            assert module_pooled(module, path) == ShardingOption.module_pooled(module, path), (type(module), path)
    assert not module_pooled(nested, "seq") and module_pooled(nested, "t0")
