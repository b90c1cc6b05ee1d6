"""Online updates end to end: a TorchRec DMP training loop publishes, after every step, the rows its
`ModelDeltaTracker` saw touched; inference replicas pull them and write them in place into an
unsharded `EmbeddingBagCollection` that keeps answering requests (a request holds the store's lock,
so it reads every row whole)."""

from __future__ import annotations

import hashlib
import json
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn
from torchrec.distributed.types import ShardingPlan

from fastplan.comm.updates.layout import DTYPES, Layout, ShardKey, ShardSpec
from fastplan.comm.updates.sync import SyncNode

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_SPEC_FIELDS = ("table", "index", "rows", "cols", "dtype", "row_offset", "col_offset")


def layout_to_json(layout: Layout) -> str:
    return json.dumps([[getattr(s, f) if f != "dtype" else DTYPES[s.dtype] for f in _SPEC_FIELDS] for s in layout.specs])


def layout_from_json(text: str) -> Layout:
    """A layout from `layout_to_json` (plain data: every field is checked, nothing is evaluated)."""
    specs = []
    for i, entry in enumerate(json.loads(text)):
        if not isinstance(entry, list) or len(entry) != len(_SPEC_FIELDS):
            raise ValueError(f"layout entry {i}: expected {len(_SPEC_FIELDS)} fields {_SPEC_FIELDS}, got {entry!r}")
        table, index, rows, cols, dtype, r0, c0 = entry
        if not isinstance(table, str) or not all(type(v) is int for v in (index, rows, cols, r0, c0)):
            raise ValueError(f"layout entry {i}: wrong field types in {entry!r}")
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"layout entry {i} (table '{table}'): unknown dtype {dtype!r}")
        specs.append(ShardSpec(table, index, rows, cols, _DTYPE_NAMES[dtype], r0, c0))
    return Layout(specs)


def local_shards(model: nn.Module, plan: ShardingPlan, module_fqn: str) -> Dict[ShardKey, torch.Tensor]:
    """The shards of one sharded EBC that this rank holds, as views of the live (fused-optimizer
    updated) weights, keyed by (table, index in the plan's sharding spec)."""
    module_plan = plan.plan[module_fqn]
    out = {}
    for name, value in model.state_dict().items():
        if not name.startswith(f"{module_fqn}.embedding_bags.") or not hasattr(value, "local_shards"):
            continue
        table = name.split(".")[-2]
        offsets = [list(m.shard_offsets) for m in module_plan[table].sharding_spec.shards]
        for shard in value.local_shards():
            out[(table, offsets.index(list(shard.metadata.shard_offsets)))] = shard.tensor
    return out


class TrackedPublisher:
    """After each training step: the tracker's touched ids per table -> those rows of the live shards
    (`local_shards`) -> one `SyncNode.publish` (one version per changed shard)."""

    def __init__(self, tracker, node: SyncNode, live: Dict[ShardKey, torch.Tensor], module_fqn: str) -> None:
        self.tracker = tracker
        self.node = node
        self.prefix = f"{module_fqn}.embedding_bags."
        self.by_table: Dict[str, List[Tuple[ShardKey, ShardSpec, torch.Tensor]]] = {}
        for key, weights in live.items():
            if key not in node.store.layout.index or key not in node.store.keys():
                raise ValueError(f"live shard {key} is not held by the node's store")
            spec = node.store.layout.specs[node.store.layout.index[key]]
            self.by_table.setdefault(key[0], []).append((key, spec, weights))

    def publish(self) -> Dict[ShardKey, int]:
        """Publish what changed since the last call; returns the new version of each changed shard."""
        updates = {}
        for fqn, ids in self.tracker.get_unique_ids().items():
            table = fqn[len(self.prefix):] if fqn.startswith(self.prefix) else fqn
            if table not in self.by_table:
                raise ValueError(f"tracker reports table '{table}' ({fqn}) that this rank does not hold")
            ids = ids.to(torch.int64)
            for key, spec, weights in self.by_table[table]:
                rows = ids[(ids >= spec.row_offset) & (ids < spec.row_offset + spec.rows)] - spec.row_offset
                if len(rows):
                    updates[key] = (rows, weights.index_select(0, rows))
        return self.node.publish(updates) if updates else {}


def replica_shards(layout: Layout, model: nn.Module) -> Dict[ShardKey, torch.Tensor]:
    """Views of an unsharded EBC's weights cut as `layout` cuts the tables: updates land in place."""
    out = {}
    for spec in layout.specs:
        w = model.embedding_bags[spec.table].weight.data
        out[spec.key] = w[spec.row_offset:spec.row_offset + spec.rows, spec.col_offset:spec.col_offset + spec.cols]
    return out


def shard_digests(shards: Dict[ShardKey, torch.Tensor]) -> Dict[str, str]:
    """sha256 of each shard's bytes, keyed "table/index" (what trainer and replica compare)."""
    out = {}
    for (table, index), t in shards.items():
        out[f"{table}/{index}"] = hashlib.sha256(np.ascontiguousarray(t.detach().numpy()).tobytes()).hexdigest()
    return out
