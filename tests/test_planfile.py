"""Plan files: every ParameterSharding field round-trips, nothing in a file is executed, bad files are
rejected naming the field, and TorchRec's own planner and DMP accept what fastplan wrote."""

import dataclasses
import json
import os
import pickle

import pytest
import torch
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import PlannerError, Topology
from torchrec.distributed.types import (
    BoundsCheckMode,
    CacheAlgorithm,
    CacheParams,
    DataType,
    EmbeddingModuleShardingPlan,
    KeyValueParams,
    ParameterSharding,
    ShardingPlan,
)
from fbgemm_gpu.tbe.cache.cache_config import MultiPassPrefetchConfig

from fastplan import FastPlanLoader, FastShardingPlanner, PlanCache, PlanFileError, dump_plan, load_plan
from fastplan.planfile import TableDoc, plan_from_dict, plan_to_dict, table_digests
from fastplan.models import ebc, report_tables
from tests.multiproc import run_ranks

SHARDERS = [EmbeddingBagCollectionSharder()]


def every_field_plan() -> ShardingPlan:
    spec = EnumerableShardingSpec([
        ShardMetadata(shard_offsets=[0, 0], shard_sizes=[50, 8], placement="rank:0/cuda:0"),
        ShardMetadata(shard_offsets=[50, 0], shard_sizes=[50, 8], placement="rank:1/cuda:1"),
    ])
    return ShardingPlan({
        "sparse.ebc": EmbeddingModuleShardingPlan({
            "rw": ParameterSharding(
                sharding_type="row_wise", compute_kernel="fused_uvm_caching", ranks=[0, 1], sharding_spec=spec,
                cache_params=CacheParams(algorithm=CacheAlgorithm.LFU, load_factor=0.25, reserved_memory=1.5,
                                         precision=DataType.FP16, prefetch_pipeline=True,
                                         multipass_prefetch_config=MultiPassPrefetchConfig(num_passes=3)),
                enforce_hbm=True, stochastic_rounding=False, bounds_check_mode=BoundsCheckMode.WARNING,
                output_dtype=DataType.BF16,
                key_value_params=KeyValueParams(ssd_storage_directory="/ssd", l2_cache_size=4, ps_hosts=(("h", 1),)),
            ),
            "dp": ParameterSharding(sharding_type="data_parallel", compute_kernel="dense", ranks=[0, 1]),
        }),
    })


def test_schema_covers_every_parameter_sharding_field():
    fields = {f.name for f in dataclasses.fields(ParameterSharding)} - {"sharding_spec"} | {"shards"}
    assert set(TableDoc.__struct_fields__) == fields


def test_every_field_round_trips_through_a_file(tmp_path):
    plan = every_field_plan()
    dump_plan(plan, tmp_path / "p.plan")
    loaded = load_plan(tmp_path / "p.plan").plan
    assert loaded.plan == plan.plan  # dataclass equality: every field, shard metadata and placements
    assert plan_from_dict(json.loads(json.dumps(plan_to_dict(plan)))).plan == plan.plan


def test_plan_file_is_readable_json_with_the_report(tmp_path):
    planner = FastShardingPlanner(topology=Topology(world_size=4, compute_device="cuda"), cache=PlanCache(tmp_path / "c"), debug=False)
    plan = planner.plan(ebc(report_tables(30)), SHARDERS)
    planner.last_plan_file.dump(tmp_path / "p.plan")
    doc = json.loads((tmp_path / "p.plan").read_text())
    assert doc["format"] == "fastplan-plan" and doc["key"] == planner.last_key
    assert doc["plan"][""]["table_0"]["sharding_type"] in ("table_wise", "row_wise", "column_wise", "data_parallel", "table_row_wise")
    back = load_plan(tmp_path / "p.plan")
    assert back.report == planner.last_report and table_digests(back.plan) == table_digests(plan)
    assert len(back.inputs["tables"]) == 30


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['FASTPLAN_TEST_MARKER']}",))


@pytest.fixture
def marker(tmp_path, monkeypatch):
    path = tmp_path / "payload-ran"
    monkeypatch.setenv("FASTPLAN_TEST_MARKER", str(path))
    return path


def test_a_pickled_payload_is_rejected_and_never_run(tmp_path, marker):
    crafted = tmp_path / "evil.plan"
    crafted.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(PlanFileError, match="evil.plan: not a valid fastplan plan file"):
        load_plan(crafted)
    assert not marker.exists()


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d["plan"][""]["table_0"].update(ranks="0"), "table 'table_0' (root module): field 'ranks': Expected `array | null`, got `str`"),
        (lambda d: d["plan"][""]["table_0"].update(cache_params={"load_factor": "high"}), "'table_0' (root module): field 'cache_params.load_factor': Expected `float | null`"),
        (lambda d: d["plan"][""]["table_0"].update(cache_params={"stats": {"x": 1}}), "CacheStatistics cannot be read"),
        (lambda d: d["plan"][""]["table_0"].update(surprise=1), "surprise"),
        (lambda d: d.update(version=3), "plan file version 3"),
        (lambda d: d.pop("format"), "format"),
    ],
)
def test_a_malformed_file_is_rejected_naming_the_field(tmp_path, edit, field):
    planner = FastShardingPlanner(topology=Topology(world_size=2, compute_device="cuda"), cache=None, debug=False)
    dump_plan(planner.plan(ebc(report_tables(3)), SHARDERS), tmp_path / "p.plan")
    doc = json.loads((tmp_path / "p.plan").read_text())
    edit(doc)
    (tmp_path / "p.plan").write_text(json.dumps(doc))
    with pytest.raises(PlanFileError) as e:
        load_plan(tmp_path / "p.plan")
    assert field in str(e.value) and "p.plan" in str(e.value)


def _plan_file(tmp_path, world, device="cuda", n=40):
    planner = FastShardingPlanner(topology=Topology(world_size=world, compute_device=device),
                                  cache=PlanCache(tmp_path / "cache"), debug=False)
    module = ebc(report_tables(n))
    plan = planner.plan(module, SHARDERS)
    planner.last_plan_file.dump(tmp_path / "p.plan")
    return module, plan


def test_torchrec_planner_loads_a_fastplan_plan_through_the_plan_loader(tmp_path):
    module, plan = _plan_file(tmp_path, world=4)
    topology = Topology(world_size=4, compute_device="cuda")
    stock = EmbeddingShardingPlanner(topology=topology, plan_loader=FastPlanLoader(tmp_path / "p.plan"), debug=False)
    assert table_digests(stock.plan(module, SHARDERS)) == table_digests(plan)


def test_plan_loader_refuses_a_plan_for_other_tables(tmp_path):
    _plan_file(tmp_path, world=4, n=40)
    stock = EmbeddingShardingPlanner(topology=Topology(world_size=4, compute_device="cuda"),
                                     plan_loader=FastPlanLoader(tmp_path / "p.plan"), debug=False)
    with pytest.raises(PlannerError, match="not all search space is covered"):
        stock.plan(ebc(report_tables(39)), SHARDERS)


def _dmp_with_loaded_plan(rank, world, path):
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    torch.manual_seed(0)
    plan = load_plan(path).plan
    model = ebc(report_tables(6), device="cpu")
    dmp = DistributedModelParallel(module=model, device=torch.device("cpu"), plan=plan, sharders=SHARDERS,
                                   env=ShardingEnv.from_process_group(dist.GroupMember.WORLD))
    keys = [f"feature_{i}" for i in range(6)]
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.zeros(12, dtype=torch.long),
                                              lengths=torch.ones(12, dtype=torch.long))
    out = dmp(kjt)
    out = out.wait() if hasattr(out, "wait") else out
    return sorted(out.keys()) == sorted(keys) and str(dmp.plan) == str(plan)


def test_distributed_model_parallel_accepts_a_loaded_plan(tmp_path):
    _plan_file(tmp_path, world=2, device="cpu", n=6)
    results = run_ranks(_dmp_with_loaded_plan, world=2, args=(str(tmp_path / "p.plan"),), timeout_s=120)
    assert results == {0: ("ok", True), 1: ("ok", True)}, results


def _dp_plan_file(tmp_path):
    """A plan whose table_0 is data-parallel on 4 ranks (four identical shards), dumped from the cache's entry."""
    from torchrec.distributed.planner.types import ParameterConstraints

    planner = FastShardingPlanner(topology=Topology(world_size=4, compute_device="cuda"), cache=PlanCache(tmp_path / "cache"),
                                  debug=False, constraints={"table_0": ParameterConstraints(sharding_types=["data_parallel"])})
    module = ebc(report_tables(5))
    plan = planner.plan(module, SHARDERS)
    planner.last_plan_file.dump(tmp_path / "p.plan")
    return module, plan


def test_identical_shards_are_written_once_and_loaded_one_per_rank(tmp_path):
    module, plan = _dp_plan_file(tmp_path)
    doc = json.loads((tmp_path / "p.plan").read_text())
    dp = doc["estimates"][""]["table_0"]
    assert doc["version"] == 2 and dp["ranks"] == [0, 1, 2, 3]
    assert all(len(dp[f]) == 1 for f in ("sizes", "offsets", "hbm", "ddr", "ssd", "perf"))
    options = FastPlanLoader(tmp_path / "p.plan").load()
    shards = next(o for o in options.values() if o.name == "table_0").shards
    assert [s.rank for s in shards] == [0, 1, 2, 3] and len({(s.perf.total, s.storage.hbm) for s in shards}) == 1
    stock = EmbeddingShardingPlanner(topology=Topology(world_size=4, compute_device="cuda"),
                                     plan_loader=FastPlanLoader(tmp_path / "p.plan"), debug=False)
    assert table_digests(stock.plan(module, SHARDERS)) == table_digests(plan)


def test_a_version_1_file_listing_every_shard_still_loads(tmp_path):
    _dp_plan_file(tmp_path)
    compact = load_plan(tmp_path / "p.plan").estimates
    doc = json.loads((tmp_path / "p.plan").read_text())
    for tables in doc["estimates"].values():
        for e in tables.values():
            for f in ("sizes", "offsets", "hbm", "ddr", "ssd", "perf"):
                e[f] = e[f] * len(e["ranks"]) if len(e[f]) == 1 else e[f]
    doc["version"] = 1
    (tmp_path / "v1.plan").write_text(json.dumps(doc))
    full = load_plan(tmp_path / "v1.plan").estimates
    assert {k: {t: e.rows() for t, e in v.items()} for k, v in full.items()} == \
        {k: {t: e.rows() for t, e in v.items()} for k, v in compact.items()}


def test_estimates_with_neither_one_entry_nor_one_per_shard_are_rejected_naming_the_table(tmp_path):
    _dp_plan_file(tmp_path)
    doc = json.loads((tmp_path / "p.plan").read_text())
    doc["estimates"][""]["table_0"]["perf"] *= 2
    (tmp_path / "p.plan").write_text(json.dumps(doc))
    with pytest.raises(PlanFileError, match=r"table 'table_0' \(root module\): 'perf' has 2 entries for 4 shards"):
        load_plan(tmp_path / "p.plan")
