"""Sparse-feature input dist for BLS: a KJT's lengths and values go to each rank in one self-sized message.

TorchRec's `KJTAllToAll` runs two all-to-alls per batch: the split sizes first (so that receive
buffers can be sized), then lengths and values. A BLS message carries its own size, so the first
exchange (a round trip, and a lag stage of the pipeline) is not needed: `SelfSizedKJTAllToAll`
sends (batch size, lengths, values[, weights]) to each peer in one block and builds the same
`KeyedJaggedTensor` TorchRec would, with TorchRec's own `dist_init` and recat, so lookups and
outputs stay bit-identical. `self_sized_input_dist(sharded_module, group)` swaps it in for every
`KJTAllToAll` of the module on `group` (KJTs with a variable batch size per feature keep TorchRec's
two all-to-alls).
"""

from __future__ import annotations

import itertools
import struct
from typing import List, Optional

import numpy as np
import torch
from torch import nn
from torchrec.distributed.dist_data import KJTAllToAll, KJTAllToAllTensorsAwaitable, _get_recat
from torchrec.distributed.types import Awaitable
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from fastplan.comm.bls.collective import BLSError, BLSWork, _bytes_of

_HEADER = struct.Struct("<qqq")  # batch size, number of lengths, number of values


class SelfSizedKJTAllToAll(nn.Module):
    """`KJTAllToAll` (same arguments, same result) in one self-sized all-to-all over a BLS group."""

    def __init__(self, original: KJTAllToAll, group) -> None:
        super().__init__()
        self.original = original  # what variable-batch-per-feature KJTs still go through
        self.group = group
        self.splits: List[int] = list(original._splits)
        self.cumsum: List[int] = list(original._splits_cumsum)
        self.stagger: int = original._stagger

    def forward(self, kjt: KeyedJaggedTensor) -> Awaitable[Awaitable[KeyedJaggedTensor]]:
        if kjt.variable_stride_per_key():
            return self.original(kjt)
        keys, cumsum = kjt.keys(), self.cumsum
        if len(keys) != cumsum[-1]:
            raise ValueError(f"rank {self.group.rank()}: KJT has {len(keys)} keys, this input dist sends {cumsum[-1]}")
        stride = kjt.stride()
        tensors = [kjt.lengths(), kjt.values()] + ([kjt.weights()] if kjt.weights_or_none() is not None else [])
        per_key = kjt.length_per_key()
        value_cumsum = [0] + list(itertools.accumulate(sum(per_key[a:b]) for a, b in zip(cumsum, cumsum[1:])))
        sizes = [t.element_size() for t in tensors]
        views = [_bytes_of(t) for t in tensors]
        blocks, input_splits = [], [[s * stride for s in self.splits], np.diff(value_cumsum).tolist()]
        for p in range(len(self.splits)):
            lo, hi = cumsum[p] * stride, cumsum[p + 1] * stride
            v_lo, v_hi = value_cumsum[p], value_cumsum[p + 1]
            parts = [_HEADER.pack(stride, hi - lo, v_hi - v_lo), views[0][lo * sizes[0] : hi * sizes[0]]]
            parts += [view[v_lo * size : v_hi * size] for view, size in zip(views[1:], sizes[1:])]
            blocks.append(b"".join(parts))
        work = self.group.post_blocks(blocks)
        me = self.group.rank()
        return _Blocks(work, self, type(kjt), keys[cumsum[me] : cumsum[me + 1]], tensors, input_splits)


class _Blocks(Awaitable[KeyedJaggedTensor]):
    """Waits for every rank's block, checks it and joins them into TorchRec's all-to-all outputs."""

    def __init__(self, work: BLSWork, dist: SelfSizedKJTAllToAll, kjt_type, keys, tensors, input_splits) -> None:
        super().__init__()
        self.work, self.dist, self.kjt_type, self.keys = work, dist, kjt_type, keys
        self.dtypes = [t.dtype for t in tensors]
        self.input_splits = input_splits + input_splits[1:2] * (len(tensors) - 2)  # weights split like values

    def _wait_impl(self) -> "_Arrived":
        self.work.wait()
        group, me = self.dist.group, self.dist.group.rank()
        features = self.dist.splits[me]
        sizes = [torch.empty(0, dtype=d).element_size() for d in self.dtypes]
        row = sum(sizes[1:])  # bytes per value: its id and its weight
        strides, counts, parts = [], [], [[] for _ in self.dtypes]
        for q, block in enumerate(self.work.output):
            bad = f"rank {me}: peer rank {q} sent a malformed block for iteration {self.work.iteration} of channel {self.work.channel.name}"
            if block.nbytes < _HEADER.size:
                raise BLSError(f"{bad}: {block.nbytes} bytes, shorter than its header")
            stride, n_lengths, n_values = _HEADER.unpack_from(block)
            if stride < 0 or n_lengths != features * stride or n_values < 0 \
                    or block.nbytes != _HEADER.size + n_lengths * sizes[0] + n_values * row:
                raise BLSError(f"{bad}: batch size {stride}, {n_lengths} lengths for {features} features, "
                               f"{n_values} values in {block.nbytes} bytes")
            data = np.frombuffer(block, np.uint8, offset=_HEADER.size)
            ends = list(itertools.accumulate([n_lengths * sizes[0]] + [n_values * s for s in sizes[1:]]))
            for part, a, b in zip(parts, [0] + ends, ends):
                part.append(data[a:b])
            lengths = data[: ends[0]].view(_NUMPY[self.dtypes[0]])
            if n_lengths and (lengths.min() < 0 or lengths.sum() != n_values):
                raise BLSError(f"{bad}: its lengths add up to {lengths.sum()} (min {lengths.min()}), it sent {n_values} values")
            strides.append(stride)
            counts.append((n_lengths, n_values))
        tensors = [_joined(p, d) for p, d in zip(parts, self.dtypes)]
        output_splits = [[c[0] for c in counts]] + [[c[1] for c in counts]] * (len(tensors) - 1)
        recat = _get_recat(local_split=features, num_splits=len(self.dist.splits), stagger=self.dist.stagger,
                           device=torch.device("cpu"), batch_size_per_rank=strides)
        return _Arrived(self, tensors, output_splits, recat, strides)


class _Arrived(KJTAllToAllTensorsAwaitable):
    """The tensors all-to-all's awaitable, already complete: TorchRec reads its splits, recat and batch
    sizes into the sharding context (`_set_sharding_context_intra_a2a`), as after its own exchange."""

    def __init__(self, blocks: _Blocks, tensors, output_splits, recat: Optional[torch.Tensor], strides) -> None:
        Awaitable.__init__(self)  # not the parent's __init__: that one starts all-to-alls
        labels = ["lengths", "values", "weights"][: len(tensors)]
        self._workers = len(strides)
        self._keys = blocks.keys
        self._kjt_type = blocks.kjt_type
        self._tensors = tensors
        self._input_splits = dict(zip(labels, blocks.input_splits))
        self._output_splits = dict(zip(labels, output_splits))
        self._recat = recat
        self._stride_per_rank = strides
        self._stagger = blocks.dist.stagger

    def clear_inputs(self) -> int:
        return 0

    def _wait_impl(self) -> KeyedJaggedTensor:
        return self._kjt_type.dist_init(
            keys=self._keys, tensors=self._tensors, variable_stride_per_key=False, num_workers=self._workers,
            recat=self._recat, stride_per_rank=self._stride_per_rank, stagger=self._stagger,
        )


def _joined(parts: List[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    """The bytes of `parts` one after another, as a tensor of `dtype`."""
    joined = np.concatenate(parts)
    return torch.from_numpy(joined).view(dtype) if joined.size else torch.empty(0, dtype=dtype)


_NUMPY = {torch.int32: np.int32, torch.int64: np.int64}  # KJT lengths dtypes


def self_sized_input_dist(sharded: nn.Module, group) -> None:
    """Replace every `KJTAllToAll` on `group` inside `sharded` (a sharded TorchRec module) by a
    `SelfSizedKJTAllToAll`, now and whenever the module creates its input dists (on its first batch)."""
    if group.size() < 2:
        return
    _swap(sharded, group)
    create = getattr(sharded, "_create_input_dist", None)
    if create is not None and not getattr(create, "self_sized", False):

        def create_then_swap(*args, **kwargs):
            create(*args, **kwargs)
            _swap(sharded, group)

        create_then_swap.self_sized = True
        sharded._create_input_dist = create_then_swap


def _swap(module: nn.Module, group) -> None:
    # TorchRec keeps a sharded EBC's input dists in a plain list, not among its submodules.
    roots = [module] + list(getattr(module, "_input_dists", []))
    for parent in [m for root in roots for m in root.modules()]:
        for name, child in list(parent.named_children()):
            if isinstance(child, KJTAllToAll) and child._pg is group:
                setattr(parent, name, SelfSizedKJTAllToAll(child, group))
