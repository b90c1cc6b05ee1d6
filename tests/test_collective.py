"""collective_plan: no rank waits in a collective while planning; a missing rank, a dead store host, a
failed rank or different inputs make every rank raise an error naming them, by one shared deadline."""

import re

from tests.multiproc import run_ranks


def _planner(world, **kwargs):
    from torchrec.distributed.planner.types import Topology

    from fastplan import FastShardingPlanner

    return FastShardingPlanner(topology=Topology(world_size=world, compute_device="cuda"), cache=None, debug=False, **kwargs)


def _collective(planner, n=20, **kwargs):
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    from fastplan.models import ebc, report_tables

    return planner.collective_plan(ebc(report_tables(n)), [EmbeddingBagCollectionSharder()], **kwargs)


def _outcome(fn):
    """(error type, message, wall time when it ended)."""
    import time

    try:
        fn()
        return ("ok", "", time.time())
    except Exception as e:  # noqa: BLE001
        return (type(e).__name__, str(e), time.time())


def _slow_rank_plan(rank, world):
    import time

    import torch.distributed as dist

    from fastplan.planfile import table_digests

    planner = _planner(world)
    plan_fn = planner.plan

    def slow_plan(module, sharders):
        if rank == world - 1:
            time.sleep(6)  # longer than the process group's 3 s timeout
        return plan_fn(module, sharders)

    planner.plan = slow_plan
    plan = _collective(planner, n=40)
    dist.barrier()  # the group still works afterwards
    return table_digests(plan)


def test_planning_slower_than_the_pg_timeout_still_succeeds():
    results = run_ranks(_slow_rank_plan, world=3, timeout_s=120, pg_timeout_s=3)
    assert all(s == "ok" for s, _ in results.values()), results
    assert results[0][1] == results[1][1] == results[2][1]


def _mismatches(rank, world):
    from torchrec.distributed.planner.types import ParameterConstraints

    constrained = {"table_3": ParameterConstraints(sharding_types=["row_wise"])} if rank == 1 else None
    return [
        _outcome(lambda: _collective(_planner(world), n=21 if rank == 1 else 20)),
        _outcome(lambda: _collective(_planner(world, constraints=constrained))),
        _outcome(lambda: _collective(_planner(world, batch_size=64 if rank == 1 else None))),
    ]


def test_mismatched_ranks_name_the_table_whose_inputs_differ():
    results = run_ranks(_mismatches, world=2, timeout_s=120)
    assert all(s == "ok" for s, _ in results.values()), results
    for rank, (_, (extra_table, constraint, batch)) in results.items():
        for kind, text, _ in (extra_table, constraint, batch):
            assert kind == "PlanMismatchError", text
            assert "ranks disagree" in text and "rank 0 has plan" in text and "rank 1 has plan" in text
        assert "1 table(s) only on rank 1: ['table_20']" in extra_table[1]
        assert "first table whose inputs differ: 'table_3' (1 differ)" in constraint[1]
        assert "shared inputs differ: batch_size" in batch[1]
    assert results[0][1][1][1].split(": ", 1)[1] == results[1][1][1][1].split(": ", 1)[1]  # same diagnosis


def _dead_rank(rank, world):
    import os
    import time

    if rank == 2:
        os._exit(1)  # dies without publishing
    if rank == 1:
        time.sleep(2)  # arrives late: its deadline is still the shared one
    return _outcome(lambda: _collective(_planner(world), timeout=4))


def test_a_dead_rank_is_named_on_every_other_rank_by_the_shared_deadline():
    results = run_ranks(_dead_rank, world=3, timeout_s=120)
    assert results[2] == ("exited", 1)
    ends = []
    for rank in (0, 1):
        status, (kind, text, end) = results[rank]
        assert kind == "PlanAgreementTimeout" and "rank 2 published no plan" in text, text
        ends.append(end)
    assert abs(ends[0] - ends[1]) < 1.0  # one deadline, though rank 1 arrived 2 s later


def _dead_store_host(rank, world):
    import os
    import time

    planner = _planner(world)
    if rank == 0:
        planner.plan = lambda module, sharders: os._exit(1)  # the store's host dies while planning
    start = time.time()
    kind, text, end = _outcome(lambda: _collective(planner, timeout=60))
    return kind, text, end - start


def test_a_dead_store_host_is_named_on_every_other_rank():
    results = run_ranks(_dead_store_host, world=3, timeout_s=120)
    assert results[0] == ("exited", 1)
    for rank in (1, 2):
        status, (kind, text, seconds) = results[rank]
        assert kind == "PlanAgreementError" and "hosted by global rank 0, is unreachable" in text, text
        assert seconds < 30  # long before the 60 s agreement deadline


def _failing_rank(rank, world):
    from torchrec.distributed.planner.types import ParameterConstraints

    constraints = {"table_1": ParameterConstraints(sharding_types=["no_such_type"])} if rank == 1 else None
    return _outcome(lambda: _collective(_planner(world, constraints=constraints), timeout=60))


def test_a_rank_that_fails_to_plan_is_named_at_once():
    results = run_ranks(_failing_rank, world=2, timeout_s=120)
    kind, text, _ = results[0][1]
    assert kind == "PlanAgreementError" and re.search(r"rank 1 failed to plan; rank 1: ConstraintError: .*no_such_type", text), text
    assert results[1][1][0] == "ConstraintError"
