"""Choose one option and ranks per table, minimising the largest per-rank sum of shard
`Perf.total` (TorchRec's `NoopPerfModel`) within every rank's memory.

Stages, each deterministic (stable orderings, lowest-index ties, CP-SAT on one worker under a
deterministic-time limit), so every rank computes the same plan:
1. starts: the perf-driven greedy, TorchRec's own default search replayed on the vectorized
   model (so the result is never worse than TorchRec's), each table's least-work option, and, when
   those cannot all fit, options priced by work and memory; if none fits, memory-first packing;
   if that fails too, the exact CP-SAT model — which either finds a plan or proves none exists;
2. local search from every start not far behind the best start; the best result is kept;
3. when the best is still far from the cheap bound: the LP relaxation's option choice, packed best-fit
   (`packing`) and improved by local search, replaces it if better (GLOP under a deterministic limit);
4. CP-SAT refinement in batches of tables, for problems of at most `max_cells` tables x ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

import numpy as np

from fastplan.planner.assignment import Assignment, rank_loads, rank_memory
from fastplan.planner.bound import MIN_GAP, LPSolution, PlacementLP
from fastplan.planner.candidates import Candidates
from fastplan.planner.errors import infeasible_error
from fastplan.planner.greedy import least_work_greedy, memory_greedy, perf_greedy, priced_greedy
from fastplan.planner.local_search import local_search
from fastplan.planner.placement import RankState, capacity
from fastplan.planner.search_space import DEVICE, UNIFORM, SearchSpace

__all__ = ["Assignment", "SearchConfig", "SearchResult", "rank_loads", "rank_memory", "search"]


@dataclass
class SearchConfig:
    """Work budgets. All are deterministic (counts and CP-SAT deterministic time), so the plan
    depends on the inputs only; `scaled_to` shrinks them to fit a wall-clock timeout."""

    batch_size: int = 400  # tables per CP-SAT refinement model
    deterministic_time: float = 0.3  # CP-SAT refinement, whole plan, at most (0: skip)
    time_per_cell: float = 5e-5  # refinement budget per table x rank, so small problems finish fast
    target_gap: float = 1e-4  # skip refinement once this close to the lower bound
    max_cells: int = 1_000  # refine with CP-SAT only when tables x ranks is at most this
    replay_budget: int = 20_000  # shard placements for replaying TorchRec's proposals (0: skip)
    exact_time: float = 5.0  # CP-SAT budget to find or rule out a plan when heuristics fail
    max_exact_vars: int = 400_000  # larger exact models are not attempted
    local_search_steps: int = 20_000
    lp_deterministic_time: float = 2.0  # GLOP budget for the LP-guided plan (0: skip)
    max_lp_options: int = 40_000  # larger LPs are not solved while planning
    pack_steps: int = 8  # bisection steps of the LP-guided packing's target makespan
    loose_packing: float = 4.0  # when nothing packs below the incumbent, targets up to this multiple of it
    start_slack: float = 0.25  # starts this far above the best start get no local search

    def scaled_to(self, timeout_s: Optional[float]) -> "SearchConfig":
        """Budgets that fit in `timeout_s` on a slow machine (about 1 deterministic unit and
        100k shard placements per second, with room to spare)."""
        if not timeout_s:
            return self
        return replace(
            self,
            deterministic_time=min(self.deterministic_time, 0.1 * timeout_s),
            exact_time=min(self.exact_time, 0.3 * timeout_s),
            lp_deterministic_time=min(self.lp_deterministic_time, 0.2 * timeout_s),
            replay_budget=min(self.replay_budget, int(20_000 * timeout_s)),
        )


@dataclass
class SearchResult:
    assignment: Assignment
    loads: np.ndarray  # per-rank summed Perf.total
    greedy_makespan: float  # the best start before local search (inf if only the exact model found one)
    lower_bound: float
    stats: Dict[str, object] = field(default_factory=dict)
    candidates: Dict[str, Assignment] = field(default_factory=dict)  # each start after local search
    lp: Optional[Tuple[PlacementLP, LPSolution]] = None  # the relaxation solved on the way, for the bound
    cands: Optional[Candidates] = None  # the options searched, for the bound

    @property
    def makespan(self) -> float:
        return float(self.loads.max()) if len(self.loads) else 0.0

    @property
    def gap(self) -> float:
        """Relative distance to the lower bound (0 means proven optimal)."""
        m = self.makespan
        return 0.0 if m <= 0 else max(0.0, (m - self.lower_bound) / m)


def lower_bound(cands: Candidates, world_size: int) -> float:
    """Memory ignored: the least total work spread evenly, and never below the largest
    unavoidable single shard."""
    if not cands.by_table:
        return 0.0
    min_shard = np.array([cands.max_shard[o].min() for o in cands.by_table])
    return float(max(cands.min_work.sum() / world_size, min_shard.max()))


def _unplaceable(space: SearchSpace, cands: Candidates, cap: np.ndarray) -> Optional[int]:
    """A table none of whose options fits even on empty ranks (then no plan exists)."""
    opts = np.concatenate(cands.by_table)
    # Surely placeable: every shard fits the smallest rank, each on a rank (or host rank) of its own.
    kind, count = space.opt_placement[opts], space.opt_count[opts]
    room = np.where(kind == DEVICE, space.world_size, np.where(kind == UNIFORM, count, space.host_size * (space.num_hosts > 0)))
    sure = (space.opt_max_mem[opts] <= cap.min(0)).all(1) & (count <= room)
    settled = np.zeros(len(space.tables), dtype=bool)
    settled[space.opt_table[opts[sure]]] = True
    empty = RankState(space, cap)
    for t in np.flatnonzero(~settled).tolist():
        if not any(empty.place(o) is not None for o in cands.by_table[t].tolist()):
            return t
    return None


def search(space: SearchSpace, hbm_cap: np.ndarray, ddr_cap: np.ndarray, config: Optional[SearchConfig] = None,
           deadline: Optional[float] = None, ssd_cap: Optional[np.ndarray] = None) -> SearchResult:
    """Per-rank memory left for embeddings: `hbm_cap`, `ddr_cap`, `ssd_cap` (bytes; no SSD tier if
    None). `deadline` (time.monotonic()) skips optional stages once passed: the plan then comes
    from the stages that ran, which makes it depend on machine speed — budgets from
    `SearchConfig.scaled_to` keep that from happening in practice."""
    from fastplan.planner.torchrec_search import replay

    config = config or SearchConfig()
    cap = capacity(hbm_cap, ddr_cap, ssd_cap)
    cands = Candidates(space)
    W = space.world_size
    if not space.tables:
        return SearchResult(Assignment(np.zeros(0, np.int64), []), np.zeros(W), 0.0, 0.0)
    lb = lower_bound(cands, W)
    t = _unplaceable(space, cands, cap)
    if t is not None:
        raise infeasible_error(space, cands, cap, f"proven: table '{space.tables[t].name}' fits on no rank even alone")
    in_time = lambda: deadline is None or time.monotonic() < deadline  # noqa: E731
    t0 = time.perf_counter()
    stats: Dict[str, object] = {}
    starts: Dict[str, Optional[Assignment]] = dict.fromkeys(("greedy", "torchrec", "least-work", "priced"))  # ties: first wins
    starts["least-work"] = least_work_greedy(space, cands, cap)
    starts["priced"] = priced_greedy(space, cands, cap)
    if config.replay_budget and in_time():
        r = replay(space, cap, config.replay_budget)
        stats["torchrec_replay"] = {"proposals": r.proposals, "complete": r.complete, "makespan": r.makespan} if r else None
        if r is not None:
            starts["torchrec"] = Assignment(r.option, r.ranks)
    # Run last, it gives up once sure to end too far behind another start to get local search.
    known = [float(rank_loads(space, a).max()) for a in starts.values() if a is not None]
    starts["greedy"] = perf_greedy(space, cands, cap, (1 + config.start_slack) * min(known, default=np.inf))
    starts = {name: a for name, a in starts.items() if a is not None}
    if not starts:
        packed = memory_greedy(space, cands, cap)
        if packed is not None:
            starts["memory"] = packed
    if not starts:
        from fastplan.planner.refine import exact, exact_model_size

        size = exact_model_size(space, cands)
        if size > config.max_exact_vars:
            raise infeasible_error(space, cands, cap, (
                f"not proven: greedy, memory-first packing and TorchRec's proposals found no plan, and the exact "
                f"model (~{size} variables) is larger than max_exact_vars={config.max_exact_vars}"
            ))
        status, found = exact(space, cands, cap, config.exact_time, max(lb, 1e-12))
        stats["exact"] = status
        if found is None:
            how = (
                f"proven by the exact placement model ({len(space.tables)} tables x {W} ranks)"
                if status == "infeasible"
                else f"not proven: the exact model ran out of its budget ({config.exact_time} deterministic s) "
                f"after greedy, memory-first packing and TorchRec's proposals found no plan"
            )
            raise infeasible_error(space, cands, cap, how)
        starts["exact"] = found
    start_makespans = {name: float(rank_loads(space, a).max()) for name, a in starts.items()}
    best: Optional[Tuple[float, str, Assignment, np.ndarray]] = None
    candidates: Dict[str, Assignment] = {}
    for name, a in starts.items():
        if best is not None and not in_time():
            break
        if start_makespans[name] > (1 + config.start_slack) * min(start_makespans.values()):
            continue  # far behind another start: local search would not close the distance
        improved, loads = local_search(space, cands, a, cap, config.local_search_steps)
        candidates[name] = improved
        if best is None or float(loads.max()) < best[0]:
            best = (float(loads.max()), name, improved, loads)
    assert best is not None
    _, stats["start"], a, loads = best
    stats["starts"] = start_makespans
    lp = None
    makespan = float(loads.max())
    if config.lp_deterministic_time and makespan - lb > MIN_GAP * makespan and in_time() \
            and sum(map(len, cands.by_table)) <= config.max_lp_options:
        lp, guided = _lp_guided(space, cands, cap, lb, makespan, config)
        stats["lp_guided"] = None if guided is None else float(guided[1].max())
        if guided is not None and float(guided[1].max()) < makespan:
            a, loads = guided
            stats["start"] = "lp"
            makespan = float(loads.max())
    t1 = time.perf_counter()
    stats.update(greedy_s=t1 - t0, refine_s=0.0)
    cells = len(space.tables) * W
    if config.deterministic_time and makespan > 0 and (makespan - lb) / makespan > config.target_gap \
            and cells <= config.max_cells and in_time():
        from fastplan.planner.refine import refine  # OR-Tools loads only when refinement runs

        budget = min(config.deterministic_time, max(0.02, config.time_per_cell * cells))
        a, loads, rstats = refine(space, cands, a, cap, lb, config.batch_size, budget, config.target_gap)
        stats.update(rstats)
        stats["refine_s"] = time.perf_counter() - t1
    return SearchResult(a, loads, min(start_makespans.values()), lb, stats, candidates, lp, cands)


def _lp_guided(space: SearchSpace, cands: Candidates, cap: np.ndarray, lb: float, makespan: float,
               config: SearchConfig):
    """The LP relaxation (model and solution) and, if it solved, the plan packed from its option
    choice under the lowest target that packs (below `makespan`, or else up to `loose_packing` times it),
    after local search: (assignment, loads) or None."""
    from fastplan.planner.packing import lp_choice, pack_below

    model = PlacementLP(space, cands, cap)
    solution = model.solve(deterministic_time=config.lp_deterministic_time)
    if solution.value is None:
        return None, None
    choice = lp_choice(space, model.opts, solution.x)
    packed = pack_below(space, cands, cap, choice, max(solution.value, lb), makespan, config.pack_steps)
    if packed is None:  # nothing packs below the incumbent: local search may bring a looser packing below it
        packed = pack_below(space, cands, cap, choice, makespan, config.loose_packing * makespan, config.pack_steps)
    if packed is None:
        return (model, solution), None
    return (model, solution), local_search(space, cands, packed, cap, config.local_search_steps)
