"""Plans from the LP relaxation: best-fit packing under a target makespan, and the search stage that
uses it where greedy and local search stay far from the bound (many hosts, large single shards)."""

import numpy as np
import pytest
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import Topology

from fastplan import FastShardingPlanner
from fastplan.models import ebc, scale_tables
from fastplan.planner.assignment import rank_loads, rank_memory
from fastplan.planner.bound import PlacementLP, plan_bound
from fastplan.planner.candidates import Candidates
from fastplan.planner.packing import lp_choice, pack, packing_order
from fastplan.planner.search import SearchConfig, search


@pytest.fixture(scope="module")
def problem():
    """100 tables of issue 13's kind on 128 ranks in hosts of 8."""
    planner = FastShardingPlanner(topology=Topology(world_size=128, local_world_size=8, compute_device="cuda"))
    module, sharders = ebc(scale_tables(100)), [EmbeddingBagCollectionSharder()]
    space = planner._enumerator.search_space(module, sharders)
    return space, planner._reserve(module, sharders)


def test_the_lp_guided_plan_beats_greedy_and_local_search_on_many_hosts(problem):
    space, cap = problem
    guided = search(space, cap[:, 0], cap[:, 1], ssd_cap=cap[:, 2])
    without = search(space, cap[:, 0], cap[:, 1], SearchConfig(lp_deterministic_time=0), ssd_cap=cap[:, 2])
    assert guided.stats["start"] == "lp"
    assert guided.makespan < without.makespan * (1 - 0.01)
    bound = plan_bound(space, cap, 30, guided.makespan, lp=guided.lp)
    assert bound.value <= guided.makespan
    assert (rank_memory(space, guided.assignment) <= cap).all()


def test_the_lp_guided_plan_is_the_same_in_every_run(problem):
    space, cap = problem
    first, second = (search(space, cap[:, 0], cap[:, 1], ssd_cap=cap[:, 2]) for _ in range(2))
    assert first.assignment.option.tolist() == second.assignment.option.tolist()
    assert [r.tolist() for r in first.assignment.ranks] == [r.tolist() for r in second.assignment.ranks]


def test_a_packing_keeps_every_rank_under_its_target_and_gives_up_below_the_lp(problem):
    space, cap = problem
    cands = Candidates(space)
    model = PlacementLP(space, cands, cap)
    solution = model.solve()
    choice = lp_choice(space, model.opts, solution.x)
    order = packing_order(space, cands, choice)
    target = 1.2 * solution.value
    packed = pack(space, cands, cap, choice, order, target)
    assert packed is not None
    assert rank_loads(space, packed).max() <= target
    assert (rank_memory(space, packed) <= cap).all()
    assert (packed.option == choice).mean() > 0.5  # mostly the LP's choice
    assert pack(space, cands, cap, choice, order, 0.99 * solution.value) is None
