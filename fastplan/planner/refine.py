"""CP-SAT refinement of a complete assignment, one batch of tables at a time.

Tables outside the batch stay where they are; their per-rank load and memory are the batch
model's constants, so batches carry rank loads forward and the model size stays bounded.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
from ortools.sat.python import cp_model

from fastplan.planner.search import Assignment, SearchConfig, _Candidates, rank_loads, rank_memory
from fastplan.planner.search_space import HOST, UNIFORM, SearchSpace

# Ranks a single-shard table may move to in one batch: its own plus the least loaded ones.
_MOVE_TARGETS = 16
_SCALE = 1_000_000  # integer perf units per greedy makespan


def _columns(space: SearchSpace, cands: _Candidates, t: int, current: Tuple[int, Tuple[int, ...]], targets: np.ndarray):
    """(option, ranks) placements CP-SAT may choose for table t."""
    W = space.world_size
    cols: List[Tuple[int, Tuple[int, ...]]] = [current]
    for o in cands.by_table[t]:
        n = int(space.opt_count[o])
        kind = int(cands.placement[o])
        if n == 1:
            cols.extend((o, (int(r),)) for r in targets)
        elif kind == UNIFORM:
            cols.append((o, tuple(range(n))))
        elif kind == HOST:
            cols.extend((o, tuple(range(g, g + n))) for g in range(0, W - n + 1, n))
        else:  # column-wise with several shards: consecutive ranks starting at each target
            cols.extend((o, tuple(int((r + i) % W) for i in range(n))) for r in targets)
    seen, unique = set(), []
    for c in cols:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


def _usage(space: SearchSpace, values: np.ndarray, o: int, ranks: Tuple[int, ...]) -> Dict[int, int]:
    out: Dict[int, int] = {}
    for r, v in zip(ranks, values[space.shards(o)].tolist()):
        out[r] = out.get(r, 0) + int(v)
    return out


def refine(
    space: SearchSpace,
    cands: _Candidates,
    a: Assignment,
    hbm_cap: np.ndarray,
    ddr_cap: np.ndarray,
    lower_bound: float,
    config: SearchConfig,
    wall_time_limit: Optional[float] = None,
) -> Tuple[Assignment, np.ndarray, Dict[str, float]]:
    W = space.world_size
    perf = cands.perf
    option = a.option.copy()
    ranks = list(a.ranks)
    loads = rank_loads(space, perf, a)
    chosen_work = cands.work[option]
    order = np.argsort(-chosen_work, kind="stable")
    nb = max(1, -(-len(order) // config.batch_size))
    batches = np.array_split(order, nb)
    budget = config.deterministic_time / nb
    stats = {"batches": 0, "improved_batches": 0, "cp_sat_bound": 0.0}

    hbm_used, ddr_used = rank_memory(space, a)

    for batch in batches:
        makespan = float(loads.max())
        if makespan <= 0 or (makespan - lower_bound) / makespan <= config.target_gap:
            break
        scale = _SCALE / makespan
        base = loads.copy()
        hbm_free = hbm_cap.astype(np.int64) - hbm_used
        ddr_free = ddr_cap.astype(np.int64) - ddr_used
        for t in batch.tolist():
            sl = space.shards(int(option[t]))
            np.subtract.at(base, ranks[t], perf[sl])
            np.add.at(hbm_free, ranks[t], space.shard_hbm[sl])
            np.add.at(ddr_free, ranks[t], space.shard_ddr[sl])
        targets = np.argsort(base, kind="stable")[: min(W, _MOVE_TARGETS)]

        model = cp_model.CpModel()
        load_terms: List[List[Tuple[cp_model.IntVar, int]]] = [[] for _ in range(W)]
        hbm_terms: List[List[Tuple[cp_model.IntVar, int]]] = [[] for _ in range(W)]
        ddr_terms: List[List[Tuple[cp_model.IntVar, int]]] = [[] for _ in range(W)]
        chosen: List[List[Tuple[cp_model.IntVar, int, Tuple[int, ...]]]] = []
        for t in batch.tolist():
            current = (int(option[t]), tuple(int(r) for r in ranks[t]))
            per_table = []
            for o, rs in _columns(space, cands, t, current, targets):
                h = _usage(space, space.shard_hbm, o, rs)
                d = _usage(space, space.shard_ddr, o, rs)
                if any(v > hbm_free[r] for r, v in h.items()) or any(v > ddr_free[r] for r, v in d.items()):
                    continue
                x = model.new_bool_var("")
                model.add_hint(x, (o, rs) == current)
                for r, v in zip(rs, perf[space.shards(o)].tolist()):
                    load_terms[r].append((x, int(round(v * scale))))
                for r, v in h.items():
                    if v:
                        hbm_terms[r].append((x, v))
                for r, v in d.items():
                    if v:
                        ddr_terms[r].append((x, v))
                per_table.append((x, o, rs))
            model.add_exactly_one(x for x, _, _ in per_table)
            chosen.append(per_table)
        z = model.new_int_var(0, 2**40, "makespan")
        for r in range(W):
            const = int(round(base[r] * scale))
            model.add(sum(c * x for x, c in load_terms[r]) + const <= z)
            for terms, free in ((hbm_terms[r], hbm_free[r]), (ddr_terms[r], ddr_free[r])):
                if sum(c for _, c in terms) > free:  # only where the batch could overflow this rank
                    model.add(sum(c * x for x, c in terms) <= int(free))
        model.minimize(z)
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 1
        solver.parameters.random_seed = 0
        solver.parameters.max_deterministic_time = budget
        if wall_time_limit is not None:
            solver.parameters.max_time_in_seconds = float(wall_time_limit)
        status = solver.solve(model)
        stats["batches"] += 1
        if nb == 1:
            stats["cp_sat_bound"] = solver.best_objective_bound / scale
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            continue
        new_option, new_ranks = option.copy(), list(ranks)
        for t, per_table in zip(batch.tolist(), chosen):
            for x, o, rs in per_table:
                if solver.boolean_value(x):
                    new_option[t] = o
                    new_ranks[t] = np.array(rs, dtype=np.int64)
        new_loads = rank_loads(space, perf, Assignment(new_option, new_ranks))
        if new_loads.max() < loads.max():
            stats["improved_batches"] += 1
            option, ranks, loads = new_option, new_ranks, new_loads
            hbm_used, ddr_used = rank_memory(space, Assignment(option, ranks))
    return Assignment(option, ranks), loads, stats
