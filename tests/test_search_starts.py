"""The search's starts: each table's least-work option wins when tables are many per rank; memory
too small for those options gets options priced by memory; a start far behind the best gets no local
search, and the perf greedy gives up once sure to be that far behind; a table that fits nowhere is
found exactly."""

import numpy as np
import torch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import Topology
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from fastplan import FastShardingPlanner
from fastplan.models import ebc, scale_tables
from fastplan.planner.assignment import rank_loads
from fastplan.planner.search import search


def space_and_cap(tables, world, module=None):
    planner = FastShardingPlanner(topology=Topology(world_size=world, local_world_size=min(8, world), compute_device="cuda"))
    module, sharders = module or ebc(scale_tables(tables)), [EmbeddingBagCollectionSharder()]
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


def test_a_table_is_called_unplaceable_exactly_when_no_option_fits_on_empty_ranks():
    from fastplan.planner.candidates import Candidates
    from fastplan.planner.placement import RankState, capacity
    from fastplan.planner.search import _unplaceable

    rng = np.random.default_rng(0)
    wide = [EmbeddingBagConfig(name="wide", feature_names=["f"], embedding_dim=2048, num_embeddings=200_000)]
    wide = EmbeddingBagCollection(tables=wide, device=torch.device("meta"))  # 16 column-wise shards on 2 ranks
    for space, reserved in (space_and_cap(40, 16), space_and_cap(1, 2, wide)):
        cands = Candidates(space)
        verdicts = set()
        for _ in range(40):  # per-rank capacities from far too small to ample, different on every rank
            scale = rng.choice([1e-4, 1e-3, 1e-2, 0.1, 1.0]) * rng.uniform(0.2, 1.0, size=(len(reserved), 1))
            cap = capacity(*(reserved * scale).astype(np.int64).T)
            empty = RankState(space, cap)
            expected = next((t for t, opts in enumerate(cands.by_table)
                             if all(empty.place(o) is None for o in opts.tolist())), None)
            assert _unplaceable(space, cands, cap) == expected
            verdicts.add(expected is None)
        assert verdicts == {True, False}


def test_memory_too_small_for_least_work_options_gets_priced_options_that_pack():
    from fastplan.planner.assignment import rank_memory
    from fastplan.planner.candidates import Candidates
    from fastplan.planner.greedy import least_work_greedy, memory_greedy, priced_greedy
    from fastplan.planner.placement import capacity

    module, sharders = ebc(scale_tables(300)), [EmbeddingBagCollectionSharder()]
    tight = FastShardingPlanner(topology=Topology(world_size=16, local_world_size=8, compute_device="cuda", hbm_cap=1 << 30))
    space, cap = tight._enumerator.search_space(module, sharders), capacity(*tight._reserve(module, sharders).T)
    cands = Candidates(space)
    least_work_bytes = sum(space.opt_mem[o[0]] for o in cands.by_table)
    assert least_work_bytes[0] > cap[:, 0].sum()  # hbm cannot hold every table's least-work option
    assert least_work_greedy(space, cands, cap) is None
    priced = priced_greedy(space, cands, cap)
    assert priced is not None and (rank_memory(space, priced) <= cap).all()
    assert rank_loads(space, priced).max() < 0.05 * rank_loads(space, memory_greedy(space, cands, cap)).max()
    space, cap = space_and_cap(300, 16)  # ample memory: the least-work start is used as it is
    assert priced_greedy(space, Candidates(space), capacity(*cap.T)) is None


def test_the_perf_greedy_gives_up_only_once_sure_to_end_above_its_limit():
    from fastplan.planner.candidates import Candidates
    from fastplan.planner.greedy import perf_greedy
    from fastplan.planner.placement import capacity

    space, cap = space_and_cap(2000, 64)
    cands, cap = Candidates(space), capacity(*cap.T)
    full = perf_greedy(space, cands, cap)
    makespan = rank_loads(space, full).max()
    at_limit = perf_greedy(space, cands, cap, give_up_above=makespan)
    assert at_limit is not None and (at_limit.option == full.option).all()
    assert perf_greedy(space, cands, cap, give_up_above=0.99 * makespan) is None
