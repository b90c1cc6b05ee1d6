"""`BLSInferencePipeline`: sharded inference with every all-to-all wait deferred by `lag` batches.

Per step s (batch indices; L = lag), in the same order on every rank:
input dist of batch s, splits of batch s - L, lookup + output dist of batch s - 2L, dense part of
batch s - 3L. A fast rank keeps issuing and serving later batches while a slow peer catches up;
with L = 0 this is exactly the stock sharded forward.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

Batch = Tuple[Any, KeyedJaggedTensor]  # (dense input, sparse features)


class BLSInferencePipeline:
    """Runs `dense(dense_input, sharded_ebc(features))` over batches with lagged waits.

    Args:
        sparse: a sharded EmbeddingBagCollection (e.g. `dmp.module.sparse`).
        dense: `dense(dense_input, keyed_tensor) -> output`, the rest of the model.
        lag: batches a rank may run ahead of the slowest peer (0: synchronous).
        group: the BLS process group the model was sharded on, if any: stage calls are tagged with
            their batch so that the lag counts batches.
        before_lookup: called with the batch index right before its lookup (benchmarks inject work here).
    """

    def __init__(
        self,
        sparse: nn.Module,
        dense: Callable[[Any, KeyedTensor], Any],
        lag: int,
        group: Any = None,
        before_lookup: Optional[Callable[[int], None]] = None,
    ) -> None:
        if lag < 0:
            raise ValueError(f"lag must be >= 0, got {lag}")
        for stage in ("create_context", "input_dist", "compute_and_output_dist"):
            if not hasattr(sparse, stage):
                raise TypeError(f"{type(sparse).__name__} is not a sharded module (no {stage}()); shard it first")
        self.sparse = sparse
        self.dense = dense
        self.lag = lag
        self.group = group if hasattr(group, "batch") else None
        self.before_lookup = before_lookup

    def _tagged(self, b: int):
        return self.group.batch(b) if self.group is not None else nullcontext()

    def run(self, batches: Iterable[Batch]) -> Iterator[Any]:
        """Yield the output of every batch, in order."""
        L = self.lag
        source = iter(batches)
        dense_in: Dict[int, Any] = {}
        ctx: Dict[int, Any] = {}
        first: Dict[int, Any] = {}  # input dist posted, splits pending
        second: Dict[int, Any] = {}  # splits done, lengths/values pending
        pooled: Dict[int, Any] = {}  # lookup done, output dist pending
        n = None
        s = 0
        while n is None or s < n + 3 * L:
            if n is None:
                batch = next(source, None)
                if batch is None:
                    n = s
                else:
                    dense_in[s], features = batch
                    ctx[s] = self.sparse.create_context()
                    with self._tagged(s):
                        first[s] = self.sparse.input_dist(ctx[s], features)
            b = s - L
            if b in first:
                with self._tagged(b):
                    second[b] = first.pop(b).wait()
            b = s - 2 * L
            if b in second:
                with self._tagged(b):
                    features = second.pop(b).wait()
                    if self.before_lookup is not None:
                        self.before_lookup(b)
                    pooled[b] = self.sparse.compute_and_output_dist(ctx[b], features)
            b = s - 3 * L
            if b in pooled:
                with self._tagged(b):
                    kt = pooled.pop(b).wait()
                del ctx[b]
                if self.group is not None:
                    self.group.end_batch(b)
                yield self.dense(dense_in.pop(b), kt)
            s += 1
        if self.group is not None:
            self.group.flush()  # our last blocks reach slower peers before anyone tears down
