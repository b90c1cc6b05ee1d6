"""Errors the planner raises; each names the table, rank or field at fault."""

from __future__ import annotations

import numpy as np
from torchrec.distributed.planner.types import PlannerError, PlannerErrorType

_GB = 1024**3


class ConstraintError(PlannerError):
    """A constraint names an unknown sharding type or kernel, or leaves a table no option."""

    def __init__(self, message: str) -> None:
        super().__init__(message, PlannerErrorType.STRICT_CONSTRAINTS)


class InfeasiblePlanError(PlannerError):
    """No placement fits in the per-rank memory left after storage reservation.

    `error_type` follows TorchRec: INSUFFICIENT_STORAGE when the tables cannot fit even in all
    ranks' memory added up, STRICT_CONSTRAINTS when they would fit in total but not rank by rank.
    `proven` says whether infeasibility was proven or the search gave up within its budget."""

    def __init__(self, message: str, error_type: PlannerErrorType = PlannerErrorType.INSUFFICIENT_STORAGE,
                 proven: bool = True) -> None:
        super().__init__(message, error_type)
        self.proven = proven


def _gb(n: float) -> str:
    return f"{n / _GB:.3f} GB"


def infeasible_error(space, cands, cap: np.ndarray, how: str, batch_size: int = 0) -> InfeasiblePlanError:
    """The error for "nothing fits": how it was established, the largest tables' smallest
    options, free memory per rank, and what to change."""
    s = space
    opt_mem = cands.option_mem()
    size = opt_mem.sum(1)
    need = np.array([opt_mem[o].min(0) for o in cands.by_table]).sum(0)  # each tier's least, table by table
    short = bool(np.any(need > cap.sum(0)))
    smallest = [int(o[np.argmin(size[o])]) for o in cands.by_table]
    lines = [f"No sharding plan fits in memory ({how})."]
    for t in sorted(range(len(s.tables)), key=lambda t: -int(size[smallest[t]]))[:5]:
        table, o = s.tables[t], smallest[t]
        largest = s.opt_max_mem[o]
        lines.append(
            f"  table '{table.name}' ({table.rows}x{table.dim}, module '{table.path}'): smallest option "
            f"{s.opt_type[o]}/{s.opt_kernel[o]} needs hbm={_gb(opt_mem[o, 0])} ddr={_gb(opt_mem[o, 1])} in "
            f"{int(s.opt_count[o])} shard(s), largest shard hbm={int(largest[0])} B ddr={int(largest[1])} B"
        )
    free = ", ".join(f"rank {r}: hbm={int(h)} B ddr={int(d)} B" for r, (h, d, _) in enumerate(cap.tolist()))
    lines.append(f"Memory per rank after storage reservation: {free}")
    lines.append(
        f"All tables need at least hbm={_gb(need[0])} ddr={_gb(need[1])} in total; all ranks have "
        f"hbm={_gb(cap[:, 0].sum())} ddr={_gb(cap[:, 1].sum())}."
    )
    lines.append(
        "Possible solutions:\n"
        f"  1) Increase the number of devices ({s.world_size})\n"
        "  2) Reduce the model size (fewer rows, smaller embedding_dim, fp16 tables)\n"
        + (f"  3) Reduce the local batch size ({batch_size})\n" if batch_size else "  3) Reduce the local batch size\n")
        + "  4) Remove planner constraints that narrow the sharding types or compute kernels (e.g. allow "
        "fused_uvm_caching / fused_uvm to move tables to host memory)"
    )
    error_type = PlannerErrorType.INSUFFICIENT_STORAGE if short else PlannerErrorType.STRICT_CONSTRAINTS
    return InfeasiblePlanError("\n".join(lines), error_type, proven=how.startswith("proven"))
