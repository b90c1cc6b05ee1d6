"""The plan cache: a key that changes with every input, warm hits equal to what was computed,
entry-level corruption recovery, read-only and deleted directories, and locks that never hang."""

import dataclasses
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints, Topology
from torchrec.distributed.types import BoundsCheckMode, CacheAlgorithm, CacheParams, DataType, KeyValueParams
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from fastplan import FastShardingPlanner, PlanCache
from fastplan.cache import fingerprint
from fastplan.models import ebc, report_tables
from fastplan.planfile import table_digests
from fastplan.planner.enumerator import FastEnumerator
from fastplan.planner.search import SearchConfig
from tests.multiproc import run_ranks

SHARDERS = [EmbeddingBagCollectionSharder()]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the key --------------------------------------------------------------------------------------
def base_configs():
    return [EmbeddingBagConfig(name=f"t{i}", feature_names=[f"f{i}"], embedding_dim=8 * (i + 1), num_embeddings=100 * (i + 1))
            for i in range(3)]


def key(configs=None, constraints=None, sharders=None, planner_args=None, topology_args=None):
    topology = Topology(**{"world_size": 4, "compute_device": "cuda", **(topology_args or {})})
    planner = FastShardingPlanner(topology=topology, constraints=constraints, cache=None, debug=False, **(planner_args or {}))
    return planner.planning_inputs(ebc(configs or base_configs()), sharders or SHARDERS).key


def _printed_key():
    print(key())


def test_an_unchanged_input_gives_the_same_key_in_another_process():
    code = "from tests.test_cache import _printed_key; _printed_key()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONHASHSEED": "99", "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == key()


TABLE_CHANGES = {
    "num_embeddings": 101, "embedding_dim": 12, "name": "renamed", "data_type": DataType.FP16,
    "feature_names": ["f0", "g0"], "weight_init_max": 0.5, "weight_init_min": -0.5, "num_embeddings_post_pruning": 50,
    "init_fn": print, "need_pos": True, "input_dim": 7, "total_num_buckets": 4, "use_virtual_table": True,
    "virtual_table_eviction_policy": "evict-me", "enable_embedding_update": True, "stash_weights": True,
    "pooling": PoolingType.MEAN,
}


def test_the_table_changes_cover_every_config_field():
    assert set(TABLE_CHANGES) == {f.name for f in dataclasses.fields(EmbeddingBagConfig)}


@pytest.mark.parametrize("field", sorted(TABLE_CHANGES))
def test_every_table_field_changes_the_key(field):
    configs = base_configs()
    try:  # rebuild the module when TorchRec accepts the value, else change the config it holds
        configs[0] = dataclasses.replace(configs[0], **{field: TABLE_CHANGES[field]})
        changed = key(configs)
    except Exception:  # noqa: BLE001
        configs = base_configs()
        module = ebc(configs)
        setattr(module.embedding_bag_configs()[0], field, TABLE_CHANGES[field])
        planner = FastShardingPlanner(topology=Topology(world_size=4, compute_device="cuda"), cache=None, debug=False)
        changed = planner.planning_inputs(module, SHARDERS).key
    assert changed != key()


CONSTRAINT_CHANGES = {
    "sharding_types": ["row_wise"], "compute_kernels": ["fused_uvm"], "min_partition": 4, "pooling_factors": [3.0],
    "num_poolings": [2.0], "batch_sizes": [64], "is_weighted": True, "cache_params": CacheParams(load_factor=0.3),
    "enforce_hbm": True, "stochastic_rounding": True, "bounds_check_mode": BoundsCheckMode.WARNING,
    "feature_names": ["f0"], "output_dtype": DataType.FP16, "device_group": "cuda",
    "key_value_params": KeyValueParams(l2_cache_size=2), "use_virtual_table": True,
}
CACHE_PARAMS_CHANGES = {
    "algorithm": CacheAlgorithm.LFU, "load_factor": 0.4, "reserved_memory": 1.0, "precision": DataType.FP16,
    "prefetch_pipeline": True, "stats": object(), "multipass_prefetch_config": None,
}


def test_the_constraint_changes_cover_every_constraint_field():
    assert set(CONSTRAINT_CHANGES) == {f.name for f in dataclasses.fields(ParameterConstraints)}


@pytest.mark.parametrize("field", sorted(CONSTRAINT_CHANGES))
def test_every_constraint_field_changes_the_key(field):
    base = key(constraints={"t0": ParameterConstraints()})
    assert key(constraints={"t0": ParameterConstraints(**{field: CONSTRAINT_CHANGES[field]})}) != base


@pytest.mark.parametrize("field", sorted(set(CACHE_PARAMS_CHANGES) - {"multipass_prefetch_config"}))
def test_every_cache_params_field_changes_the_key(field):
    base = key(constraints={"t0": ParameterConstraints(cache_params=CacheParams(load_factor=0.2))})
    changed = CacheParams(**{"load_factor": 0.2, field: CACHE_PARAMS_CHANGES[field]})
    assert key(constraints={"t0": ParameterConstraints(cache_params=changed)}) != base


TOPOLOGY_CHANGES = {
    "world_size": 8, "compute_device": "cpu", "hbm_cap": 2**30, "ddr_cap": 2**31, "ssd_cap": 2**32,
    "local_world_size": 2, "pod_size": 2, "hbm_mem_bw": 1e9, "ddr_mem_bw": 1e8, "ssd_mem_bw": 1e6,
    "hbm_to_ddr_mem_bw": 1e7, "intra_host_bw": 1e10, "inter_host_bw": 1e8, "bwd_compute_multiplier": 3,
    "weighted_feature_bwd_compute_multiplier": 2, "uneven_sharding_perf_multiplier": 1.5,
}


@pytest.mark.parametrize("field", sorted(TOPOLOGY_CHANGES))
def test_every_topology_field_changes_the_key(field):
    assert key(topology_args={field: TOPOLOGY_CHANGES[field]}) != key()


def qcomm_sharder(forward, backward):
    registry = get_qcomm_codecs_registry(QCommsConfig(forward_precision=forward, backward_precision=backward))
    return [EmbeddingBagCollectionSharder(qcomm_codecs_registry=registry)]


def test_qcomm_precisions_change_the_key():
    keys = {key(sharders=qcomm_sharder(f, b)) for f, b in
            [(CommType.FP16, CommType.FP16), (CommType.INT8, CommType.FP16), (CommType.FP16, CommType.BF16)]}
    assert len(keys) == 3 and key() not in keys


@pytest.mark.parametrize("change", [
    {"sharders": [EmbeddingBagCollectionSharder(fused_params={"cache_load_factor": 0.3})]},
    {"sharders": [EmbeddingBagCollectionSharder(fused_params={"prefetch_pipeline": True})]},
    {"planner_args": {"storage_reservation": HeuristicalStorageReservation(percentage=0.2)}},
    {"planner_args": {"storage_reservation": HeuristicalStorageReservation(percentage=0.15, parameter_multiplier=4)}},
    {"planner_args": {"batch_size": 1024}},
    {"planner_args": {"timeout_seconds": 5}},
    *({"planner_args": {"search_config": dataclasses.replace(SearchConfig(), **{f.name: f.default * 2})}}
      for f in dataclasses.fields(SearchConfig)),
])
def test_sharders_reservation_batch_size_and_search_settings_change_the_key(change):
    assert key(**change) != key()


def _key_with_enumerator(**changes):
    topology = Topology(world_size=4, compute_device="cuda")
    args = {"topology": topology, "batch_size": 512, **changes}
    enumerator = FastEnumerator(args.pop("topology"), args.pop("batch_size"), **args)
    planner = FastShardingPlanner(topology=topology, enumerator=enumerator, cache=None, debug=False)
    return planner.planning_inputs(ebc(base_configs()), SHARDERS).key


def test_a_fast_enumerator_with_the_planners_settings_gives_the_planners_key():
    assert _key_with_enumerator() == key()


@pytest.mark.parametrize("change", [
    {"batch_size": 1024}, {"use_exact_enumerate_order": True},
    {"constraints": {"t0": ParameterConstraints(sharding_types=["row_wise"])}},
    {"topology": Topology(world_size=8, compute_device="cuda")},
])
def test_a_fast_enumerators_own_settings_change_the_key(change):
    assert _key_with_enumerator(**change) != key()


@pytest.mark.parametrize("library", ["fastplan", "fastplan_source", "torch", "torchrec", "fbgemm_gpu", "ortools", "numpy"])
def test_each_library_version_changes_the_key(monkeypatch, library):
    base = key()
    versions = {**fingerprint.code_versions(), library: "9.9.9"}
    monkeypatch.setattr(fingerprint, "code_versions", lambda: versions)
    assert key() != base


def test_editing_any_planner_source_file_changes_the_source_digest(tmp_path):
    for f in fingerprint.SOURCE_DIR.glob("*.py"):
        shutil.copy(f, tmp_path / f.name)
    files = sorted(tmp_path.glob("*.py"))
    base = fingerprint.source_digest(files)
    for f in files:
        original = f.read_bytes()
        f.write_bytes(original + b"\n")
        assert fingerprint.source_digest(files) != base, f.name
        f.write_bytes(original)


def test_inputs_round_trip_to_the_same_key():
    planner = FastShardingPlanner(topology=Topology(world_size=4, compute_device="cuda"), cache=None, debug=False)
    inputs = planner.planning_inputs(ebc(base_configs()), SHARDERS)
    assert fingerprint.PlanInputs.from_dict(inputs.to_dict()).key == inputs.key


# ---- hits and misses ------------------------------------------------------------------------------
def planner_for(cache_dir, world=4, **kwargs):
    return FastShardingPlanner(topology=Topology(world_size=world, compute_device="cuda"), cache=PlanCache(cache_dir),
                               debug=False, **kwargs)


def test_the_cached_plan_equals_the_one_computed(tmp_path):
    module = ebc(report_tables(120))
    computed = planner_for(tmp_path).plan(module, SHARDERS)  # cold: computed, then stored
    uncached = FastShardingPlanner(topology=Topology(world_size=4, compute_device="cuda"), cache=None, debug=False)
    warm = planner_for(tmp_path)
    served = warm.plan(module, SHARDERS)
    assert warm.last_report.source == "cache"
    assert served.plan == computed.plan  # every field of every ParameterSharding
    assert table_digests(served) == table_digests(uncached.plan(module, SHARDERS))


def test_a_corrupt_entry_is_replanned_and_the_others_still_served(tmp_path, caplog):
    small, large = ebc(report_tables(20)), ebc(report_tables(30))
    first, second = planner_for(tmp_path), planner_for(tmp_path)
    first.plan(small, SHARDERS)
    second.plan(large, SHARDERS)
    entry = PlanCache(tmp_path).path(first.last_key)
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="fastplan.cache"):
        again = planner_for(tmp_path)
        again.plan(small, SHARDERS)
    assert again.last_report.source == "planned" and "corrupt plan cache entry" in caplog.text
    other = planner_for(tmp_path)
    other.plan(large, SHARDERS)
    assert other.last_report.source == "cache"
    assert PlanCache(tmp_path).get(first.last_key) is not None  # rewritten


@pytest.mark.parametrize("garbage", [b"", b"\x80\x04K\x01.", b'{"format": "fastplan-plan"}', b"[1, 2"])
def test_garbage_entries_are_misses_and_removed(tmp_path, garbage):
    cache = PlanCache(tmp_path)
    cache.plans.mkdir(parents=True)
    cache.path("a" * 64).write_bytes(garbage)
    assert cache.get("a" * 64) is None and "a" * 64 not in cache


def test_an_entry_stored_under_the_wrong_key_is_not_served(tmp_path):
    p = planner_for(tmp_path)
    p.plan(ebc(report_tables(10)), SHARDERS)
    cache = PlanCache(tmp_path)
    shutil.copy(cache.path(p.last_key), cache.path("b" * 64))
    assert cache.get("b" * 64) is None
    assert [k for k, _ in cache.verify()] == []  # the moved copy was already removed by get


def test_a_deleted_cache_directory_is_recreated(tmp_path):
    p = planner_for(tmp_path / "c")
    p.plan(ebc(report_tables(10)), SHARDERS)
    shutil.rmtree(tmp_path / "c")
    p.plan(ebc(report_tables(11)), SHARDERS)
    assert p.last_key in PlanCache(tmp_path / "c")


def test_a_read_only_cache_is_still_read(tmp_path, monkeypatch, caplog):
    planner_for(tmp_path).plan(ebc(report_tables(10)), SHARDERS)
    real_open = os.open

    def read_only_mount(path, flags, *args, **kwargs):  # what a read-only mount answers, even to root
        if str(path).startswith(str(tmp_path)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_mount)
    p = planner_for(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fastplan.cache"):
        p.plan(ebc(report_tables(10)), SHARDERS)
        assert p.last_report.source == "cache"
        p.plan(ebc(report_tables(12)), SHARDERS)
        p.plan(ebc(report_tables(13)), SHARDERS)
    assert p.last_report.source == "planned" and p.last_key not in PlanCache(tmp_path)
    assert caplog.text.count("not writable") == 1


# ---- concurrent planners --------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from fastplan.cache.store import PlanCache
with PlanCache(sys.argv[1]).lock(sys.argv[2]):
    print("locked", flush=True)
    time.sleep(600)
"""


def hold_lock(cache_dir, key):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(cache_dir), key], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_killed_lock_holder_does_not_block_the_next_planner(tmp_path):
    module = ebc(report_tables(20))
    planner = planner_for(tmp_path)
    holder = hold_lock(tmp_path, planner.planning_inputs(module, SHARDERS).key)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    start = time.monotonic()
    planner.plan(module, SHARDERS)
    assert time.monotonic() - start < 10 and planner.last_report.source == "planned"


def test_a_waiter_names_the_live_holder_and_gives_up_at_its_deadline(tmp_path, caplog):
    module = ebc(report_tables(20))
    planner = FastShardingPlanner(topology=Topology(world_size=4, compute_device="cuda"),
                                  cache=PlanCache(tmp_path, lock_wait_s=2), debug=False)
    holder = hold_lock(tmp_path, planner.planning_inputs(module, SHARDERS).key)
    try:
        with caplog.at_level(logging.WARNING, logger="fastplan.cache"):
            start = time.monotonic()
            planner.plan(module, SHARDERS)
        assert time.monotonic() - start < 10 and planner.last_report.source == "planned"
        assert f"being computed by pid {holder.pid}" in caplog.text and "gave up waiting" in caplog.text
    finally:
        holder.kill()
        holder.wait()


def _plan_shared(rank, world, cache_dir):
    import torch.distributed as dist

    dist.barrier()  # start together
    p = planner_for(cache_dir)
    plan = p.plan(ebc(report_tables(300)), SHARDERS)
    return p.last_report.source, table_digests(plan)


def test_concurrent_planners_compute_once_and_serve_what_was_computed(tmp_path):
    results = run_ranks(_plan_shared, world=3, args=(str(tmp_path),), timeout_s=180)
    assert all(status == "ok" for status, _ in results.values()), results
    assert sorted(v[0] for _, v in results.values()) == ["cache", "cache", "planned"]
    uncached = FastShardingPlanner(topology=Topology(world_size=4, compute_device="cuda"), cache=None, debug=False)
    expected = table_digests(uncached.plan(ebc(report_tables(300)), SHARDERS))
    assert all(v[1] == expected for _, v in results.values())


def test_a_cache_hit_rebuilds_torchrecs_planner_state_when_it_is_read(tmp_path):
    def planned(cache):
        p = FastShardingPlanner(topology=Topology(world_size=4, compute_device="cuda"), cache=cache, debug=False)
        plan = p.plan(ebc(report_tables(40)), SHARDERS)
        options = sorted((so.name, so.sharding_type, so.compute_kernel, tuple(s.rank for s in so.shards),
                          tuple(tuple(s.offset) for s in so.shards)) for so in p._best_plan)
        return p, plan, options

    _, plan, options = planned(PlanCache(str(tmp_path)))
    hit, hit_plan, hit_options = planned(PlanCache(str(tmp_path)))
    assert hit.last_report.source == "cache"
    assert table_digests(hit_plan) == table_digests(plan) and hit_options == options
    assert len(hit._enumerator.last_stored_search_space) > len(options)  # every option, as TorchRec's enumerator keeps
    assert hit.hash_planner_context_inputs() == planned(None)[0].hash_planner_context_inputs()
    assert hit._storage_reservation.last_reserved_topology is not None
