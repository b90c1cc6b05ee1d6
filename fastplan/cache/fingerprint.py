"""Everything that decides a plan, as canonical JSON: its sha256 is the cache key, and per-table
digests let ranks name the first table whose inputs differ."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import msgspec
import torch
from torch import nn

from fastplan.planner.tables import ShardedModule, shardable_parameters

# The files whose code decides a plan; any edit to them gives new keys.
SOURCE_DIR = Path(__file__).resolve().parent.parent / "planner"
_DISTRIBUTIONS = {
    "torch": ("torch",), "torchrec": ("torchrec",), "fbgemm_gpu": ("fbgemm-gpu", "fbgemm-gpu-cpu"),
    "ortools": ("ortools",), "numpy": ("numpy",), "msgspec": ("msgspec",),
}


def source_digest(files: List[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _version(names: tuple) -> Optional[str]:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=None)
def code_versions() -> Dict[str, Optional[str]]:
    """fastplan's version and planner source digest, and the versions of the libraries plans depend on."""
    from fastplan import __version__

    out = {name: _version(dists) for name, dists in _DISTRIBUTIONS.items()}
    out.update(fastplan=__version__, fastplan_source=source_digest(list(SOURCE_DIR.glob("*.py"))),
               python=platform.python_version())
    return out


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def canonical_hook(obj: Any) -> Any:
    """JSON form of what msgspec cannot encode itself: objects by class and state, never by id."""
    if isinstance(obj, functools.partial):  # cheap checks first: torch's isinstance checks cost ~10 us
        return {"__partial__": _qualname(obj.func)}
    if isinstance(obj, type):
        return _qualname(obj)
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": [str(obj.dtype), list(obj.shape)]}
    if isinstance(obj, nn.Module):
        return _qualname(type(obj))
    if callable(obj) and hasattr(obj, "__qualname__"):
        return _qualname(obj)
    state = {k: v for k, v in vars(obj).items() if not k.startswith("__")} if hasattr(obj, "__dict__") else {}
    for slot in getattr(type(obj), "__slots__", ()):
        if hasattr(obj, slot):
            state[slot] = getattr(obj, slot)
    return {"__type__": _qualname(type(obj)), "state": state}


_ENCODER = msgspec.json.Encoder(enc_hook=canonical_hook, order="sorted")
canonical_json: Callable[[Any], bytes] = _ENCODER.encode


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class PlanInputs:
    """Canonical JSON of the inputs shared by all tables (versions, topology, reservation, batch size,
    sharders, sharded modules, search settings) and of each table's own (config, tensor, constraint)."""

    shared: bytes  # {section: value}
    tables: bytes  # [TableInputs, ...] in planning order
    names: Tuple[str, ...] = dataclasses.field(default=(), compare=False)  # every shardable table's name

    @functools.cached_property
    def key(self) -> str:
        return _digest(self.shared + b"\n" + self.tables)

    def section_digests(self) -> Dict[str, str]:
        return {name: _digest(canonical_json(v)) for name, v in msgspec.json.decode(self.shared).items()}

    def table_digests(self) -> Dict[str, str]:
        return {doc["fqn"]: _digest(canonical_json(doc)) for doc in msgspec.json.decode(self.tables)}

    def to_dict(self) -> Dict[str, Any]:
        return {"shared": msgspec.json.decode(self.shared), "tables": msgspec.json.decode(self.tables)}

    def to_raw(self) -> msgspec.Raw:
        """The JSON of `to_dict()`, without decoding it (for plan files)."""
        return msgspec.Raw(b'{"shared":' + self.shared + b',"tables":' + self.tables + b"}")

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "PlanInputs":
        return cls(canonical_json(data["shared"]), canonical_json(data["tables"]))


def _configs(module: nn.Module) -> Dict[str, Any]:
    """The module's table configs by name."""
    configs: Dict[str, Any] = {}
    for getter in ("embedding_bag_configs", "embedding_configs"):
        fn = getattr(module, getter, None)
        if callable(fn):
            configs.update((c.name, c) for c in fn())
    return configs


class TableInputs(msgspec.Struct):
    """One table's own inputs: its config (a dataclass, encoded field by field), tensor and constraint.
    What its module and sharder decide is in the shared `modules` section."""

    fqn: str
    config: Any
    dtype: str
    shape: List[int]
    optimizer: Any
    constraint: Any


def plan_inputs(
    modules: List[ShardedModule], constraints: Dict[str, Any], exact_order: bool, topology: Any,
    reservation: Dict[str, Any], batch_size: int, sharders: List[Any], search_config: Any,
    timeout_seconds: Optional[float], enumeration: Optional[Dict[str, Any]] = None,
) -> PlanInputs:
    """Read from the module itself, not from `collect_tables`, whose output is a function of these:
    a warm start never builds the tables."""
    rows, names = [], []
    for m in modules:
        configs = _configs(m.module)
        for name, param in shardable_parameters(m.sharder, m.module).items():
            names.append(name)
            rows.append(TableInputs(
                f"{m.path}.{name}" if m.path else name, configs.get(name), str(param.dtype), list(param.shape),
                getattr(param, "_optimizer_classes", None), constraints.get(name),
            ))
    shared = {
        "versions": code_versions(), "topology": topology, "reservation": reservation, "batch_size": batch_size,
        "sharders": sorted(sharders, key=canonical_json), "search": search_config, "timeout_seconds": timeout_seconds,
        "modules": [{"path": m.path, "type": type(m.module), **m.facts()} for m in modules], "exact_order": exact_order,
        "enumerator": enumeration or {},  # the enumerator's own topology / batch size, where not the planner's
    }
    return PlanInputs(canonical_json(shared), canonical_json(rows), tuple(names))


# TorchRec reservations whose result depends only on their settings, the topology, the batch size,
# the tables, the constraints and the module's parameter and buffer bytes.
_KNOWN_RESERVATIONS = (
    "HeuristicalStorageReservation",
    "FixedPercentageStorageReservation",
    "FixedAbsoluteStorageReservation",
)
_SETTINGS = ("_percentage", "_hbm_reserved_bytes", "_parameter_multiplier", "_dense_tensor_estimate")


def _dense_bytes(module: nn.Module, shardable: set) -> List[int]:
    """(parameter bytes, buffer bytes) outside the shardable modules (each tensor once): what TorchRec's
    reservations take as dense storage. The tables themselves are in the per-table inputs."""
    seen_modules, seen_tensors, stack = set(), set(), [module]
    total = [0, 0]
    while stack:
        m = stack.pop()
        if id(m) in seen_modules or id(m) in shardable:
            continue
        seen_modules.add(id(m))
        for i, tensors in enumerate((m._parameters, m._buffers)):
            for x in tensors.values():
                if x is not None and id(x) not in seen_tensors:
                    seen_tensors.add(id(x))
                    total[i] += x.numel() * x.element_size()
        stack.extend(c for c in m._modules.values() if c is not None)
    return total


def reservation_inputs(reservation: Any, module: nn.Module, sharded: set, reserve: Callable[..., Any],
                       sharders: List[Any]) -> Dict[str, Any]:
    """What decides the storage reservation. For TorchRec's own reservations that is their settings
    plus the dense parameter/buffer bytes (cheap: no reservation runs on a warm start); for any
    other reservation, its result (it runs)."""
    kind = _qualname(type(reservation))
    if type(reservation).__name__ in _KNOWN_RESERVATIONS and type(reservation).__module__.startswith("torchrec."):
        settings = {k: v for k, v in vars(reservation).items() if k in _SETTINGS}
        params, buffers = _dense_bytes(module, sharded)
        return {"type": kind, "settings": settings, "dense_param_bytes": params, "dense_buffer_bytes": buffers}
    return {"type": kind, "hbm_ddr_ssd": reserve(module, sharders).tolist()}
