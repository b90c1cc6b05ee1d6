"""collective_plan: no rank waits in a collective while planning; mismatched ranks fail clearly."""

import re

from tests.multiproc import run_ranks


def _slow_rank_plan(rank, world):
    import time

    import torch.distributed as dist
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner.types import Topology

    from fastplan import FastShardingPlanner
    from fastplan.cache.agreement import plan_hash, table_digests
    from fastplan.models import ebc, report_tables

    planner = FastShardingPlanner(topology=Topology(world_size=world, compute_device="cuda"), cache=None, debug=False)
    plan_fn = planner.plan

    def slow_plan(module, sharders):
        if rank == world - 1:
            time.sleep(6)  # longer than the process group's 3 s timeout
        return plan_fn(module, sharders)

    planner.plan = slow_plan
    plan = planner.collective_plan(ebc(report_tables(40)), [EmbeddingBagCollectionSharder()])
    dist.barrier()  # the group still works afterwards
    return plan_hash(table_digests(plan))


def test_planning_slower_than_the_pg_timeout_still_succeeds():
    results = run_ranks(_slow_rank_plan, world=3, timeout_s=120, pg_timeout_s=3)
    assert all(s == "ok" for s, _ in results.values()), results
    assert len({v for _, v in results.values()}) == 1


def _mismatched_plan(rank, world):
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner.types import ParameterConstraints, Topology

    from fastplan import FastShardingPlanner
    from fastplan.models import ebc, report_tables

    constraints = {"table_3": ParameterConstraints(sharding_types=["row_wise"])} if rank == 1 else None
    planner = FastShardingPlanner(
        topology=Topology(world_size=world, compute_device="cuda"), constraints=constraints, cache=None, debug=False
    )
    planner.collective_plan(ebc(report_tables(20)), [EmbeddingBagCollectionSharder()])
    return "no error"


def test_ranks_with_different_inputs_get_an_error_naming_ranks_and_table():
    results = run_ranks(_mismatched_plan, world=2, timeout_s=120, pg_timeout_s=30)
    for rank, (status, text) in results.items():
        assert status == "error" and "PlanMismatchError" in text, text
        assert "ranks [0]" in text and "ranks [1]" in text
        assert re.search(r"First differing table between rank \d and rank \d: 'table_\d+'", text), text
