"""What changes between two sharding plans: per table kept / moved / resharded / added / removed /
replaced, and the embedding and optimizer-state bytes that must cross ranks to get from one to the other.

A byte "moves" when the new plan puts it on a rank that did not hold it under the old plan. Rank r
of the new plan is taken to be rank r of the old one (scale-out adds ranks at the end, scale-in drops
the last ones). Rows a table gains are freshly initialised and move nothing; a table whose
embedding dimension changes is "replaced" (its old vectors do not carry over).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from torchrec.distributed.types import ParameterSharding, ShardingPlan

# Optimizer state as (bytes per weight element, bytes per row of each shard), fp32 states as FBGEMM
# keeps them. Keys are `EmbOptimType` values and optimizer class names.
OPTIMIZER_STATE_BYTES: Dict[str, Tuple[int, int]] = {
    "sgd": (0, 0), "exact_sgd": (0, 0), "lars_sgd": (0, 0), "none": (0, 0), "SGD": (0, 0),
    "exact_row_wise_adagrad": (0, 4), "row_wise_adagrad": (0, 4), "exact_row_wise_weighted_adagrad": (0, 4),
    "ema_in_place_row_wise_adagrad": (0, 4), "RowWiseAdagrad": (0, 4),
    "exact_adagrad": (4, 0), "adagrad": (4, 0), "Adagrad": (4, 0),
    "adam": (8, 0), "lamb": (8, 0), "Adam": (8, 0), "AdamW": (8, 0),
    "partial_row_wise_adam": (4, 4), "partial_row_wise_lamb": (4, 4),
}
STATUSES = ("kept", "moved", "resharded", "replaced", "added", "removed")


@dataclass(frozen=True)
class TableState:
    """What one table holds: its shape and the optimizer state that travels with its rows."""

    rows: int
    dim: int
    element_size: int
    optimizer: str = "none"
    optimizer_element_bytes: int = 0
    optimizer_row_bytes: int = 0

    def bytes(self, area: np.ndarray, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(weight, optimizer) bytes of `area` elements and `rows` rows of row-wise state."""
        area = np.asarray(area, dtype=np.int64)
        return area * self.element_size, area * self.optimizer_element_bytes + np.asarray(rows, np.int64) * self.optimizer_row_bytes


def optimizer_name(fused_params: Dict[str, object], tensor: object = None) -> str:
    """The optimizer a table trains with: the sharder's fused params, else `apply_optimizer_in_backward`'s."""
    opt = fused_params.get("optimizer")
    if opt is not None:
        return str(getattr(opt, "value", opt))
    classes = getattr(tensor, "_optimizer_classes", None)
    return classes[0].__name__ if classes and classes[0] is not None else "none"


def table_state(table) -> TableState:
    """`TableState` of a `fastplan.planner.tables.TableInfo`. An optimizer fastplan does not know is
    counted as stateless and named in the diff."""
    name = optimizer_name(table.fused_params, table.tensor)
    per_element, per_row = OPTIMIZER_STATE_BYTES.get(name, (0, 0))
    return TableState(table.rows, table.dim, table.element_size, name, per_element, per_row)


@dataclass
class Layout:
    """Where a table's data lives under one plan: boxes (rank, row0, col0, rows, cols) and its shape."""

    boxes: np.ndarray
    rows: int
    dim: int
    replicated: bool  # data parallel: every box is the whole table

    @classmethod
    def of(cls, ps: ParameterSharding, rows: Optional[int] = None, dim: Optional[int] = None) -> "Layout":
        """Layout of a `ParameterSharding`. Data-parallel shardings carry no shard metadata: their
        shape is `rows` x `dim` (required then)."""
        if ps.sharding_spec is None:
            if rows is None or dim is None:
                raise ValueError(f"a {ps.sharding_type} sharding has no shards; its table shape must be given")
            boxes = np.array([[r, 0, 0, rows, dim] for r in ps.ranks], dtype=np.int64).reshape(-1, 5)
            return cls(boxes, rows, dim, True)
        boxes = np.array(
            [[m.placement.rank(), *m.shard_offsets, *m.shard_sizes] for m in ps.sharding_spec.shards], dtype=np.int64
        ).reshape(-1, 5)
        return cls(boxes, int((boxes[:, 1] + boxes[:, 3]).max()), int((boxes[:, 2] + boxes[:, 4]).max()), False)


def overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Overlapping area of every box in `a` (n, >=4: row0, col0, rows, cols in the last four
    columns) with every box in `b` (m, same), as an (n, m) array."""
    a, b = a[:, -4:], b[:, -4:]
    r = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    c = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.clip(r, 0, None) * np.clip(c, 0, None)


def _needs(old: Layout, shards: np.ndarray) -> np.ndarray:
    """(n, m, 2): elements, and rows of row-wise state, that each new shard (n, 4: row0, col0, rows,
    cols) takes from each old box. Row-wise state is per row of each column shard: a new shard with
    the column range of old shards needs their rows; one whose column range is new needs the rows of
    every old shard it overlaps (their states are combined)."""
    b = old.boxes
    area = overlap(shards, b)
    rows = np.clip(np.minimum(shards[:, None, 0] + shards[:, None, 2], b[None, :, 1] + b[None, :, 3])
                   - np.maximum(shards[:, None, 0], b[None, :, 1]), 0, None)
    same_cols = (shards[:, None, 1] == b[None, :, 2]) & (shards[:, None, 3] == b[None, :, 4])
    needed = np.where(same_cols.any(axis=1)[:, None], same_cols, area > 0) & (rows > 0)
    return np.stack([area, rows * needed], axis=2)


def transfer(old: Layout, new_dim: int, shards: np.ndarray, world_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """What new shards (n, 4: row0, col0, rows, cols) need of the old data: `carried` (n, 2) elements
    and row-wise-state rows, and `local` (n, world_size, 2) the part of that already on each rank.
    A shard placed on rank r moves `carried - local[:, r]`."""
    n = len(shards)
    if old.dim != new_dim or not len(old.boxes):
        return np.zeros((n, 2), dtype=np.int64), np.zeros((n, world_size, 2), dtype=np.int64)
    need = _needs(old, shards)
    local = np.zeros((n, world_size, 2), dtype=np.int64)
    for j in np.nonzero(old.boxes[:, 0] < world_size)[0].tolist():
        local[:, int(old.boxes[j, 0])] += need[:, j]
    if old.replicated:  # every replica is the whole table: one is enough
        carried = need.max(axis=1)
        local = np.minimum(local, carried[:, None, :])
    else:
        carried = need.sum(axis=1)
    return carried, local


@dataclass
class TableChange:
    table: str
    status: str  # one of STATUSES
    resized: bool = False
    old_type: Optional[str] = None
    old_kernel: Optional[str] = None
    old_ranks: List[int] = field(default_factory=list)
    new_type: Optional[str] = None
    new_kernel: Optional[str] = None
    new_ranks: List[int] = field(default_factory=list)
    weight_bytes: int = 0  # moved
    optimizer_bytes: int = 0  # moved
    optimizer: str = "none"

    @property
    def moved_bytes(self) -> int:
        return self.weight_bytes + self.optimizer_bytes


@dataclass
class PlanDiff:
    """Per-table changes and per-rank bytes between an old and a new plan, with the new plan's
    per-rank perf and, when replanned, the max-rank perf a from-scratch plan reaches."""

    tables: List[TableChange]
    received: List[int]  # bytes moved onto each rank of the new plan
    sent: List[int]  # bytes moved off each rank of the old plan
    rank_perf: Optional[List[float]] = None
    previous_rank_perf: Optional[List[float]] = None
    scratch_max_rank_perf: Optional[float] = None
    scratch_moved_bytes: Optional[int] = None

    @property
    def weight_bytes(self) -> int:
        return sum(t.weight_bytes for t in self.tables)

    @property
    def optimizer_bytes(self) -> int:
        return sum(t.optimizer_bytes for t in self.tables)

    @property
    def moved_bytes(self) -> int:
        return self.weight_bytes + self.optimizer_bytes

    @property
    def max_rank_perf(self) -> Optional[float]:
        return max(self.rank_perf) if self.rank_perf else None

    def counts(self) -> Dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for t in self.tables:
            out[t.status] += 1
        return out

    def changed(self) -> List[TableChange]:
        return [t for t in self.tables if t.status != "kept" or t.moved_bytes or t.resized]

    def to_dict(self) -> dict:
        doc = asdict(self)
        doc["moved_bytes"] = self.moved_bytes
        return doc

    def table(self, limit: Optional[int] = 50) -> str:
        """What moves where, as text: a summary, changed tables (up to `limit`), bytes per rank."""
        counts = ", ".join(f"{v} {k}" for k, v in self.counts().items() if v)
        lines = [
            f"plan diff: {counts or 'no tables'}",
            f"moved {_size(self.moved_bytes)} (weights {_size(self.weight_bytes)}, optimizer state {_size(self.optimizer_bytes)})",
        ]
        if self.max_rank_perf is not None:
            line = f"max-rank perf {self.max_rank_perf:.6f} ms"
            if self.previous_rank_perf:
                line += f" (before {max(self.previous_rank_perf):.6f} ms)"
            if self.scratch_max_rank_perf:
                line += (f", from-scratch plan {self.scratch_max_rank_perf:.6f} ms "
                         f"({(self.max_rank_perf / self.scratch_max_rank_perf - 1) * 100:+.2f}%)")
            if self.scratch_moved_bytes is not None:
                line += f", which would move {_size(self.scratch_moved_bytes)}"
            lines.append(line)
        changed = self.changed()
        if changed:
            lines.append(f"{'table':<28} {'status':<10} {'before':<28} {'after':<28} {'moved':>10}")
            for t in changed[: limit if limit else None]:
                before = _where(t.old_type, t.old_kernel, t.old_ranks)
                after = _where(t.new_type, t.new_kernel, t.new_ranks)
                status = t.status + ("+rows" if t.resized else "")
                lines.append(f"{t.table:<28} {status:<10} {before:<28} {after:<28} {_size(t.moved_bytes):>10}")
            if limit and len(changed) > limit:
                lines.append(f"... {len(changed) - limit} more changed tables")
        ranks = max(len(self.received), len(self.sent))
        lines.append(f"{'rank':>4} {'received':>10} {'sent':>10}")
        for r in range(ranks):
            got = self.received[r] if r < len(self.received) else 0
            gone = self.sent[r] if r < len(self.sent) else 0
            lines.append(f"{r:>4} {_size(got):>10} {_size(gone):>10}")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _where(st: Optional[str], kernel: Optional[str], ranks: List[int]) -> str:
    if st is None:
        return "-"
    shown = ranks if len(ranks) <= 4 else f"{ranks[:3]}+{len(ranks) - 3}".replace("]+", ",..]+")
    return f"{_SHORT.get(st, st)}/{kernel} {shown}"


_SHORT = {"data_parallel": "DP", "table_wise": "TW", "column_wise": "CW", "table_column_wise": "TWCW",
          "row_wise": "RW", "table_row_wise": "TWRW"}


def table_key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def shardings(plan: ShardingPlan) -> Dict[str, ParameterSharding]:
    """A plan's `ParameterSharding`s by table key (module path + table name), in plan order."""
    return {table_key(path, name): ps for path, mp in plan.plan.items() for name, ps in mp.items()}


def diff_plans(
    old: ShardingPlan,
    new: ShardingPlan,
    states: Dict[str, TableState],
    old_shapes: Optional[Dict[str, Tuple[int, int]]] = None,
    world_size: Optional[int] = None,
    old_world_size: Optional[int] = None,
) -> PlanDiff:
    """Compare two plans. `states` describes the tables of the new plan by table key (rows,
    element size, optimizer); `old_shapes` gives (rows, dim) of old data-parallel tables whose shape
    differs (the plan does not record it; the new shape is assumed otherwise)."""
    old_ps, new_ps = shardings(old), shardings(new)
    missing = [k for k in new_ps if k not in states]
    if missing:
        raise KeyError(f"diff_plans: no table state for {missing[:5]} ({len(missing)} tables)")
    W = world_size or _world(new_ps)
    W_old = old_world_size or _world(old_ps)
    received = np.zeros(W, dtype=np.int64)
    sent = np.zeros(max(W_old, 1), dtype=np.int64)
    changes: List[TableChange] = []
    for key, ps in new_ps.items():
        st = states[key]
        prev = old_ps.get(key)
        if prev is None:
            changes.append(TableChange(key, "added", new_type=ps.sharding_type, new_kernel=ps.compute_kernel,
                                       new_ranks=list(ps.ranks), optimizer=st.optimizer))
            continue
        shape = (old_shapes or {}).get(key, (st.rows, st.dim))
        old_layout = Layout.of(prev, *shape)
        new_layout = Layout.of(ps, st.rows, st.dim)
        if old_layout.dim != st.dim:
            status = "replaced"
        elif (prev.sharding_type, prev.compute_kernel) != (ps.sharding_type, ps.compute_kernel):
            status = "resharded"
        else:
            status = "kept" if list(prev.ranks) == list(ps.ranks) else "moved"
        carried, local = transfer(old_layout, st.dim, new_layout.boxes[:, 1:], max(W, W_old))
        ranks = new_layout.boxes[:, 0]
        moved = carried - local[np.arange(len(ranks)), ranks]
        w_bytes, o_bytes = st.bytes(moved[:, 0], moved[:, 1])
        np.add.at(received, ranks, w_bytes + o_bytes)
        if status != "replaced":
            _add_sent(sent, old_layout, new_layout.boxes, moved, st)
        changes.append(TableChange(
            key, status, old_layout.rows != st.rows, prev.sharding_type, prev.compute_kernel, list(prev.ranks),
            ps.sharding_type, ps.compute_kernel, list(ps.ranks), int(w_bytes.sum()), int(o_bytes.sum()), st.optimizer,
        ))
    for key, prev in old_ps.items():
        if key not in new_ps:
            changes.append(TableChange(key, "removed", old_type=prev.sharding_type, old_kernel=prev.compute_kernel,
                                       old_ranks=list(prev.ranks)))
    return PlanDiff(changes, received.tolist(), sent.tolist())


def _add_sent(sent: np.ndarray, old: Layout, new_boxes: np.ndarray, moved: np.ndarray, st: TableState) -> None:
    """Charge moved data to the old ranks it comes from (a replicated table: its lowest rank)."""
    if not moved.any():
        return
    if old.replicated:
        w, o = st.bytes(moved[:, 0], moved[:, 1])
        sent[int(old.boxes[:, 0].min())] += int((w + o).sum())
        return
    need = _needs(old, new_boxes[:, 1:])
    need[new_boxes[:, 0][:, None] == old.boxes[None, :, 0]] = 0  # already on the destination rank
    w, o = st.bytes(need[..., 0], need[..., 1])
    np.add.at(sent, old.boxes[:, 0], (w + o).sum(axis=0))


def _world(shardings_by_key: Dict[str, ParameterSharding]) -> int:
    ranks = [r for ps in shardings_by_key.values() for r in (ps.ranks or [])]
    return max(ranks) + 1 if ranks else 0
