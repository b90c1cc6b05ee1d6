"""The LP bound is a lower bound (never above the optimum brute force finds on small problems), never
below the cheap bound, and each of its constraint families matters on a problem built to need it."""

import itertools
import random
from types import SimpleNamespace

import numpy as np
import pytest

from fastplan.planner.bound import CHEAP, LP, plan_bound
from fastplan.planner.cost import CW, RW, TW, TWCW, TWRW
from fastplan.planner.search_space import from_shards

GB = 1 << 30


def make_space(world, host, tables):
    """`tables`: per table a list of options (sharding type, [(perf, hbm bytes) per shard])."""
    rows = [(t, st, shards) for t, opts in enumerate(tables) for st, shards in opts]
    counts = np.array([len(s) for _, _, s in rows])
    perf = np.zeros((counts.sum(), 6))
    perf[:, 0] = [p for _, _, s in rows for p, _ in s]
    mem = np.zeros((counts.sum(), 3), np.int64)
    mem[:, 0] = [m for _, _, s in rows for _, m in s]
    return from_shards(
        tables=[SimpleNamespace(name=f"t{i}") for i in range(len(tables))], world_size=world, local_world_size=host,
        host_size=host, opt_table=np.array([t for t, _, _ in rows]), opt_type=np.array([st for _, st, _ in rows], object),
        opt_kernel=np.array(["fused"] * len(rows), object), opt_count=counts,
        shard_perf=perf, shard_mem=mem, shard_size=np.ones((counts.sum(), 2), np.int64),
        shard_offset=np.zeros((counts.sum(), 2), np.int64),
    )


def cap_of(hbm):
    return np.column_stack([np.array(hbm, np.int64), np.zeros((len(hbm), 2), np.int64)])


def layouts(space, o):
    """Every rank tuple TorchRec's partitioner could give option o's shards."""
    n, W, G = int(space.opt_count[o]), space.world_size, space.host_size
    st = space.opt_type[o]
    if st == RW:
        return [tuple(range(n))]
    if st in (TW, CW):
        return list(itertools.product(range(W), repeat=n))
    hosts = [range(h * G, h * G + G) for h in range(W // G)]
    if st == TWRW:
        return [tuple(h) for h in hosts]
    return [r for h in hosts for r in itertools.product(h, repeat=n)]  # TWCW


def every_choice(space):
    """Per table, every (shard perf, shard bytes, ranks) it could take."""
    perf, mem = space.shard_perf[:, 0], space.shard_mem
    per_table = [[] for _ in space.tables]
    for o, t in enumerate(space.opt_table.tolist()):
        sl = space.shards(o)
        per_table[t] += [(perf[sl], mem[sl], np.array(r)) for r in layouts(space, o)]
    return per_table


def brute_force(space, cap):
    """The optimum max-rank perf over every option and layout (inf when nothing fits)."""
    per_table = every_choice(space)
    best = np.inf
    for choice in itertools.product(*per_table):
        loads, used = np.zeros(space.world_size), np.zeros_like(cap)
        for p, m, r in choice:
            np.add.at(loads, r, p)
            np.add.at(used, r, m)
        if (used <= cap).all():
            best = min(best, loads.max())
    return best


def random_problem(rng):
    world = rng.choice([2, 3, 4])
    host = rng.choice([h for h in (1, 2, 3) if h <= world])
    tables = []
    for _ in range(rng.choice([1, 2, 3])):
        work, size = rng.uniform(0.2, 3), rng.randint(1, 6) * GB
        opts = [(TW, [(work, size)])]
        if rng.random() < 0.7:
            k = rng.choice([2, 3])
            opts.append((CW, [(work * rng.uniform(1, 1.5) / k, size // k)] * k))
        if rng.random() < 0.7:  # row-wise: cheaper per rank, more in all; the last shard may be smaller
            opts.append((RW, [(work * rng.uniform(0.3, 1) / world, -(-size // world))] * (world - 1)
                         + [(work * rng.uniform(0.1, 0.5) / world, size // (2 * world))]))
        if rng.random() < 0.4 and world // host:
            opts.append((TWRW, [(work * rng.uniform(0.8, 1.2) / host, -(-size // host))] * host))
        if rng.random() < 0.3 and world // host:
            opts.append((TWCW, [(work / 2, size // 2)] * 2))
        tables.append(opts)
    hbm = [rng.randint(4, 12) * GB for _ in range(world)] if rng.random() < 0.5 else [rng.randint(4, 12) * GB] * world
    return make_space(world, host, tables), cap_of(hbm)


def test_lp_bound_lies_between_the_cheap_bound_and_the_optimum_on_random_small_problems():
    rng = random.Random(13)
    solved = tighter = raised = 0
    while solved < 100:
        space, cap = random_problem(rng)
        if np.prod([len(c) for c in every_choice(space)]) > 1500:
            continue  # keep brute force fast
        optimum = brute_force(space, cap)
        bound = plan_bound(space, cap, time_limit_s=10)
        if not np.isfinite(optimum):
            continue
        assert bound.kind == LP, bound.status
        assert bound.lp >= bound.cheap * (1 - 1e-9), (bound, optimum)
        assert bound.value <= optimum * (1 + 1e-9), (bound, optimum)
        solved += 1
        tighter += bound.lp > bound.cheap * (1 + 1e-6)
        raised += bound.value > bound.lp * (1 + 1e-6)
    assert tighter >= 20, tighter  # the problems exercise the LP, not just the cheap bound
    assert raised >= 20, raised  # and the shard limits, not just the plain LP


def test_memory_that_rules_out_the_fast_option_raises_the_bound_to_the_optimum():
    # The table-wise option is faster but fits on no rank; row-wise (0.6 on each rank) is the only plan.
    table = [(TW, [(1.0, 6 * GB)]), (RW, [(0.6, 2 * GB), (0.6, 2 * GB)])]
    space = make_space(2, 2, [table, table])
    cap = cap_of([5 * GB, 5 * GB])
    bound = plan_bound(space, cap, time_limit_s=10)
    assert bound.cheap == pytest.approx(1.0) and bound.value == pytest.approx(1.2, rel=1e-5)
    assert brute_force(space, cap) == pytest.approx(1.2)


def test_two_tables_that_fit_only_together_on_the_big_ranks_count_against_their_capacity():
    # Two table-wise tables of 5 GB: each fits alone on a 6 GB rank but the two 6 GB ranks' capacity
    # (12 GB) allows just two; the third must go row-wise (1.0 on each of 4 ranks).
    tw = [(TW, [(1.0, 5 * GB)]), (RW, [(1.0, GB)] * 4)]
    space = make_space(4, 4, [tw, tw, tw])
    cap = cap_of([6 * GB, 6 * GB, 2 * GB, 2 * GB])
    bound = plan_bound(space, cap, time_limit_s=10)
    assert bound.cheap == pytest.approx(1.0)
    assert bound.value == pytest.approx(2.0, rel=1e-5) == brute_force(space, cap)  # without memory rows: 1.5


def test_a_large_shard_stacks_on_the_row_wise_load_every_rank_carries():
    # Table 0 must go row-wise (0.5 on every rank); table 1's single 1.0 shard lands on top of it.
    space = make_space(4, 4, [[(RW, [(0.5, GB)] * 4)], [(TW, [(1.0, GB)])]])
    cap = cap_of([8 * GB] * 4)
    bound = plan_bound(space, cap, time_limit_s=10)
    assert bound.cheap == pytest.approx(1.0)
    assert bound.value == pytest.approx(1.5, rel=1e-5) == brute_force(space, cap)


def test_shard_limits_raise_the_bound_where_the_lp_takes_a_too_large_shard_in_part():
    # Table 1's single 0.66 shard cannot sit beside table 0's row-wise load on any rank under the
    # optimum, but the plain LP takes it in part. Ranks of 6, 4 and 7 GB; hosts of one rank.
    t0 = [(TW, [(2.3, 6 * GB)]), (RW, [(0.45, 2 * GB), (0.45, 2 * GB), (0.28, GB)])]
    t1 = [(TW, [(0.66, 3 * GB)]), (RW, [(0.1, GB), (0.1, GB), (0.1, GB // 2)]),
          (TWCW, [(0.33, 3 * GB // 2)] * 2)]
    space = make_space(3, 1, [t0, t1])
    cap = cap_of([6 * GB, 4 * GB, 7 * GB])
    bound = plan_bound(space, cap, time_limit_s=10)
    optimum = brute_force(space, cap)
    assert bound.lp < optimum * (1 - 0.02)
    assert bound.lp * (1 + 0.02) < bound.value <= optimum * (1 + 1e-9)


def test_the_cheap_bound_is_printed_when_the_lp_has_no_time():
    space = make_space(2, 2, [[(TW, [(1.0, GB)])]])
    bound = plan_bound(space, cap_of([8 * GB] * 2), time_limit_s=0)
    assert bound.kind == CHEAP and bound.lp is None and "skipped" in bound.status
