"""A small linear-model builder over OR-Tools CP-SAT's native helper.

`ortools.sat.python.cp_model` imports pandas (about 0.3 s); the compiled `cp_model_helper` it
wraps does not, and building the model proto directly is also faster for the flat models the
planner needs (booleans, small integers, linear constraints, one objective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

INT_MIN, INT_MAX = -(2**62), 2**62


@dataclass
class Solution:
    status: str  # "optimal", "feasible", "infeasible", "unknown", "invalid"
    values: List[int]
    objective: float
    bound: float
    deterministic_time: float


class Model:
    def __init__(self) -> None:
        from ortools.sat.python import cp_model_helper as helper

        self._helper = helper
        self.proto = helper.CpModelProto()
        self.num_vars = 0

    def var(self, lo: int, hi: int) -> int:
        v = self.proto.variables.add()
        v.domain.extend([int(lo), int(hi)])
        self.num_vars += 1
        return self.num_vars - 1

    def linear(self, variables: Sequence[int], coeffs: Sequence[int], lo: int = INT_MIN, hi: int = INT_MAX) -> None:
        """lo <= sum(coeffs * variables) <= hi."""
        c = self.proto.constraints.add()
        c.linear.vars.extend(int(v) for v in variables)
        c.linear.coeffs.extend(int(k) for k in coeffs)
        c.linear.domain.extend([int(lo), int(hi)])

    def exactly_one(self, literals: Sequence[int]) -> None:
        self.proto.constraints.add().exactly_one.literals.extend(int(v) for v in literals)

    def minimize(self, variables: Sequence[int], coeffs: Sequence[int]) -> None:
        self.proto.objective.vars.extend(int(v) for v in variables)
        self.proto.objective.coeffs.extend(int(k) for k in coeffs)

    def hint(self, variables: Sequence[int], values: Sequence[int]) -> None:
        self.proto.solution_hint.vars.extend(int(v) for v in variables)
        self.proto.solution_hint.values.extend(int(x) for x in values)

    def solve(self, deterministic_time: float, wall_time: Optional[float] = None, presolve: bool = True) -> Solution:
        """One worker, fixed seed, a deterministic-time limit: the same model gives the same answer
        on every machine. `wall_time` only guards against pathological slowness. `presolve=False`
        suits improving a hinted solution; keep it for proving infeasibility."""
        h = self._helper
        params = h.SatParameters()
        params.num_workers = 1
        params.random_seed = 0
        params.max_deterministic_time = float(deterministic_time)
        # Measured on the planner's models: presolve and LP relaxations spend small budgets before
        # the hinted solution is even loaded; without them the same budget improves plans more.
        params.cp_model_presolve = presolve
        params.linearization_level = 0 if not presolve else 1
        if wall_time is not None:
            params.max_time_in_seconds = float(wall_time)
        solver = h.SolveWrapper()
        solver.set_parameters(params)
        response = solver.solve(self.proto)
        status = {
            h.CpSolverStatus.OPTIMAL: "optimal",
            h.CpSolverStatus.FEASIBLE: "feasible",
            h.CpSolverStatus.INFEASIBLE: "infeasible",
            h.CpSolverStatus.MODEL_INVALID: "invalid",
        }.get(response.status, "unknown")
        if status == "invalid":
            raise RuntimeError("fastplan built an invalid CP-SAT model (a bug): " + str(response.solution_info))
        return Solution(status, list(response.solution), response.objective_value, response.best_objective_bound,
                        response.deterministic_time)
