"""The shards every node of a job agrees on: (table, shard index) -> rows, cols, dtype, in one order.

Nodes hold different subsets (a trainer rank its plan shards, a replica all of them), but they
number shards by this common layout on the wire and prove they share it by its digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torchrec.distributed.types import ShardingPlan

ShardKey = Tuple[str, int]  # (table, shard index in the table's sharding spec)

DTYPES: Dict[torch.dtype, str] = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64",
    torch.int8: "int8", torch.uint8: "uint8",
}


@dataclass(frozen=True)
class ShardSpec:
    table: str
    index: int
    rows: int
    cols: int
    dtype: torch.dtype
    row_offset: int = 0  # where the shard sits in its table (plan metadata)
    col_offset: int = 0

    @property
    def key(self) -> ShardKey:
        return (self.table, self.index)

    @property
    def row_bytes(self) -> int:
        return self.cols * self.dtype.itemsize


class Layout:
    """An ordered list of shard specs with a digest; shard i on the wire is `specs[i]`."""

    def __init__(self, specs: List[ShardSpec]) -> None:
        self.specs = sorted(specs, key=lambda s: s.key)
        self.index: Dict[ShardKey, int] = {s.key: i for i, s in enumerate(self.specs)}
        if len(self.index) != len(self.specs):
            raise ValueError("layout lists a shard twice")
        for s in self.specs:
            if s.dtype not in DTYPES:
                raise ValueError(f"shard {s.key}: dtype {s.dtype} is not supported on the wire")
            if s.rows <= 0 or s.cols <= 0:
                raise ValueError(f"shard {s.key}: empty shape {s.rows}x{s.cols}")
        h = hashlib.sha256(b"fastplan-ekko-layout-1")
        for s in self.specs:
            h.update(f"{s.table}\0{s.index}\0{s.rows}\0{s.cols}\0{DTYPES[s.dtype]}\0{s.row_offset}\0{s.col_offset}\n".encode())
        self.digest = h.digest()

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def largest_shard_bytes(self) -> int:
        return max(s.rows * (s.row_bytes + 12) for s in self.specs)

    @classmethod
    def from_tensors(cls, shards: Dict[ShardKey, torch.Tensor]) -> "Layout":
        return cls([ShardSpec(k[0], k[1], w.size(0), w.size(1), w.dtype) for k, w in shards.items()])

    @classmethod
    def from_plan(cls, plan: ShardingPlan, dims: Dict[str, Tuple[int, int]], dtype: torch.dtype = torch.float32) -> "Layout":
        """Every sharding-spec shard of `plan`; `dims` gives (rows, cols) of tables kept whole
        (data parallel, no spec)."""
        specs = []
        for _, module_plan in sorted(plan.plan.items()):
            for name, ps in sorted(module_plan.items()):
                if ps.sharding_spec is None:
                    if name not in dims:
                        raise ValueError(f"table '{name}' is data-parallel: give its shape in dims")
                    specs.append(ShardSpec(name, 0, *dims[name], dtype))
                    continue
                for i, meta in enumerate(ps.sharding_spec.shards):
                    (r0, c0), (nr, nc) = meta.shard_offsets, meta.shard_sizes
                    specs.append(ShardSpec(name, i, nr, nc, dtype, r0, c0))
        return cls(specs)
