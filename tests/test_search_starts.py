"""The search's starts: each table's least-work option wins when tables are many per rank, and a
start far behind the best gets no local search."""

from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import Topology

from fastplan import FastShardingPlanner
from fastplan.models import ebc, scale_tables
from fastplan.planner.assignment import rank_loads
from fastplan.planner.search import search


def space_and_cap(tables, world):
    planner = FastShardingPlanner(topology=Topology(world_size=world, local_world_size=8, compute_device="cuda"))
    module, sharders = ebc(scale_tables(tables)), [EmbeddingBagCollectionSharder()]
    return planner._enumerator.search_space(module, sharders), planner._reserve(module, sharders)


def test_the_least_work_start_wins_with_many_tables_per_rank():
    space, cap = space_and_cap(3000, 64)
    result = search(space, cap[:, 0], cap[:, 1], ssd_cap=cap[:, 2])
    makespan = {name: rank_loads(space, a).max() for name, a in result.candidates.items()}
    assert result.stats["start"] == "least-work"
    assert makespan["least-work"] < min(makespan["greedy"], makespan["torchrec"])


def test_a_start_far_behind_the_best_gets_no_local_search():
    space, cap = space_and_cap(300, 256)  # few tables per rank: the least-work start stacks whole tables
    result = search(space, cap[:, 0], cap[:, 1], ssd_cap=cap[:, 2])
    starts = result.stats["starts"]
    far = [name for name, m in starts.items() if m > 1.25 * min(starts.values())]
    assert far, starts
    assert not set(far) & set(result.candidates)
