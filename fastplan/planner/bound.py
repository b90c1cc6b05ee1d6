"""Lower bounds on the max-rank perf of any plan: the LP relaxation of the placement problem
(identical ranks aggregated, solved with OR-Tools GLOP) and the cheap bound it falls back to.

The LP, on rank classes c (ranks with the same capacities and the same host membership; n_c ranks):
  x_o in [0, 1]: how much of option o its table takes, sum over a table's options = 1;
  y_gc >= 0: shards of an identical-shard group g (of a non-uniform option) on class c, sum_c y_gc = count_g x_o
    (no y when only one class can hold the group: then all count_g x_o shards are on it);
  load:   sum over ranks of c of uniform shards x_o + sum_g p_g y_gc <= n_c T      (every class c)
  memory: the same sums in bytes <= n_c cap_c, per tier; a shard never goes where it alone does not fit;
  shard:  T >= sum_{o of t} x_o (largest shard of o) + U - (own uniform part of U)  (every table t),
          U = sum over uniform options with a shard on every rank of x_o (smallest shard of o);
  minimise T.
Why it is a lower bound: every plan is a feasible point with T = its makespan (x = the chosen options,
y = its shard counts per class); class sums of rank loads and bytes are at most n_c times the largest
and n_c times the capacity; and the rank holding table t's largest shard also holds one shard of every
other chosen all-rank uniform option. So the LP minimum is at most every plan's makespan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from fastplan.planner.candidates import Candidates
from fastplan.planner.search_space import DEVICE, UNIFORM, SearchSpace

CHEAP, LP = "cheap", "LP"
DEFAULT_TIME_S = 2.0  # LP budget (model building included) when the planner has no timeout
MIN_GAP = 0.005  # a plan this close to the cheap bound needs no better bound
SAFETY = 1e-6  # relative margin under the LP optimum, for the solver's feasibility tolerances
BAND_EDGES = (0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5)  # bands of U, in multiples of the plain LP's U


@dataclass
class Bound:
    """The bound a report prints (`kind` says which) and what was tried."""

    value: float
    kind: str  # LP or CHEAP
    cheap: float
    lp: Optional[float] = None  # the plain LP's optimum (None: not solved); `value` may be higher (shard limits)
    seconds: float = 0.0
    status: str = ""  # "optimal", or why the cheap bound is printed

    def note(self) -> str:
        if self.kind == LP:
            return f"cheap bound {self.cheap:.6f} ms, plain LP {self.lp:.6f} ms ({self.status}), {self.seconds:.2f} s"
        return self.status


def cheap_bound(cands: Candidates, world_size: int) -> float:
    """Memory ignored: the least total work spread evenly, and never below the largest unavoidable
    single shard (the search's own bound)."""
    from fastplan.planner.search import lower_bound

    return lower_bound(cands, world_size)


def plan_bound(space: SearchSpace, cap: np.ndarray, time_limit_s: Optional[float] = DEFAULT_TIME_S,
               makespan: Optional[float] = None, cheap: Optional[float] = None,
               cands: Optional[Candidates] = None, lp: Optional[Tuple["PlacementLP", "LPSolution"]] = None,
               always_lp: bool = False, max_options: Optional[int] = None) -> Bound:
    """The LP bound when it solves within `time_limit_s`, else the cheap one (`cheap` if the caller
    has it). The LP is not tried without a budget (None or <= 0) or for a plan (`makespan`) within
    MIN_GAP of the cheap bound (unless `always_lp`). `cap`: (world_size, 3) bytes per rank of hbm, ddr, ssd. `lp`: the
    relaxation and its plain solution if the search solved it already. `max_options`: larger LPs
    are not tried (their solve would not end within a planning budget)."""
    start = time.perf_counter()
    if cheap is None:
        cands = cands or Candidates(space)
        cheap = cheap_bound(cands, space.world_size)
    if not time_limit_s or time_limit_s <= 0 or not space.tables:
        return Bound(cheap, CHEAP, cheap, status="LP skipped (no time budget)" if space.tables else "no tables")
    if makespan is not None and makespan - cheap <= MIN_GAP * makespan and not always_lp:
        return Bound(cheap, CHEAP, cheap, status=f"LP skipped (within {MIN_GAP:.1%} of the cheap bound)")
    cands = cands or Candidates(space)
    options = sum(map(len, cands.by_table))
    if lp is None and max_options is not None and options > max_options:
        return Bound(cheap, CHEAP, cheap, status=f"LP skipped ({options} options > {max_options})")
    deadline = start + time_limit_s
    if deadline - time.perf_counter() <= 0:
        return Bound(cheap, CHEAP, cheap, None, time.perf_counter() - start, "LP out of time (building the model)")
    model, plain = lp if lp is not None and lp[1].value is not None else (None, None)
    if model is None:
        model = PlacementLP(space, cands, cap)
        plain = model.solve(deadline)
    if plain.value is None:
        seconds = time.perf_counter() - start
        return Bound(cheap, CHEAP, cheap, None, seconds, f"LP {plain.status} after {seconds:.2f} s")
    value, status = plain.value * (1 - SAFETY), plain.status
    if makespan is None or makespan - value > MIN_GAP * makespan:
        limited = shard_limited_bound(model, plain, np.inf if makespan is None else makespan, deadline)
        if limited is None:
            status += "; shard limits out of time"
        elif limited > value:
            value, status = limited, status + ", shard-limited"
    return Bound(max(value, cheap), LP, cheap, plain.value, time.perf_counter() - start, status)


def rank_classes(space: SearchSpace, cap: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per rank its class; per class its capacity (C, 3), size and whether its ranks are in a host."""
    in_host = np.arange(space.world_size) < space.num_hosts * space.host_size
    keys, of_rank, size = np.unique(np.column_stack([cap, in_host]), axis=0, return_inverse=True, return_counts=True)
    return of_rank.ravel(), keys[:, :3], size, keys[:, 3].astype(bool)


class _Rows:
    """A sparse matrix as (row, column, value) triplets with per-row bounds."""

    def __init__(self) -> None:
        self.r: List[np.ndarray] = []
        self.c: List[np.ndarray] = []
        self.v: List[np.ndarray] = []
        self.lo: List[float] = []
        self.hi: List[float] = []

    def new(self, n: int, lo: float, hi: float) -> int:
        first = len(self.lo)
        self.lo += [lo] * n
        self.hi += [hi] * n
        return first

    def add(self, rows, cols, vals) -> None:
        rows, cols, vals = np.broadcast_arrays(np.asarray(rows), np.asarray(cols), np.asarray(vals, dtype=float))
        keep = vals != 0
        self.r.append(rows[keep].ravel())
        self.c.append(cols[keep].ravel())
        self.v.append(vals[keep].ravel())


@dataclass
class LPSolution:
    value: Optional[float]  # the optimum T (perf units), None when not solved
    status: str
    u: float = 0.0  # the uniform load U at the optimum
    x: Optional[np.ndarray] = None  # per option of `PlacementLP.opts`, how much of its table takes it


class PlacementLP:
    """The relaxation above, built once and solved under different restrictions: options whose
    largest shard cannot fit under a makespan `limit` removed, and U kept in a range."""

    def __init__(self, space: SearchSpace, cands: Candidates, cap: np.ndarray) -> None:
        W = space.world_size
        perf, mem = space.run_total, space.run_mem  # per run of identical shards
        cls, ccap, csize, chost = rank_classes(space, cap)
        C = len(csize)
        opts = np.concatenate(cands.by_table)
        n_x = len(opts)
        table = np.repeat(np.arange(len(cands.by_table)), [len(o) for o in cands.by_table])
        kind = space.opt_placement[opts]
        count = space.opt_count[opts]
        scale = max(cheap_bound(cands, W), float(perf.max(initial=0.0)) * 1e-6, 1e-30)  # T near 1
        T, U, X = 0, 1, 2  # variable columns: T, U, then x, then y
        x_ub = np.ones(n_x)
        rows = _Rows()
        load0 = rows.new(C, -np.inf, 0.0)
        rows.add(load0 + np.arange(C), T, -csize)
        mem0 = rows.new(3 * C, -np.inf, 1.0)  # row mem0 + 3 c + tier, bytes scaled by 1 / (n_c cap)
        mem_scale = np.where(ccap > 0, 1.0 / np.maximum(csize[:, None] * ccap, 1), 0.0)  # no tier: no shard fits

        def charge(pos, c, n, p, m):
            """n shards of perf p and bytes m (per entry) from column pos onto class c."""
            rows.add(load0 + c, pos, n * p / scale)
            rows.add(mem0 + 3 * c[:, None] + np.arange(3), pos[:, None], (n[:, None] * m) * mem_scale[c])

        # Uniform options: shard i on rank i, so a run of shards covers a range of ranks.
        uni = np.flatnonzero(kind == UNIFORM)
        if len(uni):
            n = space.opt_runs[opts[uni]]
            run = np.repeat(space.opt_run[opts[uni]], n) + _local(n)
            pos = np.repeat(uni, n)
            before = np.zeros((W + 1, C), np.int64)
            before[1:] = np.cumsum(np.eye(C, dtype=np.int64)[cls], axis=0)  # ranks of each class below r
            first = space.run_first[run]
            in_class = before[first + space.run_len[run]] - before[first]  # (runs, C) shards on each class
            cell = (pos[:, None] * C + np.arange(C)[None, :]).ravel()  # (option, class), summed before the model
            total = lambda w: np.bincount(cell, weights=(in_class * w[:, None]).ravel(), minlength=n_x * C)  # noqa: E731
            used = np.flatnonzero(total(np.ones(len(run))))
            sums = np.column_stack([total(perf[run])] + [total(mem[run, k].astype(float)) for k in range(3)])[used]
            charge(X + used // C, used % C, np.ones(len(used)), sums[:, 0], sums[:, 1:])
            misfit = ((in_class > 0)[:, :, None] & (mem[run][:, None, :] > ccap[None])).any((1, 2))
            x_ub[np.unique(pos[misfit])] = 0.0

        # Other options: runs of identical shards grouped; each group on the classes where one of its shards fits.
        free = np.flatnonzero(kind != UNIFORM)
        n_y = 0
        if len(free):
            n = space.opt_runs[opts[free]]
            gshard = np.repeat(space.opt_run[opts[free]], n) + _local(n)  # runs of identical shards: the groups
            gpos = np.repeat(free, n)
            gcount = space.run_len[gshard]
            fits = (mem[gshard][:, None, :] <= ccap[None]).all(2) & ((kind[gpos] == DEVICE)[:, None] | chost[None])
            eligible = fits.sum(1)
            x_ub[np.unique(gpos[eligible == 0])] = 0.0
            one = np.flatnonzero(eligible == 1)
            charge(X + gpos[one], np.argmax(fits[one], 1), gcount[one], perf[gshard[one]], mem[gshard[one]])
            many = np.flatnonzero(eligible > 1)
            g, c = np.nonzero(fits[many])
            g = many[g]
            n_y = len(g)
            ycol = X + n_x + np.arange(n_y)
            charge(ycol, c, np.ones(n_y), perf[gshard[g]], mem[gshard[g]])
            link = rows.new(len(many), 0.0, 0.0)
            rows.add(link + np.searchsorted(many, g), ycol, 1.0)
            rows.add(link + np.arange(len(many)), X + gpos[many], -gcount[many])

        # Each table takes one option, and its largest shard shares a rank with all-rank uniform shards.
        tabs = len(cands.by_table)
        one_row = rows.new(tabs, 1.0, 1.0)
        rows.add(one_row + table, X + np.arange(n_x), 1.0)
        own = np.where((kind == UNIFORM) & (count == W), space.opt_min_shard[opts], 0.0)  # its part of U
        u_row = rows.new(1, 0.0, 0.0)
        rows.add(u_row, np.concatenate([[U], X + np.arange(n_x)]), np.concatenate([[1.0], -own / scale]))
        shard_row = rows.new(tabs, -np.inf, 0.0)
        rows.add(shard_row + table, X + np.arange(n_x), (cands.max_shard[opts] - own) / scale)
        rows.add(shard_row + np.arange(tabs), U, 1.0)
        rows.add(shard_row + np.arange(tabs), T, -1.0)

        self.opts, self.table, self.scale, self.x_ub = opts, table, scale, x_ub
        self.beside_uniform = cands.max_shard[opts] - own  # what the largest shard adds to U on its rank
        self.n_x = n_x
        self._x_ub_set = x_ub  # what the model holds now
        self.model = _proto(rows, X + n_x + n_y, np.concatenate([[np.inf, np.inf], x_ub, np.full(n_y, np.inf)]))

    def solve(self, deadline: Optional[float] = None, limit: float = np.inf, u_range: Tuple[float, float] = (0.0, np.inf),
              deterministic_time: Optional[float] = None) -> LPSolution:
        """Options whose largest shard, on top of U >= u_range[0], exceeds `limit` taken out; U
        kept in `u_range`. Stops at `deadline` (time.perf_counter()) or after `deterministic_time`."""
        x_ub = np.where(self.beside_uniform + u_range[0] > limit, 0.0, self.x_ub)
        variables = self.model.variable
        variables[1].lower_bound = u_range[0] / self.scale
        variables[1].upper_bound = u_range[1] / self.scale
        for j in np.flatnonzero(x_ub != self._x_ub_set).tolist():
            variables[2 + j].upper_bound = float(x_ub[j])
        self._x_ub_set = x_ub
        request = _request(self.model, None if deadline is None else deadline - time.perf_counter(),
                           deterministic_time)
        if request is None:
            return LPSolution(None, "out of time (building the model)")
        value, status, values = _solve(request)
        if value is None:
            return LPSolution(None, status)
        return LPSolution(value * self.scale, status, values[1] * self.scale, np.asarray(values[2:2 + self.n_x]))


def shard_limited_bound(lp: PlacementLP, plain: LPSolution, makespan: float, deadline: float) -> Optional[float]:
    """A bound at least the plain LP's: the least T for which, in some band of the uniform load U,
    the LP keeping only options whose largest shard fits under T on top of U (the band's least U)
    reaches T. None when the deadline passes first.

    Why it is a bound: a plan of makespan T* with uniform load U* lies in U*'s band, and each of its
    options has its largest shard plus U* at most T*, so it is a point of that band's LP at any limit
    >= T*. Bands and limits only take away fractional mixes of options no plan could use whole
    (half of a table-wise shard too large for any rank); the LP alone lets those lower T."""
    assert plain.value is not None
    lo = plain.value * (1 - SAFETY)
    best = makespan  # no plan is below the optimum, which is at most the plan's makespan
    u = plain.u
    edges = sorted({0.0, *(u * f for f in BAND_EDGES if u > 0)}) + [np.inf]
    bands = sorted(zip(edges, edges[1:]), key=lambda band: not (band[0] <= u < band[1]))  # U*'s band first
    for u_lo, u_hi in bands:
        def reaches(limit: float) -> Optional[bool]:
            """The band's LP at `limit` has a point with T below `limit` (None: out of time)."""
            found = lp.solve(deadline, limit, (u_lo, u_hi))
            if found.value is None and found.status.startswith("out of time"):
                return None
            return found.value is not None and found.value * (1 - SAFETY) < limit

        ok = reaches(best)
        if ok is None:
            return None
        if not ok:
            continue  # no plan in this band is below `best`
        # Between consecutive breakpoints (where an option's shard starts to fit) the LP is the same.
        keys = np.unique(lp.beside_uniform + u_lo)
        points = np.concatenate([[lo], keys[(keys > lo) & (keys < best)]])
        ends = np.append(points[1:], best)
        first, last = 0, len(points) - 1
        while first < last:
            mid = (first + last) // 2
            found = lp.solve(deadline, points[mid], (u_lo, u_hi))
            if found.value is None and found.status.startswith("out of time"):
                return None
            if found.value is not None and found.value * (1 - SAFETY) < ends[mid]:
                last = mid
            else:
                first = mid + 1
        found = lp.solve(deadline, points[first], (u_lo, u_hi))
        if found.value is None:
            if found.status.startswith("out of time"):
                return None
            continue
        best = min(best, max(points[first], found.value * (1 - SAFETY)))
    return best


def lp_bound(space: SearchSpace, cands: Candidates, cap: np.ndarray, deadline: float) -> Tuple[Optional[float], str]:
    """The LP optimum (perf units of `Perf.total`), or None and why not (infeasible, out of time)."""
    if deadline - time.perf_counter() <= 0:
        return None, "out of time (building the model)"
    solution = PlacementLP(space, cands, cap).solve(deadline)
    return solution.value, solution.status


def _local(counts: np.ndarray) -> np.ndarray:
    """0 .. count-1 for each count, concatenated."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _proto(rows: _Rows, n_var: int, ub: np.ndarray):
    from ortools.linear_solver import linear_solver_pb2 as pb

    r, c, v = (np.concatenate(a) for a in (rows.r, rows.c, rows.v))
    cell, where = np.unique(r.astype(np.int64) * n_var + c, return_inverse=True)  # sorted by row; repeats added
    v = np.bincount(where.ravel(), weights=v, minlength=len(cell)).tolist()
    r, c = cell // n_var, (cell % n_var).tolist()
    bounds = np.searchsorted(r, np.arange(len(rows.lo) + 1)).tolist()
    model = pb.MPModelProto()
    inf = float("inf")
    for j in range(n_var):
        model.variable.add(lower_bound=0.0, upper_bound=float(ub[j]), objective_coefficient=1.0 if j == 0 else 0.0)
    for i, (lo, hi) in enumerate(zip(rows.lo, rows.hi)):
        a, b = bounds[i], bounds[i + 1]
        model.constraint.add(var_index=c[a:b], coefficient=v[a:b], lower_bound=-inf if lo == -np.inf else lo,
                             upper_bound=hi)
    return model


def _request(model, time_limit_s: Optional[float], deterministic_time: Optional[float]):
    from ortools.linear_solver import linear_solver_pb2 as pb

    if time_limit_s is not None and time_limit_s <= 0:
        return None
    request = pb.MPModelRequest(model=model, solver_type=pb.MPModelRequest.GLOP_LINEAR_PROGRAMMING)
    if time_limit_s is not None:
        request.solver_time_limit_seconds = time_limit_s
    if deterministic_time is not None:
        request.solver_specific_parameters = f"max_deterministic_time: {deterministic_time}"
    return request


def _solve(request) -> Tuple[Optional[float], str, list]:
    from ortools.linear_solver import linear_solver_pb2 as pb
    from ortools.linear_solver.python import model_builder_helper as mbh

    response = pb.MPSolutionResponse.FromString(
        mbh.ModelSolverHelper("glop").solve_serialized_request(request.SerializeToString()))
    if response.status == pb.MPSOLVER_OPTIMAL:
        return response.objective_value, "optimal", list(response.variable_value)
    name = pb.MPSolverResponseStatus.Name(response.status)
    return None, "out of time" if name in ("MPSOLVER_NOT_SOLVED", "MPSOLVER_FEASIBLE") else name.lower(), []
