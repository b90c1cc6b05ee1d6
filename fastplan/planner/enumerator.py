"""`FastEnumerator`: TorchRec's `EmbeddingEnumerator` with every option of every table costed in
bulk. `search_space()` gives the options as arrays for the search; `enumerate()` gives the same
options as TorchRec `ShardingOption`s, so it also works as a drop-in enumerator for TorchRec's
own planner. Anything the vectorized model does not re-derive is costed by TorchRec's estimators.
"""

from __future__ import annotations

from typing import Callable, List, Optional

from torch import nn
from torchrec.distributed.planner.constants import DEFAULT_PERF_ESTIMATOR
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.estimator import EmbeddingPerfEstimatorFactory
from torchrec.distributed.planner.types import ShardingOption
from torchrec.distributed.types import ModuleSharder

from fastplan.planner.cost import CostModel, fast_model_applies, storage_usage_supported
from fastplan.planner.search_space import SearchSpace, build_search_space, from_sharding_options
from fastplan.planner.tables import TableInfo, collect_tables, needs_torchrec_estimator


class FastEnumerator(EmbeddingEnumerator):
    """Same arguments as `EmbeddingEnumerator`."""

    def __init__(self, topology, batch_size, constraints=None, estimator=None, use_exact_enumerate_order=False) -> None:
        super().__init__(topology, batch_size, constraints, estimator, use_exact_enumerate_order)
        self._topology = topology
        self._custom_estimator = estimator is not None
        self._space: Optional[SearchSpace] = None
        self._options: Optional[List[ShardingOption]] = None
        self._deferred: Optional[Callable[[], None]] = None

    def defer(self, build: Callable[[], None]) -> None:
        """The next read of `last_stored_search_space` first calls `build` (which enumerates):
        a planner serving a cached plan enumerates only if someone asks."""
        self._space, self._options, self._deferred = None, None, build

    def collect(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> List[TableInfo]:
        """The module's shardable tables and what decides their cost (cheap: no costing)."""
        return collect_tables(
            module, sharders, self._compute_device, self._batch_size, self._constraints, self._has_ssd,
            exact_order=self._use_exact_enumerate_order,
        )

    def search_space(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]],
                     tables: Optional[List[TableInfo]] = None) -> SearchSpace:
        tables = self.collect(module, sharders) if tables is None else tables
        topo = self._topology
        if self._fast_model_applies(tables):
            config = EmbeddingPerfEstimatorFactory.create(DEFAULT_PERF_ESTIMATOR, topology=topo, constraints=self._constraints).config
            space = build_search_space(tables, CostModel(topo, config))
        else:
            self._last_stored_module = None  # TorchRec's enumerate() would return its cached copy
            options = super().enumerate(module, sharders)
            space = from_sharding_options(tables, options, topo.world_size, topo.local_world_size, topo.intra_group_size)
        self._space, self._options, self._deferred = space, None, None
        return space

    def enumerate(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> List[ShardingOption]:
        self.search_space(module, sharders)
        return list(self.last_stored_search_space or [])

    @property
    def last_stored_search_space(self) -> Optional[List[ShardingOption]]:
        """The options of the last search space, built on first access (hashing, stats)."""
        if self._deferred is not None:
            build, self._deferred = self._deferred, None
            build()
        if self._space is None:
            return self._last_stored_search_space
        if self._options is None:
            from fastplan.planner.plan_builder import sharding_options

            self._options = sharding_options(self._space, self._batch_size)
        return self._options

    def _fast_model_applies(self, tables: List[TableInfo]) -> bool:
        topo = self._topology
        if self._custom_estimator:
            return False
        config = EmbeddingPerfEstimatorFactory.create(DEFAULT_PERF_ESTIMATOR, topology=topo, constraints=self._constraints).config
        custom_memory = topo._custom_topology_data is not None and topo._custom_topology_data.has_data(
            "hbm_cap" if topo.compute_device in ("cuda", "mtia") else "ddr_cap"
        )
        return (
            fast_model_applies(config)
            and not custom_memory
            and all(storage_usage_supported(t) for t in tables)
            and not needs_torchrec_estimator(tables)
        )
