"""Move a DistributedModelParallel model's state (embedding weights, fused-optimizer state, dense
parameters) from one sharding plan to another through torch.distributed.checkpoint.

`save_state(dmp, path)` under the old plan writes every rank's shards (one file per rank);
`load_state(dmp, path)` under the new plan (any world size) has each rank read exactly the regions
its new shards hold, from whichever rank's file has them, and reports the bytes it read from each.
A region a rank already held under the old plan comes from its own file, so on rank-local storage
only moved regions cross ranks. Tables absent from the checkpoint keep their fresh initialisation;
a table that gained rows gets its old rows, the new ones stay fresh; a table whose embedding
dimension changed is treated as new. Row-wise optimizer state (one value per row of each column
shard) follows its rows; where the column split changed it is combined column-weighted (exact for
row-wise Adagrad when shards merge, a copy when they split) and listed as approximate.

The checkpoint's metadata file is a pickle (DCP's format): it is read with an unpickler that accepts
only DCP's metadata classes, and tensors are read with `torch.load(weights_only=True)` by DCP.
"""

from __future__ import annotations

import io
import pickle
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

OPTIMIZER_PREFIX = "optimizer/"
_FILE_RANK = re.compile(r"__(\d+)_\d+\.distcp$")


def model_state(dmp: nn.Module) -> Dict[str, torch.Tensor]:
    """What `save_state` saves: the model's tensors (`ShardedTensor`s for sharded tables) and each
    fused-optimizer state as `optimizer/<parameter key>/<state name>`."""
    state = {k: v for k, v in dmp.state_dict().items() if isinstance(v, torch.Tensor)}
    fused = getattr(dmp, "fused_optimizer", None)
    if fused is not None:
        for param_key, states in fused.state_dict()["state"].items():
            for name, value in states.items():
                if isinstance(value, torch.Tensor):
                    state[f"{OPTIMIZER_PREFIX}{param_key}/{name}"] = value
    return state


def save_state(dmp: nn.Module, path: str) -> None:
    """Collective: every rank writes its shards of `model_state(dmp)` under `path`."""
    dcp.save(model_state(dmp), storage_writer=dcp.FileSystemWriter(path))


@dataclass
class LoadReport:
    """What one rank's `load_state` did."""

    read_from: Dict[int, int] = field(default_factory=dict)  # bytes read from each saving rank's file
    fresh: List[str] = field(default_factory=list)  # keys not in the checkpoint (or a changed dim): left as they were
    resized: List[str] = field(default_factory=list)  # keys loaded into a different global shape
    approximate: List[str] = field(default_factory=list)  # row-wise states whose column split changed
    skipped: List[str] = field(default_factory=list)  # optimizer states of a layout this helper does not map

    def crossed(self, rank: int) -> int:
        """Bytes this rank read from other ranks' files."""
        return sum(v for r, v in self.read_from.items() if r != rank)


# ---- checkpoint metadata without arbitrary unpickling -----------------------------------------
_ALLOWED = {  # what DCP's metadata pickle refers to; nothing here runs code or touches files
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # returns a torch.layout by name, nothing else
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not DCP metadata")


class _CountingReader(dcp.FileSystemReader):
    """A `FileSystemReader` that reads metadata through `_MetadataUnpickler` and counts the bytes
    it reads from each saving rank's file."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.read_from: Dict[int, int] = {}

    def read_metadata(self, *args, **kwargs) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"checkpoint metadata holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        self._metadata = metadata
        return metadata

    def read_data(self, plan: LoadPlan, planner):
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            match = _FILE_RANK.search(str(info.relative_path))
            md = self._metadata.state_dict_metadata[item.storage_index.fqn]
            size = int(np.prod(item.lengths)) * torch.tensor([], dtype=md.properties.dtype).element_size()
            src = int(match.group(1)) if match else -1
            self.read_from[src] = self.read_from.get(src, 0) + size
        return super().read_data(plan, planner)


# ---- what each rank reads ---------------------------------------------------------------------
@dataclass
class _Piece:
    """A region of a saved tensor (offsets in its coordinates) and the tensor it is read into."""

    offsets: Tuple[int, ...]
    tensor: torch.Tensor


class _PiecesPlanner(DefaultLoadPlanner):
    """Reads a list of `_Piece`s per checkpoint key (instead of matching a state dict)."""

    def __init__(self, pieces: Dict[str, List[_Piece]]) -> None:
        super().__init__()
        self.pieces = pieces

    def create_local_plan(self) -> LoadPlan:
        items: List[ReadItem] = []
        for key, pieces in self.pieces.items():
            chunks = [ChunkStorageMetadata(torch.Size(p.offsets), p.tensor.size()) for p in pieces]
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], chunks)
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        piece = self.pieces[read_item.dest_index.fqn][read_item.dest_index.index]
        tensor = piece.tensor
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            tensor = tensor.narrow(dim, start, length)
        return tensor

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # DCP copied into the resolved view


def _local_chunks(value: torch.Tensor) -> List[_Piece]:
    if isinstance(value, ShardedTensor):
        return [_Piece(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
    return [_Piece((0,) * value.dim(), value)]


def _boxes(offsets_sizes: List[Tuple[List[int], List[int]]]) -> np.ndarray:
    """(n, 4) row0, col0, rows, cols."""
    return np.array([[o[0], o[1], s[0], s[1]] for o, s in offsets_sizes], dtype=np.int64).reshape(-1, 4)


def rowwise_offsets(boxes: np.ndarray, rows: int, dim: int) -> np.ndarray:
    """Where TorchRec's fused optimizer puts each weight shard's row-wise state in the 1-D state
    tensor: at the row offset, or, when columns are split, one block of `rows` per column shard
    in column order (rolling offsets when rows are split too)."""
    if not (boxes[:, 3] != dim).any():
        return boxes[:, 0].copy()
    order = np.lexsort((boxes[:, 0], boxes[:, 1]))
    out = np.empty(len(boxes), dtype=np.int64)
    if (boxes[:, 2] != rows).any():  # grid: rows and columns split
        out[order] = np.cumsum(boxes[order, 2]) - boxes[order, 2]
    else:
        out[order] = np.arange(len(order)) * boxes[order, 2]
    return out


def _rowwise_pieces(
    state: ShardedTensor, weight: ShardedTensor, saved: TensorStorageMetadata, saved_weight: TensorStorageMetadata
) -> Optional[Tuple[List[_Piece], List[Callable[[], None]], bool]]:
    """Pieces for a 1-D row-wise state, mapped through the weight layouts of both plans, plus the
    fix-ups that combine pieces where the column split changed. None if a layout is not row-wise."""
    t_boxes = _boxes([(m.shard_offsets, m.shard_sizes) for m in weight.metadata().shards_metadata])
    rows, dim = weight.size()
    t_offsets = rowwise_offsets(t_boxes, rows, dim)
    s_boxes = _boxes([(c.offsets, c.sizes) for c in saved_weight.chunks])
    s_rows, s_dim = saved_weight.size
    s_offsets = rowwise_offsets(s_boxes, s_rows, s_dim)
    saved_chunks = {(int(c.offsets[0]), int(c.sizes[0])) for c in saved.chunks}
    if saved_chunks != {(int(o), int(b[2])) for o, b in zip(s_offsets, s_boxes)}:
        return None
    by_offset = {int(o): b for o, b in zip(t_offsets, t_boxes)}
    pieces: List[_Piece] = []
    fixups: List[Callable[[], None]] = []
    approximate = False
    for shard in state.local_shards():
        box = by_offset.get(int(shard.metadata.shard_offsets[0]))
        if box is None or int(box[2]) != shard.tensor.numel():
            return None
        r0, c0, nr, nc = (int(v) for v in box)
        # The old shards of this column range if there are any (exact), else every old shard whose
        # columns overlap (their states are combined): the rule `fastplan.planner.diff` counts by.
        exact = any((sc0, snc) == (c0, nc) for _, sc0, _, snc in s_boxes.tolist())
        parts = []  # (weight, target row offset, rows, saved offset)
        for (sr0, sc0, snr, snc), so in zip(s_boxes.tolist(), s_offsets.tolist()):
            cols = min(c0 + nc, sc0 + snc) - max(c0, sc0)
            lo, hi = max(r0, sr0), min(r0 + nr, sr0 + snr)
            if cols > 0 and hi > lo and (not exact or (sc0, snc) == (c0, nc)):
                parts.append((cols / nc, lo - r0, hi - lo, so + lo - sr0))
        if exact:
            pieces += [_Piece((so,), shard.tensor.narrow(0, start, n)) for _, start, n, so in parts]
            continue
        approximate = True
        reads = [(w, start, torch.empty(n, dtype=shard.tensor.dtype)) for w, start, n, _ in parts]
        pieces += [_Piece((so,), buf) for (_, _, _, so), (_, _, buf) in zip(parts, reads)]

        def combine(target=shard.tensor, reads=reads) -> None:  # column-weighted mean, row by row
            total = torch.zeros(target.numel(), dtype=torch.float64)
            weight = torch.zeros(target.numel(), dtype=torch.float64)
            for w, start, buf in reads:
                total[start : start + len(buf)] += w * buf.double()
                weight[start : start + len(buf)] += w
            got = weight > 0
            target[got] = (total[got] / weight[got]).to(target.dtype)

        fixups.append(combine)
    return pieces, fixups, approximate


def load_state(dmp: nn.Module, path: str) -> LoadReport:
    """Collective: load what `save_state` wrote under `path` into `dmp` (any plan, any world size)."""
    reader = _CountingReader(path)
    saved = reader.read_metadata().state_dict_metadata
    target = model_state(dmp)
    report = LoadReport()
    pieces: Dict[str, List[_Piece]] = {}
    fixups: List[Callable[[], None]] = []
    for key in sorted(target):
        value, md = target[key], saved.get(key)
        if not isinstance(md, TensorStorageMetadata):
            report.fresh.append(key)
            continue
        weight_key = key[len(OPTIMIZER_PREFIX):].rsplit("/", 1)[0] if key.startswith(OPTIMIZER_PREFIX) else None
        weight, saved_weight = target.get(weight_key), saved.get(weight_key)
        if weight_key and value.dim() == 1 and weight is not None and weight.dim() == 2:  # row-wise state
            if isinstance(saved_weight, TensorStorageMetadata) and saved_weight.size[1] != weight.size(1):
                report.fresh.append(key)
                continue
            mapped = None
            if isinstance(value, ShardedTensor) and isinstance(weight, ShardedTensor) and isinstance(saved_weight, TensorStorageMetadata):
                mapped = _rowwise_pieces(value, weight, md, saved_weight)
            if mapped is None:
                report.skipped.append(key)
                continue
            pieces[key], more, approximate = mapped
            fixups += more
            if approximate:
                report.approximate.append(key)
            elif tuple(md.size) != tuple(value.size()):
                report.resized.append(key)
        elif value.dim() == len(md.size) and tuple(md.size[1:]) == tuple(value.size()[1:]):
            pieces[key] = _local_chunks(value)  # DCP reads the overlap: rows a table gained stay fresh
            if tuple(md.size) != tuple(value.size()):
                report.resized.append(key)
        else:  # a different embedding dimension: a new table
            report.fresh.append(key)
    with torch.no_grad():
        dcp.load({}, storage_reader=reader, planner=_PiecesPlanner(pieces))
        for fix in fixups:
            fix()
    report.read_from = dict(sorted(reader.read_from.items()))
    return report
