"""FastShardingPlanner behaves like TorchRec's planner, only faster: real plans, same constraints, clear errors."""

import subprocess
import sys

import pytest
import torch
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.perf_models import NoopPerfModel
from torchrec.distributed.planner.types import ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from fastplan import ConstraintError, FastShardingPlanner, InfeasiblePlanError
from fastplan.cache.agreement import plan_hash, table_digests
from fastplan.models import ebc, report_tables

SHARDERS = [EmbeddingBagCollectionSharder()]


def planner(world=8, device="cuda", **kw):
    kw.setdefault("cache", None)
    kw.setdefault("debug", False)
    return FastShardingPlanner(topology=Topology(world_size=world, compute_device=device, **kw.pop("topo", {})), **kw)


def score_with_torchrec(module, plan, topology, sharders=SHARDERS):
    """Max over ranks of summed Perf.total, with TorchRec's own estimators (shards matched by offset)."""
    options = EmbeddingEnumerator(topology, batch_size=512).enumerate(module, sharders)
    loads = [0.0] * topology.world_size
    for so in sorted(options, key=lambda s: (s.path, s.name)):
        ps = plan.plan[so.path][so.name]
        if (ps.sharding_type, ps.compute_kernel) != (so.sharding_type, so.compute_kernel):
            continue
        for shard, rank in zip(so.shards, ps.ranks):
            loads[rank] += shard.perf.total
    return max(loads)


def test_plan_is_a_torchrec_sharding_plan_covering_every_table():
    module = ebc(report_tables(60))
    plan = planner().plan(module, SHARDERS)
    assert isinstance(plan, ShardingPlan)
    assert sorted(plan.plan[""].keys()) == sorted(f"table_{i}" for i in range(60))
    for ps in plan.plan[""].values():
        assert all(0 <= r < 8 for r in ps.ranks)
        if ps.sharding_type != "data_parallel":
            assert len(ps.sharding_spec.shards) == len(ps.ranks)


def test_plan_is_at_least_as_good_as_torchrec_on_its_own_cost_model():
    module = ebc(report_tables(24, seed=3))
    topology = Topology(world_size=4, compute_device="cuda")
    ours = planner(world=4).plan(module, SHARDERS)
    theirs = EmbeddingShardingPlanner(topology=topology, debug=False).plan(module, SHARDERS)
    assert score_with_torchrec(module, ours, topology) <= score_with_torchrec(module, theirs, topology) * (1 + 1e-12)


def test_same_inputs_give_the_same_plan_in_another_process():
    module = ebc(report_tables(120, seed=5))
    mine = plan_hash(table_digests(planner().plan(module, SHARDERS)))
    code = (
        "from fastplan.models import ebc, report_tables;"
        "from fastplan.cache.agreement import plan_hash, table_digests;"
        "from torchrec.distributed.planner.types import Topology;"
        "from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder as S;"
        "from fastplan import FastShardingPlanner as P;"
        "p=P(topology=Topology(world_size=8, compute_device='cuda'), cache=None, debug=False);"
        "print(plan_hash(table_digests(p.plan(ebc(report_tables(120, seed=5)), [S()]))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == mine


def test_constraints_restrict_sharding_types_and_kernels():
    module = ebc(report_tables(10))
    constraints = {
        "table_0": ParameterConstraints(sharding_types=["row_wise"]),
        "table_1": ParameterConstraints(sharding_types=["column_wise"], compute_kernels=["fused_uvm"]),
        "table_2": ParameterConstraints(sharding_types=["data_parallel"]),
    }
    plan = planner(constraints=constraints).plan(module, SHARDERS).plan[""]
    assert plan["table_0"].sharding_type == "row_wise" and plan["table_0"].ranks == list(range(8))
    assert (plan["table_1"].sharding_type, plan["table_1"].compute_kernel) == ("column_wise", "fused_uvm")
    assert plan["table_2"].sharding_type == "data_parallel"


def test_constraints_for_tables_the_module_lacks_are_ignored_with_one_warning(caplog):
    # As TorchRec: one constraints dict can serve several models.
    with caplog.at_level("WARNING", logger="fastplan"):
        plan = planner(constraints={"no_such_table": ParameterConstraints(), "table_1": ParameterConstraints(
            sharding_types=["row_wise"])}).plan(ebc(report_tables(3)), SHARDERS)
    assert plan.plan[""]["table_1"].sharding_type == "row_wise"
    warnings = [r for r in caplog.records if "no_such_table" in r.getMessage()]
    assert len(warnings) == 1 and "table_1" not in warnings[0].getMessage()


def test_unknown_sharding_type_is_an_error_naming_it():
    with pytest.raises(ConstraintError, match="diagonal_wise"):
        planner(constraints={"table_0": ParameterConstraints(sharding_types=["diagonal_wise"])}).plan(
            ebc(report_tables(3)), SHARDERS
        )


def test_infeasible_memory_names_the_table_and_the_bytes():
    big = [EmbeddingBagConfig(name="huge", feature_names=["f"], embedding_dim=128, num_embeddings=10_000_000)]
    p = planner(world=2, topo={"hbm_cap": 1 << 30, "ddr_cap": 1 << 30})
    with pytest.raises(InfeasiblePlanError) as err:
        p.plan(ebc(big), SHARDERS)
    msg = str(err.value)
    assert "huge" in msg and "needs hbm=" in msg and "rank 1: hbm=" in msg


def test_empty_module_plans_to_an_empty_plan():
    assert planner().plan(nn.Linear(2, 2), SHARDERS).plan == {}


def test_nested_models_with_bags_and_sequences():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.user = ebc(report_tables(5, seed=1))
            self.item = EmbeddingBagCollection(
                tables=[EmbeddingBagConfig(name="item_0", feature_names=["i"], embedding_dim=16, num_embeddings=100)],
                device=torch.device("meta"),
            )
            self.seq = EmbeddingCollection(
                tables=[EmbeddingConfig(name="seq_0", feature_names=["s"], embedding_dim=16, num_embeddings=100)],
                device=torch.device("meta"),
            )

    plan = planner().plan(Model(), SHARDERS + [EmbeddingCollectionSharder()])
    assert set(plan.plan) == {"user", "item", "seq"}
    assert "seq_0" in plan.plan["seq"] and "item_0" in plan.plan["item"]


def test_heterogeneous_memory_keeps_big_tables_off_the_small_rank():
    from torchrec.distributed.planner.types import DeviceHardware, Storage

    topology = Topology(world_size=2, compute_device="cuda", hbm_cap=8 << 30)
    topology._devices[1] = DeviceHardware(rank=1, storage=Storage(hbm=1 << 20, ddr=topology.devices[1].storage.ddr), perf=topology.devices[1].perf)
    tables = [EmbeddingBagConfig(name=f"big_{i}", feature_names=[f"f{i}"], embedding_dim=64, num_embeddings=200_000) for i in range(4)]
    constraints = {f"big_{i}": ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"]) for i in range(4)}
    p = FastShardingPlanner(topology=topology, constraints=constraints, cache=None, debug=False)
    plan = p.plan(ebc(tables), SHARDERS).plan[""]
    assert all(ps.ranks == [0] for ps in plan.values())


def test_cpu_topology_plans_for_cpu_kernels():
    plan = planner(world=2, device="cpu").plan(ebc(report_tables(8)), SHARDERS).plan[""]
    assert {ps.compute_kernel for ps in plan.values()} <= {"fused", "dense"}
    assert all(ps.sharding_spec is None or str(ps.sharding_spec.shards[0].placement.device()) == "cpu" for ps in plan.values())


def test_debug_report_lists_every_rank_and_the_gap(caplog):
    p = planner(world=4, debug=True)
    with caplog.at_level("INFO", logger="fastplan"):
        p.plan(ebc(report_tables(40)), SHARDERS)
    report = p.last_report
    assert len(report.ranks) == 4 and report.lower_bound <= report.makespan
    assert "gap" in caplog.text and "rank" in caplog.text


def test_report_prints_the_lp_bound_when_the_cheap_one_is_far_from_the_plan():
    p = planner(world=64)
    p.plan(ebc(report_tables(100)), SHARDERS)
    report = p.last_report
    assert report.bound == "LP" and report.cheap_bound < report.lower_bound <= report.makespan
    assert report.gap < (report.makespan - report.cheap_bound) / report.makespan
    assert "LP lower bound" in report.table() and "cheap bound" in report.table()


def test_custom_enumerator_is_used():
    topology = Topology(world_size=4, compute_device="cuda")
    calls = []

    class Counting(EmbeddingEnumerator):
        def enumerate(self, module, sharders):
            calls.append(1)
            return super().enumerate(module, sharders)

    p = FastShardingPlanner(topology=topology, enumerator=Counting(topology, batch_size=512), cache=None, debug=False)
    plan = p.plan(ebc(report_tables(6)), SHARDERS)
    assert calls and len(plan.plan[""]) == 6


def test_callbacks_and_torchrec_stats_receive_the_chosen_sharding_options():
    from torchrec.distributed.planner.stats import EmbeddingStats

    seen = []

    def callback(options):
        seen.extend((o.name, o.sharding_type, [s.rank for s in o.shards]) for o in options)
        return options

    p = planner(callbacks=[callback], stats=EmbeddingStats())
    plan = p.plan(ebc(report_tables(12)), SHARDERS)
    assert sorted(name for name, _, _ in seen) == sorted(f"table_{i}" for i in range(12))
    for name, sharding_type, ranks in seen:
        assert plan.plan[""][name].sharding_type == sharding_type and plan.plan[""][name].ranks == ranks


def test_it_is_torchrecs_planner_with_the_state_tools_read_after_plan():
    from torchrec.distributed.planner.stats import EmbeddingStats

    p = FastShardingPlanner(topology=Topology(world_size=4, compute_device="cuda"), cache=None)
    assert isinstance(p, EmbeddingShardingPlanner)
    assert [type(s) for s in p._stats] == [EmbeddingStats]  # TorchRec's default Stats
    module = ebc(report_tables(10))
    plan = p.plan(module, SHARDERS)
    assert p._num_proposals == p._num_plans == 1
    assert {so.name: [s.rank for s in so.shards] for so in p._best_plan} == {n: ps.ranks for n, ps in plan.plan[""].items()}
    assert {so.name for so in p._enumerator.last_stored_search_space} == set(plan.plan[""])
    assert p._stats[0]._stats_table and p._stats[0]._stats_table[0].startswith("####")
    assert isinstance(p.hash_planner_context_inputs(), int) and p.hash_planner_context_inputs_str()


def _shards(options):
    return sorted((so.name, so.sharding_type, so.compute_kernel, [(s.rank, s.size, s.offset, s.perf, s.storage) for s in so.shards])
                  for so in options)


def test_without_debug_the_chosen_options_are_built_when_first_read_and_match_debug_s(tmp_path):
    from fastplan import PlanCache
    from fastplan.planfile import estimates_from_options
    from fastplan.models import scale_tables

    module = ebc(scale_tables(30, seed=3))
    forced = {"table_1": ParameterConstraints(sharding_types=["row_wise"]),  # runs of shards: full, last, empty
              "table_2": ParameterConstraints(sharding_types=["column_wise"])}
    eager = planner(world=16, debug=True, topo={"local_world_size": 8}, constraints=forced)
    lazy = planner(world=16, topo={"local_world_size": 8}, constraints=forced, cache=PlanCache(str(tmp_path)))
    plan = lazy.plan(module, SHARDERS)
    assert eager.plan(module, SHARDERS) == plan
    assert lazy._best_plan_value is None  # not built by plan()
    assert _shards(lazy._best_plan) == _shards(eager._best_plan)
    assert lazy.last_plan_file.estimates == estimates_from_options(eager._best_plan)
    assert {ps.sharding_type for ps in plan.plan[""].values()} >= {"row_wise", "column_wise", "data_parallel"}
