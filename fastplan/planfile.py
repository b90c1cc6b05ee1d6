"""Plan files: a `ShardingPlan` (every `ParameterSharding` field), its report, the inputs it was planned
from and per-shard estimates, as versioned JSON read against a schema (msgspec); nothing is executed.

    dump_plan(plan, "model.plan", report=planner.last_report)   # readable, diffable JSON
    pf = load_plan("model.plan")                                # pf.plan is a real ShardingPlan
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

import msgspec
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torch.distributed.remote_device import _remote_device
from torchrec.distributed.types import (
    BoundsCheckMode,
    CacheParams,
    DataType,
    EmbeddingModuleShardingPlan,
    KeyValueParams,
    ParameterSharding,
    ShardingPlan,
)

from fastplan.planner.stats import PlanReport

FORMAT = "fastplan-plan"
VERSION = 2  # 2: per-shard estimates may be written once for identical shards
READABLE = (1, 2)
PERF_FIELDS = ("fwd_compute", "fwd_comms", "bwd_compute", "bwd_comms", "input_dist_comms", "prefetch_compute")


class PlanFileError(ValueError):
    """A plan file is unreadable or does not match the schema; the message names the file and field."""


NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class ShardDoc(msgspec.Struct, forbid_unknown_fields=True):
    offsets: List[NonNegative]
    sizes: List[NonNegative]
    placement: str  # e.g. "rank:3/cuda:3"


class TableDoc(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One `ParameterSharding`; enum fields hold TorchRec's enum values."""

    sharding_type: str
    compute_kernel: str
    ranks: Optional[List[int]] = None
    shards: Optional[List[ShardDoc]] = None
    cache_params: Optional[CacheParams] = None
    enforce_hbm: Optional[bool] = None
    stochastic_rounding: Optional[bool] = None
    bounds_check_mode: Optional[BoundsCheckMode] = None
    output_dtype: Optional[DataType] = None
    key_value_params: Optional[KeyValueParams] = None


class TableEstimates(msgspec.Struct, forbid_unknown_fields=True):
    """A table's TorchRec planner `Shard`s (a data-parallel table has one per rank): where each is, and
    the planner's storage (bytes) and perf (ms, columns `PERF_FIELDS`) estimates, one list entry per
    shard, or a single entry that holds for every shard (the identical shards of a data-parallel table)."""

    ranks: List[int]
    sizes: List[List[int]]
    offsets: List[List[int]]
    hbm: List[int]
    ddr: List[int]
    ssd: List[int]
    perf: List[List[float]]

    def __post_init__(self) -> None:
        for name in SHARD_FIELDS:
            if len(getattr(self, name)) not in (1, len(self.ranks)):
                raise ValueError(f"'{name}' has {len(getattr(self, name))} entries for {len(self.ranks)} shards (1 or one per shard)")

    def rows(self) -> List[tuple]:
        """Per shard: (rank, size, offset, hbm, ddr, ssd, perf)."""
        n = len(self.ranks)
        columns = [getattr(self, name) for name in SHARD_FIELDS]
        return list(zip(self.ranks, *(c * n if len(c) == 1 else c for c in columns)))

    @classmethod
    def compact(cls, ranks: List[int], **fields: list) -> "TableEstimates":
        """Fields whose entries are all equal are written once."""
        return cls(ranks=ranks, **{k: v[:1] if len(v) > 1 and all(x == v[0] for x in v) else v for k, v in fields.items()})


SHARD_FIELDS = ("sizes", "offsets", "hbm", "ddr", "ssd", "perf")
_NULL = msgspec.Raw(b"null")
PlanDoc = Dict[str, Dict[str, TableDoc]]  # module path -> table -> sharding
Estimates = Dict[str, Dict[str, TableEstimates]]  # module path -> table -> its shards


class FileDoc(msgspec.Struct, forbid_unknown_fields=True):
    format: Literal["fastplan-plan"]
    version: Literal[1, 2]
    plan: PlanDoc
    key: Optional[str] = None
    report: Optional[PlanReport] = None
    inputs: msgspec.Raw = _NULL  # decoded on first use: not needed to serve a plan
    estimates: msgspec.Raw = _NULL


def _refuse(obj: Any) -> Any:
    raise TypeError(f"a {type(obj).__name__} cannot be written to a plan file")


def _refuse_type(tp: type, obj: Any) -> Any:
    raise TypeError(f"{getattr(tp, '__name__', tp)} cannot be read from a plan file")


_ENCODER = msgspec.json.Encoder(enc_hook=_refuse)
_DECODER = msgspec.json.Decoder(FileDoc, dec_hook=_refuse_type)

def _decode_field(raw: msgspec.Raw, schema: Any, name: str, table_schema: Optional[type] = None) -> Any:
    """`table_schema`: the field is tables by module path, each of this schema; errors name the table."""
    try:
        return msgspec.json.decode(raw, type=schema)
    except msgspec.ValidationError as e:
        at_fault = _table_at_fault(msgspec.json.decode(raw), table_schema) if table_schema else None
        raise PlanFileError(f"{name}: {at_fault or e}") from e


class _Header(msgspec.Struct):
    format: Literal["fastplan-plan"]
    version: int


_HEADER = msgspec.json.Decoder(_Header)


class PlanFile:
    """A loaded plan file. `inputs` and `estimates` are decoded on first access (`estimates` may be
    given as a function returning their JSON, read only then)."""

    def __init__(self, plan: ShardingPlan, report: Optional[PlanReport] = None, inputs: Optional[Dict[str, Any]] = None,
                 key: Optional[str] = None, estimates: Optional[Estimates] = None) -> None:
        self.plan = plan
        self.report = report
        self.key = key
        self._inputs: Any = inputs
        self._estimates: Any = estimates

    @property
    def inputs(self) -> Optional[Dict[str, Any]]:
        if isinstance(self._inputs, msgspec.Raw):
            self._inputs = _decode_field(self._inputs, Optional[Dict[str, Any]], "inputs")
        return self._inputs

    def dump(self, path: os.PathLike) -> None:
        """Write this plan file (see `dump_plan`)."""
        dump_plan(self.plan, path, report=self.report, inputs=self._inputs, key=self.key, estimates=self.estimates)

    @inputs.setter
    def inputs(self, value: Union[None, Dict[str, Any], msgspec.Raw]) -> None:
        self._inputs = value

    @property
    def estimates(self) -> Optional[Estimates]:
        if callable(self._estimates):  # kept beside the file (the cache's sidecar), read on first use
            self._estimates = self._estimates()
        if isinstance(self._estimates, (msgspec.Raw, bytes)):
            self._estimates = _decode_field(self._estimates, Optional[Estimates], "estimates", TableEstimates)
        return self._estimates


# ---- ShardingPlan <-> data ---------------------------------------------------------------------
def _table_doc(ps: ParameterSharding) -> TableDoc:
    shards = None
    if ps.sharding_spec is not None:
        if not isinstance(ps.sharding_spec, EnumerableShardingSpec):
            raise TypeError(f"sharding_spec {type(ps.sharding_spec).__name__} is not an EnumerableShardingSpec")
        shards = [ShardDoc(list(m.shard_offsets), list(m.shard_sizes), str(m.placement)) for m in ps.sharding_spec.shards]
    return TableDoc(
        sharding_type=ps.sharding_type, compute_kernel=ps.compute_kernel,
        ranks=None if ps.ranks is None else [int(r) for r in ps.ranks], shards=shards,
        cache_params=ps.cache_params, enforce_hbm=ps.enforce_hbm, stochastic_rounding=ps.stochastic_rounding,
        bounds_check_mode=ps.bounds_check_mode, output_dtype=ps.output_dtype, key_value_params=ps.key_value_params,
    )


def _plan_doc(plan: ShardingPlan) -> PlanDoc:
    out: PlanDoc = {}
    for path, module_plan in plan.plan.items():
        if not isinstance(module_plan, dict):
            raise PlanFileError(f"module '{path}': {type(module_plan).__name__} is not an embedding module plan")
        for name, ps in module_plan.items():
            try:
                out.setdefault(path, {})[name] = _table_doc(ps)
            except (TypeError, AttributeError) as e:
                raise PlanFileError(f"table '{name}' ({path or 'root module'}): {e}") from e
    return out


class _Placements(dict):
    """Placement string -> `_remote_device`, each parsed once (~40 us each; a plan has few distinct ones)."""

    def __missing__(self, placement: str) -> _remote_device:
        device = self[placement] = _remote_device(placement)
        return device


def _shard_metadata(table: str, shard: ShardDoc, placements: _Placements) -> ShardMetadata:
    """`ShardMetadata(offsets, sizes, placement)` without its per-object checks: the schema has checked
    offsets and sizes >= 0, and this checks there are as many of each. A warm start builds thousands."""
    if len(shard.offsets) != len(shard.sizes):
        raise ValueError(f"table '{table}': a shard has {len(shard.offsets)} offsets and {len(shard.sizes)} sizes")
    meta = _new(ShardMetadata)
    meta.shard_offsets, meta.shard_sizes, meta.placement = shard.offsets, shard.sizes, placements[shard.placement]
    return meta


def _sharding_spec(table: str, shards: List[ShardDoc], placements: _Placements) -> EnumerableShardingSpec:
    metas = [_shard_metadata(table, s, placements) for s in shards]
    if len(metas) != 1:  # the constructor checks that there are shards and that they do not overlap
        return EnumerableShardingSpec(metas)
    spec = _new(EnumerableShardingSpec)
    spec.shards = metas
    return spec


_new = object.__new__


def _sharding_plan(doc: PlanDoc) -> ShardingPlan:
    placements = _Placements()
    plan = {}
    for path, tables in doc.items():
        module_plan = plan[path] = EmbeddingModuleShardingPlan()
        for name, t in tables.items():
            module_plan[name] = ParameterSharding(
                sharding_type=t.sharding_type, compute_kernel=t.compute_kernel, ranks=t.ranks,
                sharding_spec=None if t.shards is None else _sharding_spec(name, t.shards, placements),
                cache_params=t.cache_params, enforce_hbm=t.enforce_hbm, stochastic_rounding=t.stochastic_rounding,
                bounds_check_mode=t.bounds_check_mode, output_dtype=t.output_dtype, key_value_params=t.key_value_params,
            )
    return ShardingPlan(plan)


def plan_to_dict(plan: ShardingPlan) -> Dict[str, Any]:
    """The plan as JSON-able data: {module path: {table: {sharding_type, compute_kernel, ranks, shards, ...}}}."""
    return msgspec.to_builtins(_plan_doc(plan), enc_hook=_refuse)


def plan_from_dict(data: Dict[str, Any]) -> ShardingPlan:
    try:
        return _sharding_plan(msgspec.convert(data, PlanDoc, dec_hook=_refuse_type))
    except (msgspec.ValidationError, ValueError) as e:
        raise PlanFileError(f"plan: {e}") from e


def table_digests(plan: ShardingPlan) -> Dict[str, str]:
    """sha256 of each table's full sharding ("path.table" -> digest)."""
    return {
        f"{path}.{name}" if path else name: hashlib.sha256(_ENCODER.encode(t)).hexdigest()
        for path, tables in _plan_doc(plan).items() for name, t in tables.items()
    }


# ---- files ----------------------------------------------------------------------------------------
def encode_plan(plan: ShardingPlan, *, report: Optional[PlanReport] = None, inputs: Union[None, Dict[str, Any], msgspec.Raw] = None,
                key: Optional[str] = None, estimates: Optional[Estimates] = None, indent: int = 0) -> bytes:
    try:
        doc = FileDoc(
            format=FORMAT, version=VERSION, plan=_plan_doc(plan), key=key, report=report,
            inputs=inputs if isinstance(inputs, msgspec.Raw) else msgspec.Raw(_ENCODER.encode(inputs)),
            estimates=msgspec.Raw(_ENCODER.encode(estimates)),
        )
        data = _ENCODER.encode(doc)
    except TypeError as e:
        raise PlanFileError(str(e)) from e
    return msgspec.json.format(data, indent=indent) if indent else data


def encode_estimates(estimates: Estimates) -> bytes:
    return _ENCODER.encode(estimates)


def decode_plan(data: bytes, source: str = "plan file", lazy: bool = False) -> PlanFile:
    """Parse and validate; any problem raises `PlanFileError` naming `source` and the field. `lazy`
    leaves `inputs` and `estimates` to be validated when first read (the cache's fast path)."""
    try:
        doc = _DECODER.decode(data)
    except msgspec.DecodeError as e:  # ValidationError included
        try:
            header = _HEADER.decode(data)
        except msgspec.DecodeError:
            header = None
        if header is not None and header.version not in READABLE:
            raise PlanFileError(f"{source}: plan file version {header.version}; this fastplan reads versions {READABLE}") from e
        raise PlanFileError(f"{source}: not a valid fastplan plan file ({_name_table(data, e)})") from e
    try:
        plan = _sharding_plan(doc.plan)
    except (ValueError, TypeError, RuntimeError) as e:  # e.g. a malformed placement or overlapping shards
        raise PlanFileError(f"{source}: plan: {e}") from e
    out = PlanFile(plan, doc.report, doc.inputs, doc.key, doc.estimates)
    if not lazy:
        try:
            out.inputs, out.estimates
        except PlanFileError as e:
            raise PlanFileError(f"{source}: {e}") from e
    return out


def _name_table(data: bytes, error: Exception) -> str:
    """msgspec elides dict keys from error paths ("$.plan[...][...].ranks"): find the table at fault."""
    if "$.plan[...]" not in str(error):
        return str(error)
    return _table_at_fault(msgspec.json.decode(data)["plan"], TableDoc) or str(error)


def _table_at_fault(tables_by_path: Any, schema: type) -> Optional[str]:
    for path, tables in (tables_by_path.items() if isinstance(tables_by_path, dict) else ()):
        for name, entry in (tables.items() if isinstance(tables, dict) else ()):
            try:
                msgspec.convert(entry, schema, dec_hook=_refuse_type)
            except msgspec.ValidationError as e:
                message, _, at = str(e).partition(" - at `$")
                where = f": field '{at.rstrip('`').lstrip('.')}'" if at.rstrip("`") else ""
                return f"table '{name}' ({path or 'root module'}){where}: {message}"
    return None


def write_atomic(path: os.PathLike, data: bytes) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file (even after SIGKILL)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dump_plan(plan: ShardingPlan, path: os.PathLike, *, report: Optional[PlanReport] = None,
              inputs: Union[None, Dict[str, Any], msgspec.Raw] = None, key: Optional[str] = None,
              estimates: Optional[Estimates] = None) -> None:
    """Write `plan` (and optionally its report, inputs, fingerprint key and shard estimates) as indented JSON."""
    write_atomic(path, encode_plan(plan, report=report, inputs=inputs, key=key, estimates=estimates, indent=1))


def load_plan(path: os.PathLike) -> PlanFile:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PlanFileError(f"{path}: cannot read ({e.strerror or e})") from e
    return decode_plan(data, str(path))


def estimates_from_options(options: List[Any]) -> Estimates:
    """Per-shard estimates from TorchRec `ShardingOption`s (a planner's chosen options)."""
    out: Estimates = {}
    for so in options:
        shards = so.shards
        out.setdefault(so.path, {})[so.name] = TableEstimates.compact(
            [int(s.rank) for s in shards], sizes=[list(map(int, s.size)) for s in shards],
            offsets=[list(map(int, s.offset)) for s in shards], hbm=[int(s.storage.hbm) for s in shards],
            ddr=[int(s.storage.ddr) for s in shards], ssd=[int(s.storage.ssd) for s in shards],
            perf=[[float(getattr(s.perf, f)) for f in PERF_FIELDS] for s in shards],
        )
    return out
