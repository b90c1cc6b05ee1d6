"""A stable key (sha256 of a canonical JSON) for everything that decides a plan, and nothing else."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torchrec
from torchrec.distributed.planner.types import ParameterConstraints, Topology

from fastplan.planner.tables import TableInfo

COST_MODEL_VERSION = "fastplan-cost-1"  # bump when the cost model or search changes plans


def canonical(value: Any) -> Any:
    """JSON-able form with sorted keys; objects by class name and fields, never by id."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, np.generic):
        return canonical(value.item())
    if isinstance(value, np.ndarray):
        return [canonical(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((canonical(v) for v in value), key=json.dumps)
    if dataclasses.is_dataclass(value):
        return {"__type__": type(value).__name__, **canonical({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})}
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    state = {k: v for k, v in vars(value).items() if not k.startswith("__")} if hasattr(value, "__dict__") else str(value)
    return {"__type__": f"{type(value).__module__}.{type(value).__qualname__}", "state": canonical(state)}


def _feature_names(tables: List[TableInfo]) -> Dict[int, Dict[str, List[str]]]:
    """Feature names of every table, by module (one pass over each module's configs)."""
    out: Dict[int, Dict[str, List[str]]] = {}
    for t in tables:
        if id(t.module) in out:
            continue
        names: Dict[str, List[str]] = {}
        for getter in ("embedding_bag_configs", "embedding_configs"):
            configs = getattr(t.module, getter, None)
            if callable(configs):
                names.update((c.name, list(c.feature_names)) for c in configs())
        out[id(t.module)] = names
    return out


def _table(t: TableInfo, features: Dict[int, Dict[str, List[str]]]) -> List[Any]:
    optimizer = getattr(t.tensor, "_optimizer_classes", None)
    return [
        t.path, t.name, t.rows, t.dim, str(t.tensor.dtype), t.is_pooled, t.is_weighted,
        features[id(t.module)].get(t.name, []),
        None if optimizer is None else canonical(optimizer),
        t.kernels,  # sharding types and kernels left after constraints
    ]


def _topology(topo: Topology) -> Dict[str, Any]:
    return {
        "world_size": topo.world_size,
        "local_world_size": topo.local_world_size,
        "intra_group_size": topo.intra_group_size,
        "compute_device": topo.compute_device,
        "devices": [[d.storage.hbm, d.storage.ddr, d.storage.ssd] for d in topo.devices],
        "hbm_mem_bw": topo.hbm_mem_bw,
        "ddr_mem_bw": topo.ddr_mem_bw,
        "hbm_to_ddr_mem_bw": topo.hbm_to_ddr_mem_bw,
        "ssd_mem_bw": topo.ssd_mem_bw,
        "comms": canonical(topo.comms_bandwidths),
        "bwd_compute_multiplier": topo.bwd_compute_multiplier,
        "weighted_feature_bwd_compute_multiplier": topo.weighted_feature_bwd_compute_multiplier,
    }


def plan_fingerprint(
    tables: List[TableInfo],
    topology: Topology,
    reservation: Dict[str, Any],
    batch_size: int,
    sharders: List[Any],
    constraints: Optional[Dict[str, ParameterConstraints]],
    search_config: Any,
) -> str:
    features = _feature_names(tables)
    doc = {
        "version": [COST_MODEL_VERSION, torchrec.__version__],
        "tables": [_table(t, features) for t in tables],
        "constraints": canonical(constraints or {}),
        "topology": _topology(topology),
        "reservation": reservation,
        "batch_size": batch_size,
        "sharders": sorted(
            (
                {
                    "type": f"{type(s).__module__}.{type(s).__qualname__}",
                    "fused_params": canonical(getattr(s, "fused_params", None) or {}),
                    "qcomm": canonical(getattr(s, "qcomm_codecs_registry", None) and sorted(s.qcomm_codecs_registry)),
                }
                for s in sharders
            ),
            key=json.dumps,
        ),
        "search": canonical(search_config),
    }
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# TorchRec reservations whose result depends only on their settings, the topology, the batch size,
# the tables, the constraints and the module's parameter and buffer bytes.
_KNOWN_RESERVATIONS = (
    "HeuristicalStorageReservation",
    "FixedPercentageStorageReservation",
    "FixedAbsoluteStorageReservation",
)
_SETTINGS = ("_percentage", "_hbm_reserved_bytes", "_parameter_multiplier", "_dense_tensor_estimate")


def reservation_inputs(reservation: Any, module: Any, reserve: Callable[..., Any], sharders: List[Any]) -> Dict[str, Any]:
    """What decides the storage reservation. For TorchRec's own reservations that is their settings
    plus the module's parameter/buffer bytes (cheap: no reservation runs on a warm start); for any
    other reservation, its result (it runs)."""
    kind = f"{type(reservation).__module__}.{type(reservation).__qualname__}"
    if type(reservation).__name__ in _KNOWN_RESERVATIONS and type(reservation).__module__.startswith("torchrec."):
        settings = {k: canonical(v) for k, v in vars(reservation).items() if k in _SETTINGS}
        params = sum(p.numel() * p.element_size() for p in module.parameters())
        buffers = sum(b.numel() * b.element_size() for b in module.buffers())
        return {"type": kind, "settings": settings, "param_bytes": params, "buffer_bytes": buffers}
    hbm, ddr = reserve(module, sharders)
    return {"type": kind, "hbm": canonical(hbm), "ddr": canonical(ddr)}
