"""The exact placement model in CP-SAT: every option of a table and every layout TorchRec's
partitioner could give it (shards on any ranks, or inside one host), per-rank memory, max-rank
perf as the objective.

Used two ways: `refine` improves a complete assignment one batch of tables at a time (the other
tables' loads and memory are constants, so models stay small), and `exact` solves the whole
problem from scratch when no heuristic found a feasible plan, so "infeasible" is a proof.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fastplan.planner.assignment import Assignment, rank_loads, rank_memory
from fastplan.planner.candidates import Candidates
from fastplan.planner.cpsat import INT_MIN, Model
from fastplan.planner.search_space import DEVICE, HOST_DEVICE, HOST_UNIFORM, UNIFORM, SearchSpace

_SCALE = 1_000_000  # integer perf units per current makespan
MAX_TARGET_RANKS = 64  # in refinement, a shard may move only to this many ranks (its own + least loaded)


@dataclass
class _Choice:
    """One (option, layout family) of a table: its literal and how to read the layout back."""

    option: int
    literal: int
    host_literals: Dict[int, int] = field(default_factory=dict)  # host -> literal (host kinds)
    counts: Dict[Tuple[int, int], int] = field(default_factory=dict)  # (group, rank) -> count var
    groups: List[np.ndarray] = field(default_factory=list)  # shard indices of each identical group


class _Builder:
    def __init__(self, space: SearchSpace, perf: np.ndarray, scale: float) -> None:
        self.s = space
        self.perf = perf
        self.scale = scale
        self.m = Model()
        W = space.world_size
        self.load: List[List[Tuple[int, int]]] = [[] for _ in range(W)]
        self.mem: List[List[List[Tuple[int, int]]]] = [[[] for _ in range(W)] for _ in range(3)]  # tier, rank
        self.mem_max = [[0, 0, 0] for _ in range(W)]  # the most each rank's terms can add up to, per tier
        self._perf_int: Dict[int, int] = {}
        self._mem_rows: Dict[int, List[int]] = {}

    def _charge(self, var: int, rank: int, shard: int, upper: int = 1) -> None:
        """`var` (0..upper) copies of `shard` on `rank`."""
        p = self._perf_int.get(shard)
        if p is None:
            p = self._perf_int[shard] = int(round(float(self.perf[shard]) * self.scale))
            self._mem_rows[shard] = self.s.shard_mem[shard].tolist()
        if p:
            self.load[rank].append((var, p))
        bound = self.mem_max[rank]
        for tier, b in enumerate(self._mem_rows[shard]):
            if b:
                self.mem[tier][rank].append((var, b))
                bound[tier] += b * upper

    def table(self, options: Sequence[int], ranks_allowed: np.ndarray, free: np.ndarray) -> List[_Choice]:
        s, m = self.s, self.m
        kinds = s.opt_placement
        G, H = s.host_size, s.num_hosts
        choices = []
        for o in options:
            sl = s.shards(o)
            idx = np.arange(sl.start, sl.stop)
            kind = kinds[o]
            fits = (s.shard_mem[idx][:, None, :] <= free[None, :, :]).all(2)
            if kind == UNIFORM:
                if not fits[np.arange(len(idx)), np.arange(len(idx))].all():
                    continue
                x = m.var(0, 1)
                for i, k in enumerate(idx.tolist()):
                    self._charge(x, i, k)
                choices.append(_Choice(o, x))
                continue
            if kind == HOST_UNIFORM:
                hosts = [h for h in range(H) if fits[np.arange(G), h * G + np.arange(G)].all()]
                if not hosts:
                    continue
                x = m.var(0, 1)
                c = _Choice(o, x)
                for h in hosts:
                    z = m.var(0, 1)
                    c.host_literals[h] = z
                    for i, k in enumerate(idx.tolist()):
                        self._charge(z, h * G + i, k)
                m.linear([x] + list(c.host_literals.values()), [-1] + [1] * len(hosts), 0, 0)
                choices.append(c)
                continue
            groups = _identical_groups(s, self.perf, idx)
            rows = [np.searchsorted(idx, members[0]) for members in groups]
            if kind == DEVICE:
                pools = {-1: ranks_allowed}
            else:
                assert kind == HOST_DEVICE
                pools = {h: np.arange(h * G, h * G + G) for h in range(H)}
            # Where each group of identical shards may go: a layout family is usable only if every
            # group has a rank with room (capacity of several shards is left to the constraints).
            pools = {h: [pool[fits[row, pool]] for row in rows] for h, pool in pools.items()}
            pools = {h: ok for h, ok in pools.items() if all(len(p) for p in ok)}
            if not pools:
                continue
            x = m.var(0, 1)
            c = _Choice(o, x, groups=groups)
            for h, per_group in pools.items():
                gate = x if h == -1 else m.var(0, 1)
                if h != -1:
                    c.host_literals[h] = gate
                for g, (members, pool_ok) in enumerate(zip(groups, per_group)):
                    n = len(members)
                    vars_ = []
                    for r in pool_ok.tolist():
                        v = m.var(0, n)
                        c.counts[(g, r)] = v
                        vars_.append(v)
                        self._charge(v, r, int(members[0]), n)
                    m.linear(vars_ + [gate], [1] * len(vars_) + [-n], 0, 0)
            if c.host_literals:
                m.linear([x] + list(c.host_literals.values()), [-1] + [1] * len(c.host_literals), 0, 0)
            choices.append(c)
        if choices:
            m.exactly_one([c.literal for c in choices])
        return choices

    def finish(self, base: np.ndarray, free: np.ndarray) -> int:
        m = self.m
        z = m.var(0, 2**50)
        for r in range(self.s.world_size):
            terms = self.load[r]
            const = int(round(float(base[r]) * self.scale))
            m.linear([v for v, _ in terms] + [z], [c for _, c in terms] + [-1], INT_MIN, -const)
            for tier in range(3):
                terms = self.mem[tier][r]
                if self.mem_max[r][tier] > free[r, tier]:  # only where the model could overflow the rank
                    m.linear([v for v, _ in terms], [c for _, c in terms], INT_MIN, int(free[r, tier]))
        m.minimize([z], [1])
        return z



def _identical_groups(space: SearchSpace, perf: np.ndarray, idx: np.ndarray) -> List[np.ndarray]:
    """Shards of one option grouped by (perf, memory): identical shards need one count per rank."""
    keys = {}
    for k in idx.tolist():
        keys.setdefault((float(perf[k]), *space.shard_mem[k].tolist()), []).append(k)
    return [np.array(v) for v in keys.values()]


def _decode(space: SearchSpace, choices: List[_Choice], values: List[int]) -> Tuple[int, np.ndarray]:
    kinds = space.opt_placement
    G = space.host_size
    for c in choices:
        if not values[c.literal]:
            continue
        o = c.option
        kind = kinds[o]
        sl = space.shards(o)
        if kind == UNIFORM:
            return o, np.arange(sl.stop - sl.start)
        if kind == HOST_UNIFORM:
            h = next(h for h, z in c.host_literals.items() if values[z])
            return o, np.arange(h * G, h * G + G)
        ranks = np.empty(sl.stop - sl.start, dtype=np.int64)
        for g, members in enumerate(c.groups):
            got = sorted(r for (gg, r), v in c.counts.items() if gg == g for _ in range(values[v]))
            ranks[members - sl.start] = got
        return o, ranks
    raise RuntimeError("CP-SAT solution chose no option for a table (a bug)")


def _hint(model: Model, choices: List[_Choice], option: int, ranks: np.ndarray, space: SearchSpace) -> None:
    G = space.host_size
    variables, values = [], []
    for c in choices:
        chosen = c.option == option
        variables.append(c.literal)
        values.append(int(chosen))
        for h, z in c.host_literals.items():
            variables.append(z)
            values.append(int(chosen and int(ranks[0]) // G == h))
        for (g, r), v in c.counts.items():
            variables.append(v)
            if chosen:
                members = c.groups[g] - space.opt_start[option]
                values.append(int(np.count_nonzero(ranks[members] == r)))
            else:
                values.append(0)
    model.hint(variables, values)


def refine(space: SearchSpace, cands: Candidates, a: Assignment, cap: np.ndarray,
           lower_bound: float, batch_size: int, deterministic_time: float, target_gap: float) -> Tuple[Assignment, np.ndarray, Dict[str, float]]:
    """Re-solve batches of tables (largest work first) exactly, others fixed; keep improvements."""
    W = space.world_size
    perf = space.shard_total
    a = a.copy()
    loads = rank_loads(space, a)
    order = np.argsort(-cands.work[a.option], kind="stable")
    nb = max(1, -(-len(order) // batch_size))
    budget = deterministic_time / nb
    stats = {"batches": 0, "improved_batches": 0, "cp_sat_bound": 0.0, "cp_sat_status": ""}
    used = rank_memory(space, a)
    for batch in np.array_split(order, nb):
        makespan = float(loads.max())
        if makespan <= 0 or (makespan - lower_bound) / makespan <= target_gap:
            break
        base = loads.copy()
        free = cap - used
        for t in batch.tolist():
            sl = space.shards(int(a.option[t]))
            np.subtract.at(base, a.ranks[t], perf[sl])
            np.add.at(free, a.ranks[t], space.shard_mem[sl])
        b = _Builder(space, perf, _SCALE / makespan)
        per_table = []
        for t in batch.tolist():
            current = int(a.option[t])
            options = list(dict.fromkeys(cands.by_table[t].tolist() + [current]))
            targets = np.arange(W)
            if W > MAX_TARGET_RANKS:
                least = np.argsort(base, kind="stable")[:MAX_TARGET_RANKS]
                targets = np.unique(np.concatenate([least, a.ranks[t]]))
            choices = b.table(options, targets, free)
            _hint(b.m, choices, current, a.ranks[t], space)
            per_table.append(choices)
        b.finish(base, free)
        sol = b.m.solve(budget, presolve=False)
        stats["batches"] += 1
        stats["cp_sat_status"] = sol.status
        if nb == 1:
            stats["cp_sat_bound"] = sol.bound / b.scale
        if sol.status not in ("optimal", "feasible"):
            continue
        trial = a.copy()
        for t, choices in zip(batch.tolist(), per_table):
            trial.option[t], trial.ranks[t] = _decode(space, choices, sol.values)
        new_loads = rank_loads(space, trial)
        if new_loads.max() < loads.max():
            stats["improved_batches"] += 1
            a, loads = trial, new_loads
            used = rank_memory(space, a)
    return a, loads, stats


def exact_model_size(space: SearchSpace, cands: Candidates) -> int:
    """About how many variables `exact` would create."""
    kinds = space.opt_placement
    per_kind = {UNIFORM: 1, HOST_UNIFORM: 1 + space.num_hosts, DEVICE: space.world_size, HOST_DEVICE: space.world_size}
    return sum(per_kind[int(kinds[o])] for opts in cands.by_table for o in opts.tolist())


def exact(space: SearchSpace, cands: Candidates, cap: np.ndarray, deterministic_time: float,
          scale_hint: float) -> Tuple[str, Optional[Assignment]]:
    """Solve the whole placement problem from scratch: ("optimal"|"feasible", plan),
    ("infeasible", None) — a proof that nothing fits — or ("unknown", None) when the budget ran out."""
    W = space.world_size
    b = _Builder(space, space.shard_total, _SCALE / max(scale_hint, 1e-300))
    per_table = []
    for t in range(len(space.tables)):
        choices = b.table(cands.by_table[t].tolist(), np.arange(W), cap)
        if not choices:
            return "infeasible", None
        per_table.append(choices)
    b.finish(np.zeros(W), cap)
    sol = b.m.solve(deterministic_time)
    if sol.status not in ("optimal", "feasible"):
        return sol.status, None
    a = Assignment(np.zeros(len(space.tables), dtype=np.int64), [np.zeros(0, np.int64)] * len(space.tables))
    for t, choices in enumerate(per_table):
        a.option[t], a.ranks[t] = _decode(space, choices, sol.values)
    return sol.status, a
