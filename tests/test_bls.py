"""BLS all-to-all and the lag-L pipeline: same bytes as synchronous, lag bounded, failures named, no hangs."""

import os
import time

import pytest

from tests.multiproc import run_ranks


def _pipeline_vs_sync(rank, world, kinds, lags):
    import torch
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner.types import ParameterConstraints, Topology

    from fastplan import FastShardingPlanner
    from fastplan.comm import BLSConfig, wire_bls
    from fastplan.models import SmallDLRM, random_batches, report_tables

    class CpuSharder(EmbeddingBagCollectionSharder):
        def sharding_types(self, device):
            return super().sharding_types(device) + ["row_wise"]

        def compute_kernels(self, sharding_type, device):
            return ["dense"]

    tables = report_tables(6, seed=1)
    constraints = {t.name: ParameterConstraints(sharding_types=[kinds[i % len(kinds)]]) for i, t in enumerate(tables)}

    def model():
        torch.manual_seed(0)
        return SmallDLRM(tables)

    planner = FastShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints, cache=None,
        debug=False, inference_comm=BLSConfig(lag=lags[-1], timeout_s=30),
    )
    plan = planner.collective_plan(model(), [CpuSharder()])
    batches = random_batches(tables, 10, 4, seed=10 + rank)
    reference = DistributedModelParallel(model(), device=torch.device("cpu"), plan=plan, sharders=[CpuSharder()])
    reference.eval()
    with torch.no_grad():
        expected = [reference(d, k) for d, k in batches]
    equal = {}
    for lag in lags:
        source = plan if lag != lags[-1] else planner  # the last lag comes from the planner's BLSConfig
        pipeline = wire_bls(model(), source, lag=None if lag == lags[-1] else lag, sharders=[CpuSharder()])
        with torch.no_grad():
            got = list(pipeline.run(batches))
        equal[lag] = len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
        stats = pipeline.group.lag_stats() if lag else {}
        assert all(s.max_lag <= lag for s in stats.values()), stats
    return equal


@pytest.mark.parametrize(
    "world,kinds",
    [(2, ["table_wise"]), (2, ["row_wise"]), (3, ["table_wise", "row_wise", "column_wise"])],
)
def test_pipeline_outputs_equal_synchronous_bitwise(world, kinds):
    results = run_ranks(_pipeline_vs_sync, world, args=(kinds, [0, 1, 2, 4]), timeout_s=300)
    for rank, (status, value) in sorted(results.items()):
        assert status == "ok", f"rank {rank}: {value}"
        assert value == {0: True, 1: True, 2: True, 4: True}, f"rank {rank}: {value}"


def _soak(rank, world, lag, iterations, slow_rank):
    import torch
    import torch.distributed as dist

    from fastplan.comm import new_bls_group

    group = new_bls_group(lag, timeout_s=60)
    gen = torch.Generator().manual_seed(0)  # every rank draws the same split matrix
    in_flight, mismatches = [], 0
    for i in range(iterations):
        sizes = torch.randint(0, 4, (world, world), generator=gen)
        data = torch.arange(int(sizes[rank].sum()), dtype=torch.int64) + 1_000 * rank + 1_000_000 * i
        out = torch.empty(int(sizes[:, rank].sum()), dtype=torch.int64)
        work = dist.all_to_all_single(out, data, sizes[:, rank].tolist(), sizes[rank].tolist(), group=group, async_op=True)
        in_flight.append((i, work, out, sizes))
        if rank == slow_rank and i % 500 == 0:
            time.sleep(0.05)  # let the others run into the lag bound
        if len(in_flight) > lag:
            j, work, out, sz = in_flight.pop(0)
            work.wait()
            expected = torch.cat([
                torch.arange(int(sz[src, :rank].sum()), int(sz[src, : rank + 1].sum()), dtype=torch.int64)
                + 1_000 * src + 1_000_000 * j
                for src in range(world)
            ])
            mismatches += int(not torch.equal(out, expected))
    for _, work, _, _ in in_flight:
        work.wait()
    group.flush()
    stats = list(group.lag_stats().values())
    return mismatches, max(s.max_lag for s in stats), max(s.max_ahead for s in stats), sum(s.posts for s in stats)


def test_ten_thousand_batch_soak_has_no_mismatch_and_respects_the_lag_bound():
    results = run_ranks(_soak, 2, args=(2, 10_000, 1), timeout_s=400)
    for rank, (status, value) in sorted(results.items()):
        assert status == "ok", f"rank {rank}: {value}"
        mismatches, max_lag, max_ahead, posts = value
        assert mismatches == 0 and posts == 10_000
        # Lag L = 2 both ways: no rank posts beyond L past a peer's last delivered block, and no peer
        # delivers more than L iterations beyond this rank's posts (so at most L + 1 are buffered).
        assert max_lag <= 2 and max_ahead <= 2


def _failing_peer(rank, world, mode):
    import torch
    import torch.distributed as dist

    from fastplan.comm import BLSError, new_bls_group

    group = new_bls_group(lag=1, timeout_s=3)
    out = torch.empty(world * 2)
    start = time.monotonic()
    try:
        for i in range(50):
            if rank == world - 1 and i == 5:
                if mode == "kill":
                    os._exit(0)  # dies mid-stream
                time.sleep(30)  # stalls far past the 3 s timeout
            work = dist.all_to_all_single(out, torch.full((world * 2,), float(rank)), group=group, async_op=True)
            work.wait()
    except BLSError as e:
        return f"{type(e).__name__} after {time.monotonic() - start:.1f}s: {e}"
    return "no error"


@pytest.mark.parametrize("mode", ["kill", "stall"])
def test_dead_or_stalled_peer_raises_an_error_naming_it(mode):
    results = run_ranks(_failing_peer, 3, args=(mode,), timeout_s=60)
    for rank in (0, 1):
        status, text = results[rank]
        assert status == "ok" and "rank 2" in text, text
        assert "iteration" in text
        if mode == "stall":
            assert "BLSTimeoutError" in text
