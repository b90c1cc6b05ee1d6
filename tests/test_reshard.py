"""Train under plan A on gloo processes, replan with tables added, grown, resharded and removed (and
on a different world size), move the state through torch.distributed.checkpoint, load under plan B:
kept weights and optimizer state are bitwise equal, new state is fresh, the next steps' losses match
continuing under A, and each rank reads from other ranks exactly the bytes the PlanDiff says move."""

import pytest

from tests.multiproc import run_ranks

ROWS = {"kept_a": 40, "kept_b": 30, "tw_rw": 50, "cw_tw": 24, "grow": 20, "gone": 10}
DIMS = {"cw_tw": 16}
CONSTRAINTS_A = {"tw_rw": ["table_wise"], "cw_tw": ["column_wise"], "kept_a": ["table_wise"], "kept_b": ["table_wise"],
                 "grow": ["table_wise"], "gone": ["table_wise"]}
CONSTRAINTS_B = {"tw_rw": ["row_wise"], "cw_tw": ["table_wise"], "kept_a": ["table_wise"], "kept_b": ["table_wise"],
                 "grow": ["table_wise"], "fresh": ["table_wise"]}
ROWS_B = {"kept_a": 40, "kept_b": 30, "tw_rw": 50, "cw_tw": 24, "grow": 60, "fresh": 16}
EXACT = ["kept_a", "kept_b", "tw_rw", "grow"]  # state carries over exactly (same row-wise layout per column range)


def _setup(world, rows, constraints, seed):
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner.types import ParameterConstraints, Topology
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from fastplan import FastShardingPlanner

    class CpuSharder(EmbeddingBagCollectionSharder):
        """Row-wise is offered on CPU only when asked; fused kernels so the optimizer state is fused."""

        def sharding_types(self, compute_device_type):
            return ["table_wise", "column_wise", "row_wise"]

        def compute_kernels(self, sharding_type, compute_device_type):
            return ["fused"]

    torch.manual_seed(seed)
    tables = [EmbeddingBagConfig(name=n, feature_names=[f"f_{n}"], embedding_dim=DIMS.get(n, 8), num_embeddings=r)
              for n, r in rows.items()]
    model = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    sharder = CpuSharder(fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1})
    cons = {n: ParameterConstraints(sharding_types=types, min_partition=8) for n, types in constraints.items()}
    planner = FastShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"), constraints=cons,
                                  cache=None, debug=False)
    return model, sharder, planner


def _batch(rows, active, seed):
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    keys = [f"f_{n}" for n in rows]
    lengths = torch.tensor([[int(torch.randint(1, 4, (1,), generator=g)) if n in active else 0 for _ in range(4)]
                            for n in rows]).flatten()
    limits = [min(rows[n], ROWS[n]) if n in ROWS else rows[n] for n in rows for _ in range(4)]
    values = torch.cat([torch.randint(0, m, (int(k),), generator=g) for k, m in zip(lengths.tolist(), limits)])
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)


def _loss(dmp, kjt, active):
    out = dmp(kjt)
    out = out.wait() if hasattr(out, "wait") else out
    return sum(out[f"f_{n}"].pow(2).sum() for n in sorted(active))


def _gathered(dmp, rank):
    """Every key of `model_state` (from any rank) as a full numpy array on rank 0 (arrays, not
    tensors, travel back to the test: tensors would be shared memory of an exiting process)."""
    import torch
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from fastplan.reshard import model_state

    local = {}
    for key, value in model_state(dmp).items():
        shards = value.local_shards() if isinstance(value, ShardedTensor) else []
        pieces = [(s.metadata.shard_offsets, s.tensor.detach().clone()) for s in shards]
        if not isinstance(value, ShardedTensor):
            pieces = [([0] * value.dim(), value.detach().clone())]
        local[key] = (tuple(value.size()), value.dtype, pieces)
    everything = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(local, everything, dst=0)
    if rank != 0:
        return None
    out = {}
    for part in everything:
        for key, (size, dtype, pieces) in part.items():
            full = out.setdefault(key, torch.zeros(size, dtype=dtype))
            for offsets, tensor in pieces:
                full[tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))] = tensor
    return {key: value.numpy() for key, value in out.items()}


def _train_under_a(rank, world, path):
    import torch
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel

    from fastplan.reshard import save_state

    model, sharder, planner = _setup(world, ROWS, CONSTRAINTS_A, seed=0)
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=[sharder])
    for step in range(3):
        _loss(dmp, _batch(ROWS, ROWS, 10 * step + rank), ROWS).backward()
    save_state(dmp, path)
    state = _gathered(dmp, rank)
    kept = set(ROWS_B) & set(ROWS)
    loss_x = _loss(dmp, _batch(ROWS, kept, 99), kept)  # the same batch on every rank
    loss_x.backward()
    loss_y = _loss(dmp, _batch(ROWS, EXACT, 98), EXACT)
    return plan, state, loss_x.item(), loss_y.item()


def _load_under_b(rank, world, path, plan_a):
    import torch
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel

    from fastplan.reshard import load_state

    model, sharder, planner = _setup(world, ROWS_B, CONSTRAINTS_B, seed=1)
    plan, diff = planner.collective_replan(model, [sharder], plan_a)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=[sharder])
    fresh = _gathered(dmp, rank)
    report = load_state(dmp, path)
    state = _gathered(dmp, rank)
    kept = set(ROWS_B) & set(ROWS)
    loss_x = _loss(dmp, _batch(ROWS_B, kept, 99), kept)
    loss_x.backward()
    loss_y = _loss(dmp, _batch(ROWS_B, EXACT, 98), EXACT)
    return diff, report, fresh, state, loss_x.item(), loss_y.item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt"))
    results = run_ranks(_train_under_a, world=2, args=(path,), timeout_s=120)
    for rank, (status, value) in sorted(results.items()):
        assert status == "ok", f"rank {rank}: {value}"
    plan, state, loss_x, loss_y = results[0][1]
    return path, plan, state, loss_x, loss_y


def _key(table, state=None):
    weight = f"embedding_bags.{table}.weight"
    return weight if state is None else f"optimizer/{weight}/{table}.{state}"


def _same_bits(x, y) -> bool:
    return x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()


def _check(trained, world):
    import numpy as np

    path, plan_a, a, loss_x_a, loss_y_a = trained
    results = run_ranks(_load_under_b, world=world, args=(path, plan_a), timeout_s=150)
    for rank, (status, value) in sorted(results.items()):
        assert status == "ok", f"rank {rank}: {value}"
    diff, _, fresh, b, loss_x, loss_y = results[0][1]
    changes = {t.table: t for t in diff.tables}
    assert changes["gone"].status == "removed" and changes["fresh"].status == "added"
    assert changes["tw_rw"].status == changes["cw_tw"].status == "resharded" and changes["grow"].resized
    for table in ("kept_a", "kept_b", "tw_rw", "cw_tw"):
        assert _same_bits(b[_key(table)], a[_key(table)]), f"{table}: weights differ after the move"
    for table in ("kept_a", "kept_b", "tw_rw"):
        assert _same_bits(b[_key(table, "momentum1")], a[_key(table, "momentum1")]), f"{table}: optimizer state differs"
    old = ROWS["grow"]
    assert _same_bits(b[_key("grow")][:old], a[_key("grow")])
    assert _same_bits(b[_key("grow")][old:], fresh[_key("grow")][old:]), "new rows of a grown table must stay fresh"
    assert _same_bits(b[_key("grow", "momentum1")][:old], a[_key("grow", "momentum1")])
    assert _same_bits(b[_key("grow", "momentum1")][old:], fresh[_key("grow", "momentum1")][old:])
    for key in (_key("fresh"), _key("fresh", "momentum1")):
        assert _same_bits(b[key], fresh[key]), f"{key}: a new table must keep its initialisation"
    # Column-wise -> table-wise: one row-wise state per column shard merges into their column-weighted mean.
    merged = a[_key("cw_tw", "momentum1")].reshape(2, ROWS["cw_tw"]).mean(axis=0)
    assert np.allclose(b[_key("cw_tw", "momentum1")], merged, rtol=1e-6)
    assert any(_key("cw_tw", "momentum1") in value[1].approximate for _, value in results.values())
    # Only moved bytes cross ranks: each rank reads from other ranks' files what the diff says it receives.
    for rank, (_, value) in sorted(results.items()):
        report = value[1]
        assert report.crossed(rank) == diff.received[rank], (rank, report.read_from, diff.received)
    assert sum(diff.received) == diff.moved_bytes > 0
    # The next steps: same loss as continuing under A (float sums over a row-wise table may reorder).
    assert loss_x == pytest.approx(loss_x_a, rel=1e-6)
    assert loss_y == pytest.approx(loss_y_a, rel=1e-6)
    return diff, results


def test_state_moves_to_a_replanned_plan_on_the_same_world_size(trained):
    _check(trained, world=2)


def test_state_moves_to_a_replanned_plan_on_three_ranks(trained):
    diff, results = _check(trained, world=3)
    assert diff.received[2] > 0 and results[2][1][1].crossed(2) == diff.received[2]


class _RunsCode:
    """A pickle that would run `os.system` when unpickled."""

    def __reduce__(self):
        import os

        return (os.system, ("echo crafted > /dev/null",))


@pytest.mark.parametrize("payload, error", [
    (_RunsCode(), "os.system|posix.system"),
    ({"any": "dict"}, "not DCP Metadata"),
])
def test_checkpoint_metadata_is_read_without_running_code(tmp_path, payload, error):
    import pickle

    from fastplan.reshard import _CountingReader

    (tmp_path / ".metadata").write_bytes(pickle.dumps(payload))
    with pytest.raises(pickle.UnpicklingError, match=error):
        _CountingReader(str(tmp_path)).read_metadata()


def test_genuine_checkpoint_metadata_is_read(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    from fastplan.reshard import _CountingReader

    dcp.save({"w": torch.arange(6.0).reshape(2, 3)}, storage_writer=dcp.FileSystemWriter(str(tmp_path)),
             no_dist=True)
    metadata = _CountingReader(str(tmp_path)).read_metadata()
    assert list(metadata.state_dict_metadata["w"].size) == [2, 3]
