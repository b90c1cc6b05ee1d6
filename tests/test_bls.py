"""BLS all-to-all and its pipeline: same bytes as synchronous, the lag a bound that holds exactly,
work that overlaps a slow peer, failures named, no hangs."""

import os
import time

import pytest

from tests.multiproc import run_ranks


def _sharded(rank, world, kinds, num_batches=10, batch_size=4):
    """A small DLRM plan over `world` ranks, a model factory, this rank's batches and the sync outputs."""
    import torch
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner.types import ParameterConstraints, Topology

    from fastplan import FastShardingPlanner
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

    planner = FastShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints,
                                  cache=None, debug=False)
    plan = planner.collective_plan(model(), [CpuSharder()])
    batches = random_batches(tables, num_batches, batch_size, seed=10 + rank)
    reference = DistributedModelParallel(model(), device=torch.device("cpu"), plan=plan, sharders=[CpuSharder()])
    reference.eval()
    with torch.no_grad():
        expected = [reference(d, k) for d, k in batches]
    return planner, plan, model, [CpuSharder()], batches, expected


def _pipeline_vs_sync(rank, world, kinds, lags):
    import torch

    from fastplan.comm import BLSConfig, wire_bls

    planner, plan, model, sharders, batches, expected = _sharded(rank, world, kinds)
    planner.inference_comm = BLSConfig(lag=lags[-1], timeout_s=30)
    equal, channels = {}, set()
    for lag in lags:
        source = planner if lag == lags[-1] else plan  # the last lag comes from the planner's BLSConfig
        pipeline = wire_bls(model(), source, lag=None if lag == lags[-1] else lag, sharders=sharders)
        with torch.no_grad():
            got = list(pipeline.run(batches))
        equal[lag] = len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
        if lag:
            channels |= {os.path.basename(name).split(":")[0] for name in pipeline.group.lag_stats()}
        pipeline.group.shutdown()
    return equal, channels


@pytest.mark.parametrize(
    "world,kinds",
    [(2, ["table_wise"]), (2, ["row_wise"]), (3, ["table_wise", "row_wise", "column_wise"])],
)
def test_pipeline_outputs_equal_synchronous_bitwise(world, kinds):
    results = run_ranks(_pipeline_vs_sync, world, args=(kinds, [0, 1, 2, 4]), timeout_s=300)
    for rank, (status, value) in sorted(results.items()):
        assert status == "ok", f"rank {rank}: {value}"
        equal, channels = value
        assert equal == {0: True, 1: True, 2: True, 4: True}, f"rank {rank}: {equal}"
        # Ids go out in one self-sized message per peer (kjt.py), pooled embeddings come back
        # (comm_ops.py; row-wise: a reduce-scatter on gloo): no split sizes exchanged first (dist_data.py).
        assert "kjt.py" in channels and channels <= {"kjt.py", "comm_ops.py"}, f"rank {rank}: all-to-alls from {channels}"


def _stalled_collective(rank, world, lags, stall_at, stall_s):
    """Post every iteration without waiting (only the lag rule can hold a rank back); the last rank
    stalls before posting `stall_at`. Returns, per lag, when each post returned and the stall window."""
    import torch
    import torch.distributed as dist

    from fastplan.comm import new_bls_group

    out = {}
    for lag in lags:
        group = new_bls_group(lag, timeout_s=60)
        dist.barrier()
        posted_at, works, stall = [], [], None
        for i in range(stall_at + 2 * lag + 2):
            if rank == world - 1 and i == stall_at:
                start = time.monotonic()
                time.sleep(stall_s)
                stall = (start, time.monotonic())
            data = torch.arange(2 * world, dtype=torch.int64) + 100 * rank + 10_000 * i
            result = torch.empty(2 * world, dtype=torch.int64)
            works.append((i, dist.all_to_all_single(result, data, group=group, async_op=True), result))
            posted_at.append(time.monotonic())
        correct = 0
        for i, work, result in works:
            work.wait()
            expected = torch.cat([torch.arange(2 * rank, 2 * rank + 2) + 100 * src + 10_000 * i for src in range(world)])
            correct += torch.equal(result, expected)
        group.shutdown()
        out[lag] = (posted_at, stall, correct == len(works))
    return out


def test_with_one_peer_stalled_the_others_post_exactly_lag_iterations_ahead():
    stall_at, lags = 5, (1, 3)
    results = run_ranks(_stalled_collective, 3, args=(lags, stall_at, 2.0), timeout_s=180)
    for rank, (status, value) in results.items():
        assert status == "ok", f"rank {rank}: {value}"
    for lag in lags:
        _, stall, _ = results[2][1][lag]
        for rank in (0, 1):
            posted_at, _, correct = results[rank][1][lag]
            during_stall = sum(t < stall[1] for t in posted_at)
            # The stalled rank posted iterations 0..stall_at-1. post(i) returns once every peer's
            # i - lag arrived: exactly stall_at + lag posts return, no more and no fewer, before it resumes.
            assert during_stall == stall_at + lag, f"lag {lag}, rank {rank}: {during_stall} posts before the peer resumed"
            assert correct, f"lag {lag}, rank {rank}: wrong bytes"


def _slow_source(items, rank, slow_rank, stall_at, stall_s, pulled_at):
    """The slow rank's source has nothing for `stall_s` before batch `stall_at` (it answers NotYet)."""
    from fastplan.comm import NotYet

    for b, item in enumerate(items):
        if rank == slow_rank and b == stall_at:
            resume = time.monotonic() + stall_s
            while time.monotonic() < resume:
                yield NotYet(resume - time.monotonic())
        pulled_at.append(time.monotonic())
        yield item


def _stalled_pipeline(rank, world, lag, stall_at, stall_s):
    import torch

    from fastplan.comm import wire_bls

    _, plan, model, sharders, batches, expected = _sharded(rank, world, ["table_wise"], num_batches=stall_at + 2 * lag + 2)
    pipeline = wire_bls(model(), plan, lag=lag, sharders=sharders)
    pipeline.max_in_flight = len(batches)  # only the lag bound holds a rank back
    pulled_at, got, done_at = [], [], []
    with torch.no_grad():
        for out in pipeline.run(_slow_source(batches, rank, world - 1, stall_at, stall_s, pulled_at)):
            got.append(out)
            done_at.append(time.monotonic())
    pipeline.group.shutdown()
    return pulled_at, done_at, all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == len(expected)


def test_pipeline_with_a_stalled_peer_starts_exactly_lag_batches_ahead_and_stays_bitwise_equal():
    stall_at, lag, stall_s = 4, 2, 2.0
    results = run_ranks(_stalled_pipeline, 3, args=(lag, stall_at, stall_s), timeout_s=240)
    for rank, (status, value) in results.items():
        assert status == "ok", f"rank {rank}: {value}"
        assert value[2], f"rank {rank}: outputs differ from the synchronous forward"
    pulled_at, done_at, _ = results[2][1]
    resumed = pulled_at[stall_at]  # when the stalled rank took batch `stall_at`
    for rank in (0, 1):
        started = sum(t < resumed for t in results[rank][1][0])
        # Waiting for rank 2's batch stall_at, the others run exactly `lag` batches beyond it.
        assert started - 1 == stall_at + lag, f"rank {rank} started batches 0..{started - 1} while rank 2 was stalled"
    # While its source had nothing (NotYet), the stalled rank finished every batch it held.
    assert sum(t < resumed for t in done_at) == stall_at, f"rank 2 finished {sum(t < resumed for t in done_at)} batches"


def _one_slow_lookup(rank, world, lag, slow_at, slow_s):
    """The last rank's lookup of batch `slow_at` takes `slow_s`; every rank notes when each lookup starts."""
    import torch

    from benchmarks.bls import inject_lookup_work
    from fastplan.comm import wire_bls

    _, plan, model, sharders, batches, expected = _sharded(rank, world, ["table_wise"], num_batches=slow_at + 3 * lag + 3)
    pipeline = wire_bls(model(), plan, lag=lag, sharders=sharders)
    lookups, slow = [], []

    def delay_ms(b):
        lookups.append((b, time.monotonic()))
        if rank == world - 1 and b == slow_at:
            slow.append((time.monotonic(), time.monotonic() + slow_s))
            return slow_s * 1000
        return 0.0

    inject_lookup_work(pipeline.sparse, delay_ms)
    with torch.no_grad():
        got = list(pipeline.run(batches))
    ahead = max(s["max_ahead"] for s in pipeline.group.lag_stats().values())
    pipeline.group.shutdown()
    return lookups, slow, ahead, len(got) == len(batches) and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_while_a_peer_is_in_a_slow_lookup_a_rank_looks_up_batches_past_the_lag_and_sends_them_within_it():
    world, lag, slow_at = 2, 2, 2
    results = run_ranks(_one_slow_lookup, world, args=(lag, slow_at, 0.5), timeout_s=240)
    for rank, (status, value) in results.items():
        assert status == "ok", f"rank {rank}: {value}"
        lookups, _, ahead, equal = value
        assert equal, f"rank {rank}: outputs differ from the synchronous forward"
        assert ahead <= lag + 1, f"rank {rank}: a peer's block arrived {ahead} iterations ahead"  # messages keep the bound
    (start, end), = results[world - 1][1][1]
    during = [b for b, t in results[0][1][0] if start < t < end]
    # Rank 0 may not send batch slow_at + lag + 1's embeddings before the slow rank's of slow_at arrived,
    # but it computes them (and holds them back): its lookups run past the lag while the peer is slow.
    assert during and max(during) > slow_at + lag, f"rank 0 looked up batches {during} during the slow lookup"


def _rotating_slow_lookups(rank, world, lag, batches_n, slow_s):
    import torch

    from benchmarks.bls import inject_lookup_work
    from fastplan.comm import wire_bls

    _, plan, model, sharders, batches, expected = _sharded(rank, world, ["table_wise"], num_batches=batches_n)
    pipeline = wire_bls(model(), plan, lag=lag, sharders=sharders)
    slow = []

    def delay_ms(b):
        if b % world == rank:  # batch b is slow on rank b % world
            slow.append((time.monotonic(), time.monotonic() + slow_s))
            return slow_s * 1000
        return 0.0

    inject_lookup_work(pipeline.sparse, delay_ms)
    with torch.no_grad():
        got = list(pipeline.run(batches))
    pipeline.group.shutdown()
    return slow, all(torch.equal(a, b) for a, b in zip(got, expected))


def _covered(intervals):
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        total += max(0.0, b - max(a, end))
        end = max(end, b)
    return total


def test_slow_lookups_on_different_ranks_overlap_in_time():
    world, lag, n, slow_s = 3, 2, 9, 0.4
    results = run_ranks(_rotating_slow_lookups, world, args=(lag, n, slow_s), timeout_s=240)
    for rank, (status, value) in results.items():
        assert status == "ok", f"rank {rank}: {value}"
        assert value[1], f"rank {rank}: outputs differ from the synchronous forward"
    intervals = [iv for rank in range(world) for iv in results[rank][1][0]]
    assert len(intervals) == n
    # Run one after another (the synchronous forward, or max_in_flight=1), the slow lookups cover
    # n * slow_s of wall time. How much overlaps depends on whether a rank's next ids went out before
    # it entered a slow lookup (timing on a loaded machine: 0.83 of n * slow_s seen at worst).
    assert _covered(intervals) < 0.9 * n * slow_s, sorted(intervals)


def _soak(rank, world, lag, iterations):
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
    stats = list(group.lag_stats().values())
    group.shutdown()
    return mismatches, sum(s["posts"] for s in stats), max(s["max_ahead"] for s in stats)


def test_ten_thousand_iteration_soak_with_random_splits_has_no_mismatch():
    results = run_ranks(_soak, 2, args=(2, 10_000), timeout_s=400)
    for rank, (status, value) in sorted(results.items()):
        assert status == "ok", f"rank {rank}: {value}"
        mismatches, posts, max_ahead = value
        assert mismatches == 0 and posts == 10_000
        assert max_ahead <= 3  # no peer's block arrived more than L + 1 iterations ahead of this rank's posts


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
                time.sleep(8)  # stalls far past the 3 s timeout
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


def test_post_reads_any_cpu_tensor_as_its_bytes_and_checks_split_sizes():
    import torch

    from fastplan.comm.bls.collective import _bytes_of, _offsets, _writable_bytes

    strided = torch.arange(12.0).view(3, 4).t()
    for t in (strided, torch.zeros(0, 3), torch.arange(6.0).to(torch.bfloat16), torch.tensor([True, False])):
        assert bytes(_bytes_of(t)) == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), t.dtype
    assert _writable_bytes(strided) is None  # outputs are written in place: they must be contiguous
    out = torch.zeros(4, dtype=torch.bfloat16)
    _writable_bytes(out)[:] = _bytes_of(torch.ones(4, dtype=torch.bfloat16))
    assert torch.equal(out, torch.ones(4, dtype=torch.bfloat16))
    rows = torch.zeros(5, 2)  # 8 bytes a row
    assert _offsets([1, 4], rows, 40, 2, 0) == [0, 8, 40]
    assert _offsets(None, torch.zeros(4, 2), 32, 2, 0) == [0, 16, 32]
    with pytest.raises(ValueError, match="rank 1: split sizes \\[1, 3\\] add up to 4 rows, the tensor has 5"):
        _offsets([1, 3], rows, 40, 2, 1)
    with pytest.raises(ValueError, match="rank 0: 5 rows do not split evenly over 2 ranks"):
        _offsets(None, rows, 40, 2, 0)
    with pytest.raises(ValueError, match="rank 0: split sizes must have 2 entries"):
        _offsets([5], rows, 40, 2, 0)


class _CapturingGroup:
    """Stands in for a BLS group: `post_blocks` keeps the blocks; the test delivers them."""

    def __init__(self, rank, world):
        self._rank, self._world, self.sent = rank, world, None

    def rank(self):
        return self._rank

    def size(self):
        return self._world

    def post_blocks(self, blocks):
        from types import SimpleNamespace

        self.sent = [bytes(b) for b in blocks]
        return SimpleNamespace(iteration=7, channel=SimpleNamespace(name="ids"), output=None, wait=lambda: True)


def _self_sized_exchange(tamper=None):
    """Ranks 0 and 1 (batch sizes 2 and 3) send keys a, b to rank 0 and c to rank 1; rank 0's KJT."""
    import torch
    from torchrec.distributed.dist_data import KJTAllToAll
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from fastplan.comm.bls.kjt import SelfSizedKJTAllToAll

    kjts = [
        KeyedJaggedTensor.from_lengths_sync(["a", "b", "c"], torch.arange(9) + 100 * r, torch.tensor(lengths))
        for r, lengths in enumerate([[1, 2, 0, 3, 1, 2], [2, 0, 1, 1, 2, 0, 1, 1, 1]])
    ]
    groups = [_CapturingGroup(r, 2) for r in range(2)]
    pending = [SelfSizedKJTAllToAll(KJTAllToAll(g, [2, 1]), g)(kjt) for g, kjt in zip(groups, kjts)]
    received = [bytearray(g.sent[0]) for g in groups]
    if tamper:
        tamper(received[1])
    pending[0].work.output = [memoryview(bytes(b)) for b in received]
    return kjts, pending[0].wait().wait()


def test_self_sized_input_dist_rebuilds_the_features_torchrec_would_and_names_a_malformed_peer():
    import struct

    import torch

    from fastplan.comm import BLSError

    kjts, got = _self_sized_exchange()
    assert got.keys() == ["a", "b"] and got.stride() == 5  # both ranks' samples, rank 0's first
    for key in ("a", "b"):
        want = [jt for kjt in kjts for jt in kjt.to_dict()[key].to_dense()]
        assert all(torch.equal(x, y) for x, y in zip(got.to_dict()[key].to_dense(), want)) and len(want) == 5, key
    with pytest.raises(BLSError, match="rank 0: peer rank 1 sent a malformed block for iteration 7 of channel ids"):
        _self_sized_exchange(lambda block: block.pop())  # a byte short
    # Rank 1's block to rank 0: header (batch 3, 6 lengths, 6 values), lengths 2 0 1 1 2 0, values.
    with pytest.raises(BLSError, match="peer rank 1 .*lengths add up to 7 .* it sent 6 values"):
        _self_sized_exchange(lambda block: block.__setitem__(slice(24, 32), struct.pack("<q", 3)))
