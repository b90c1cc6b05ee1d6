"""Find the shardable tables of a module and the per-table facts that decide their cost."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torchrec.distributed.planner.constants import BATCH_SIZE, NUM_POOLINGS, POOLING_FACTOR
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.planner.utils import build_sharder_data, sharder_name
from torchrec.distributed.types import ModuleSharder, ShardingType
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface, EmbeddingCollectionInterface
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection

from fastplan.planner.errors import ConstraintError

SHARDING_TYPES = (
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
)
# Kernels the vectorized cost model knows; anything else goes through TorchRec's own enumerator.
FAST_KERNELS = ("dense", "fused", "fused_uvm", "fused_uvm_caching")
# Kernels TorchRec offers only when asked for by name (KV / virtual tables).
GUARDED_KERNELS = {"key_value", "ssd_virtual_table", "dram_virtual_table", "dram_ssd_virtual_table"}
KNOWN_SHARDING_TYPES = set(SHARDING_TYPES) | {ShardingType.GRID_SHARD.value}
# Row-based sharding of feature-processed modules is guarded in TorchRec (position-weighted FPs).
FP_GUARDED_TYPES = {ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value}


@dataclass(slots=True)
class TableInfo:
    """One shardable embedding table and everything about it that enters the cost model."""

    name: str
    path: str
    module: nn.Module
    tensor: torch.Tensor
    rows: int
    dim: int
    element_size: int
    is_pooled: bool
    is_weighted: bool
    batch_inputs: float
    batch_outputs: float
    sharding_types: List[str]
    kernels: Dict[str, List[str]]
    constraint: Optional[ParameterConstraints]
    fused_params: Dict[str, object]
    qcomm_dtype_sizes: Dict[str, Tuple[float, float]]
    storage_usage_type: object
    input_lengths: List[float] = field(default_factory=list)

    @property
    def cache_params(self):
        return self.constraint.cache_params if self.constraint else None

    @property
    def cache_load_factor(self) -> Optional[float]:
        """Load factor the perf model sees: the table's cache params, else the sharder's."""
        cp = self.cache_params
        if cp is not None and cp.load_factor is not None:
            return cp.load_factor
        return self.fused_params.get("cache_load_factor")  # type: ignore[return-value]

    @property
    def prefetch_pipeline(self) -> bool:
        cp = self.cache_params
        if cp is not None and cp.prefetch_pipeline:
            return True
        return bool(self.fused_params.get("prefetch_pipeline", False))

    @property
    def output_data_type_size(self) -> float:
        dtype = self.constraint.output_dtype if self.constraint else None
        return DATA_TYPE_NUM_BITS[dtype] / 8 if dtype else float(self.element_size)

    @property
    def col_wise_shard_dim(self) -> Optional[int]:
        return self.constraint.min_partition if self.constraint else None

    def comm_data_type_sizes(self) -> Tuple[float, float, float, float]:
        """(fwd a2a, bwd a2a, fwd reduce-scatter, bwd reduce-scatter) bytes per element."""
        size = float(self.element_size)
        fa2a = ba2a = fsr = bsr = size
        q = self.qcomm_dtype_sizes
        if self.is_pooled and "POOLED_EMBEDDINGS_ALL_TO_ALL" in q:
            fa2a, ba2a = q["POOLED_EMBEDDINGS_ALL_TO_ALL"]
        if not self.is_pooled and "SEQUENCE_EMBEDDINGS_ALL_TO_ALL" in q:
            fa2a, ba2a = q["SEQUENCE_EMBEDDINGS_ALL_TO_ALL"]
        if self.is_pooled and "POOLED_EMBEDDINGS_REDUCE_SCATTER" in q:
            fsr, bsr = q["POOLED_EMBEDDINGS_REDUCE_SCATTER"]
        return fa2a, ba2a, fsr, bsr


def needs_torchrec_estimator(tables: List[TableInfo]) -> bool:
    """Whether any of the tables has features the vectorized model does not re-derive."""
    for t in tables:
        c = t.constraint
        if c is not None and (c.key_value_params or c.use_virtual_table or c.device_group
                              or (c.cache_params is not None and c.cache_params.stats is not None)):
            return True
    kernel_lists = {id(t.kernels): t.kernels for t in tables}.values()  # a module's unconstrained tables share one
    return any(k not in FAST_KERNELS for kernels in kernel_lists for ks in kernels.values() for k in ks)


def _filter_kernels(allowed: List[str], constraint: Optional[ParameterConstraints], has_ssd: bool) -> List[str]:
    """TorchRec's enumerator rules: guarded kernels only when asked for by name, key-value only
    with an SSD tier, dense only where fused is unavailable."""
    if constraint and constraint.compute_kernels:
        wanted = list(constraint.compute_kernels)
    else:
        wanted = [k for k in allowed if k not in GUARDED_KERNELS]
    kernels = [k for k in allowed if k in wanted]
    if "key_value" in kernels and not has_ssd:
        kernels.remove("key_value")
    if "dense" in kernels and "fused" in kernels:
        kernels.remove("dense")
    return kernels


def _sharding_types(allowed: List[str], constraint: Optional[ParameterConstraints], feature_processed: bool) -> List[str]:
    """TorchRec's rules: grid sharding and (for feature-processed modules) row-wise sharding only
    when a constraint names them."""
    if constraint and constraint.sharding_types:
        return [t for t in allowed if t in set(constraint.sharding_types) and t in SHARDING_TYPES]
    return [t for t in allowed if t in SHARDING_TYPES and not (feature_processed and t in FP_GUARDED_TYPES)]


def _batch_inputs_outputs(
    constraint: Optional[ParameterConstraints], batch_size: int, is_pooled: bool
) -> Tuple[List[float], float, float]:
    input_lengths = list(constraint.pooling_factors) if constraint else [POOLING_FACTOR]
    n = len(input_lengths)
    num_poolings = list(constraint.num_poolings) if constraint and constraint.num_poolings else [NUM_POOLINGS] * n
    batch_sizes = list(constraint.batch_sizes) if constraint and constraint.batch_sizes else [batch_size] * n
    if not (len(num_poolings) == len(batch_sizes) == n):
        raise ConstraintError(
            "pooling_factors, num_poolings and batch_sizes must have the same length "
            f"(got {n}, {len(num_poolings)}, {len(batch_sizes)})"
        )
    batch_inputs = sum(x * y * z for x, y, z in zip(input_lengths, num_poolings, batch_sizes))
    if is_pooled:
        batch_outputs = sum(min(1.0, il) * x * y for il, x, y in zip(input_lengths, num_poolings, batch_sizes))
    else:
        batch_outputs = batch_inputs
    return input_lengths, batch_inputs, batch_outputs


def sharded_modules(module: nn.Module, sharders: List[ModuleSharder[nn.Module]],
                    exact_order: bool = False) -> Iterator[Tuple[str, nn.Module, ModuleSharder[nn.Module]]]:
    """(path, submodule, its sharder) for each submodule a sharder shards, in the order TorchRec's
    `EmbeddingEnumerator` visits them (`exact_order` is its `use_exact_enumerate_order`)."""
    sharder_map = {sharder_name(s.module_type): s for s in sharders}
    stack: List[Tuple[str, nn.Module]] = [("", module)]
    while stack:
        path, child = stack.pop(0) if exact_order else stack.pop()
        sharder = sharder_map.get(sharder_name(type(child)))
        if sharder is None:
            stack.extend(((f"{path}.{n}" if path else n), m) for n, m in child.named_children())
        else:
            yield path, child, sharder


@dataclass
class ShardedModule:
    """A submodule a sharder shards, and the facts about it that every one of its tables shares."""

    path: str
    module: nn.Module
    sharder: ModuleSharder[nn.Module]
    module_type: str  # the sharder's name for it, e.g. "EmbeddingBagCollection"
    offered: Dict[str, List[str]]  # sharding type the sharder allows -> kernels it offers
    pooled: bool
    weighted: Optional[bool]  # the module's own is_weighted(); None: decided per table by constraints
    feature_processed: List[str]  # tables with a feature processor
    fused_params: Dict[str, object]
    qcomm_dtype_sizes: Dict[str, Tuple[float, float]]
    storage_usage_type: object

    @classmethod
    def of(cls, path: str, module: nn.Module, sharder: ModuleSharder[nn.Module], compute_device: str) -> "ShardedModule":
        data = build_sharder_data(sharder)
        weighted = (
            module.is_weighted()
            if isinstance(module, EmbeddingBagCollectionInterface) and callable(getattr(module, "is_weighted", None))
            else None
        )
        processors = getattr(getattr(module, "_feature_processor", None), "feature_processor_modules", None)
        return cls(
            path=path, module=module, sharder=sharder, module_type=sharder_name(type(module)),
            offered={t: sharder.compute_kernels(t, compute_device) for t in sharder.sharding_types(compute_device)},
            pooled=module_pooled(module, path), weighted=weighted,
            feature_processed=list(processors.keys()) if isinstance(processors, nn.ModuleDict) else [],
            # shared by the module's tables (read-only downstream), not copied per table
            fused_params=dict(data.fused_params or {}), qcomm_dtype_sizes=dict(data.qcomm_dtype_sizes or {}),
            storage_usage_type=data.storage_usage_type,
        )

    def facts(self) -> Dict[str, object]:
        """What decides its tables' options and costs, besides each table's own inputs."""
        return {k: v for k, v in vars(self).items() if k not in ("path", "module", "sharder")}


def collect_tables(
    module: nn.Module,
    sharders: List[ModuleSharder[nn.Module]],
    compute_device: str,
    batch_size: Optional[int] = None,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
    has_ssd: bool = True,
    exact_order: bool = False,
) -> List[TableInfo]:
    """The module's shardable tables, in the order TorchRec's `EmbeddingEnumerator` visits them
    (its planner's tie breaks depend on that order). Tables whose constraint names another
    `device_group` are left out, as TorchRec does."""
    batch_size = batch_size or BATCH_SIZE
    constraints = constraints or {}
    tables: List[TableInfo] = []
    for path, child, sharder in sharded_modules(module, sharders, exact_order):
        m = ShardedModule.of(path, child, sharder, compute_device)
        allowed_types = list(m.offered)
        guarded = "FeatureProcessedEmbeddingBagCollection" in m.module_type

        def options(c: Optional[ParameterConstraints]) -> Dict[str, List[str]]:
            types = _sharding_types(allowed_types, c, guarded)
            return {t: ks for t in types if (ks := _filter_kernels(m.offered[t], c, has_ssd))}

        unconstrained = options(None)
        unconstrained_types = [t for t in SHARDING_TYPES if t in unconstrained]
        default_io = _batch_inputs_outputs(None, batch_size, m.pooled)
        processed = set(m.feature_processed)
        for name, param in shardable_parameters(sharder, child).items():
            c = constraints.get(name)
            if c is not None and c.device_group and c.device_group != compute_device:
                continue
            kernels = unconstrained if c is None else options(c)
            if not kernels:
                raise ConstraintError(
                    f"table '{name}' ({path}): no sharding type / compute kernel left after constraints "
                    f"(sharder offers {allowed_types} on {compute_device}; constraint asks "
                    f"sharding_types={c.sharding_types if c else None}, compute_kernels={c.compute_kernels if c else None})"
                )
            is_weighted = m.weighted if m.weighted is not None else bool(c and c.is_weighted)
            input_lengths, b_in, b_out = default_io if c is None else _batch_inputs_outputs(c, batch_size, m.pooled)
            tables.append(
                TableInfo(
                    name=name,
                    path=path,
                    module=child,
                    tensor=param,
                    rows=int(param.shape[0]),
                    dim=int(param.shape[1]),
                    element_size=param.element_size(),
                    is_pooled=m.pooled,
                    is_weighted=bool(is_weighted or name in processed),
                    batch_inputs=b_in,
                    batch_outputs=b_out,
                    sharding_types=unconstrained_types if c is None else [t for t in SHARDING_TYPES if t in kernels],
                    kernels=kernels,
                    constraint=c,
                    fused_params=m.fused_params,
                    qcomm_dtype_sizes=m.qcomm_dtype_sizes,
                    storage_usage_type=m.storage_usage_type,
                    input_lengths=input_lengths,
                )
            )
    return tables


# TorchRec's stock sharders list a collection's tables as the parameters of one container of
# leaf embedding modules; walking the container directly is ~10x faster than named_parameters().
_CONTAINERS = {
    EmbeddingBagCollectionSharder.shardable_parameters: "embedding_bags",
    EmbeddingCollectionSharder.shardable_parameters: "embeddings",
}


def shardable_parameters(sharder: ModuleSharder[nn.Module], module: nn.Module) -> Dict[str, nn.Parameter]:
    """`sharder.shardable_parameters(module)`."""
    container = _CONTAINERS.get(getattr(type(sharder), "shardable_parameters", None))
    leaves = getattr(module, container, None) if container else None
    if not isinstance(leaves, nn.ModuleDict):
        return sharder.shardable_parameters(module)
    out: Dict[str, nn.Parameter] = {}
    seen = set()  # named_parameters() yields each tensor once (and so each module's tensors once)
    for name, leaf in leaves._modules.items():
        if leaf is None:
            continue
        if leaf._modules:
            return sharder.shardable_parameters(module)
        for param in leaf._parameters.values():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                out[name] = param
    return out


@functools.lru_cache(maxsize=None)
def _unpooled_type(cls: type) -> bool:
    return issubclass(cls, (EmbeddingCollectionInterface, ManagedCollisionEmbeddingCollection))


def module_pooled(module: nn.Module, path: str) -> bool:
    """`ShardingOption.module_pooled(module, path)`, walking submodules without building their names."""
    if _unpooled_type(type(module)):
        return False
    stack, seen = [module], {id(module)}
    while stack:
        children = [c for c in stack.pop()._modules.values() if c is not None]
        for cls in set(map(type, children)):
            if _unpooled_type(cls) and any(path in name for c in children if type(c) is cls for name, _ in c.named_parameters()):
                return False
        for c in children:
            if c._modules and id(c) not in seen:  # leaves have nothing below them
                seen.add(id(c))
                stack.append(c)
    return True


def shardable_names(module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> List[str]:
    """Names of every shardable table, whatever its device group."""
    return [name for _, child, sharder in sharded_modules(module, sharders) for name in shardable_parameters(sharder, child)]


def unknown_constraint_tables(constraints: Optional[Dict[str, ParameterConstraints]], names: List[str]) -> List[str]:
    """Constraint keys that name no table of the module. TorchRec ignores them (one constraints
    dict can serve several models); the planner warns once, naming them."""
    return sorted(set(constraints or {}) - set(names))


def check_constraint_values(constraints: Optional[Dict[str, ParameterConstraints]]) -> None:
    """Reject constraints that name sharding types or compute kernels that do not exist."""
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel

    known_kernels = {k.value for k in EmbeddingComputeKernel}
    for name, c in sorted((constraints or {}).items()):
        for st in c.sharding_types or []:
            if st not in KNOWN_SHARDING_TYPES:
                raise ConstraintError(
                    f"table '{name}': unknown sharding type '{st}' (known: {sorted(KNOWN_SHARDING_TYPES)})"
                )
        for k in c.compute_kernels or []:
            if k not in known_kernels:
                raise ConstraintError(f"table '{name}': unknown compute kernel '{k}' (known: {sorted(known_kernels)})")
