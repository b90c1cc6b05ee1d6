"""Ekko wire format: a fixed 20-byte header, then bodies laid out by numpy dtypes. Nothing is
unpickled; every count, shard index, row id, version and size is checked against the job's layout
before a byte reaches a tensor, and a violation raises `WireError` naming the field.

Header: magic "EKKO", protocol, kind, reserved (0), count, body bytes.
Bodies (little endian):
  HELLO          nonce[32] layout digest[32] rank i32 pad[4]
  AUTH           nonce[32] mac[32] rank i32 pad[4]
  WELCOME        mac[32]
  ERROR          utf-8 text
  VERSIONS       versions i64[count]                          (count = shards in the layout)
  VERSIONS_REPLY versions i64[count]                          (-1: not held)
  DELTA          wait_ms u32 pad[4] REQUEST[count]
  DELTA_REPLY    PART[count] row versions i64[...] row ids i32[...] pad-to-8 values[...]
A delta request with wait_ms > 0 is answered once some asked shard has news, or when the wait
ends. A reply part omits row ids when FULL (rows 0..n-1) and row versions when UNIFORM (all =
version); row ids are strictly increasing, row versions lie in (since, version]. A shard may have
several parts in a reply when they chain (each starts at the version the previous one reached):
a source sends the steps it encoded once each, in order, rather than merging them per asker.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from fastplan.comm.updates.layout import Layout

HEADER = struct.Struct("<4sBBHIQ")
MAGIC = b"EKKO"
PROTOCOL = 2
HANDSHAKE = struct.Struct("<32s32si4x")
WELCOME = struct.Struct("<32s")
WAIT = struct.Struct("<I4x")
REQUEST = np.dtype([("shard", "<u4"), ("pad", "<u4"), ("since", "<i8")])
_ASK = struct.Struct("<IIq")  # one REQUEST entry
PART = np.dtype([("shard", "<u4"), ("flags", "<u4"), ("since", "<i8"), ("version", "<i8"), ("n_rows", "<u8")])
FULL, COMPLETE, UNIFORM = 1, 2, 4
MAX_ERROR_TEXT = 4096
REPLY_BYTES = 64 << 20  # a server fills a reply with parts up to this, tables included (one part always fits)
MAX_PARTS = 1 << 16  # and with at most this many parts (each costs the receiver a little Python)


class Kind(enum.IntEnum):
    HELLO = 1
    AUTH = 2
    WELCOME = 3
    ERROR = 4
    VERSIONS = 5
    VERSIONS_REPLY = 6
    DELTA = 7
    DELTA_REPLY = 8


class WireError(ValueError):
    """Bytes that do not follow the format; the message names the field at fault."""


@dataclass
class Delta:
    """Rows of one shard (layout index) that changed after `since`, bringing a holder to `version`."""

    shard: int
    since: int
    version: int
    rows: Optional[np.ndarray]  # int64, strictly increasing; None when `full` (every row in order)
    values: np.ndarray  # (n,) raw rows: one np.void element of the shard's row bytes each
    row_versions: np.ndarray  # int64 (n,)
    full: bool = False
    complete: bool = True  # False: a scheduler sent part of it; the holder keeps its shard version

    @property
    def n(self) -> int:
        return len(self.row_versions)


def max_body(layout: Layout) -> int:
    """The largest body a node accepts: a full reply, or the largest single full shard."""
    return max(REPLY_BYTES, layout.largest_shard_bytes + PART.itemsize) + 64


def header(kind: Kind, count: int, nbytes: int) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL, int(kind), 0, count, nbytes)


def parse_header(data, limit: int) -> Tuple[Kind, int, int]:
    if len(data) != HEADER.size:
        raise WireError(f"header: {len(data)} bytes, expected {HEADER.size}")
    magic, protocol, kind, reserved, count, nbytes = HEADER.unpack(data)
    if magic != MAGIC:
        raise WireError(f"header: magic {bytes(magic)!r} is not {MAGIC!r} (not an ekko peer)")
    if protocol != PROTOCOL:
        raise WireError(f"header: protocol {protocol}, this node speaks {PROTOCOL}")
    if kind not in Kind._value2member_map_:
        raise WireError(f"header: unknown message kind {kind}")
    if reserved:
        raise WireError(f"header: reserved field is {reserved}, expected 0")
    if nbytes > limit:
        raise WireError(f"header: body of {nbytes} bytes exceeds the limit of {limit}")
    return Kind(kind), count, nbytes


def _need(body, size: int, what: str) -> None:
    if len(body) != size:
        raise WireError(f"{what}: body is {len(body)} bytes, its fields need {size}")


# ---- handshake --------------------------------------------------------------------------------
def encode_handshake(nonce: bytes, tag: bytes, rank: int) -> bytes:
    return HANDSHAKE.pack(nonce, tag, rank)


def decode_handshake(body, what: str) -> Tuple[bytes, bytes, int]:
    _need(body, HANDSHAKE.size, what)
    return HANDSHAKE.unpack(body)


def decode_error(body) -> str:
    return bytes(body[:MAX_ERROR_TEXT]).decode("utf-8", errors="replace")


# ---- versions ---------------------------------------------------------------------------------
def decode_versions(body, count: int, layout: Layout) -> np.ndarray:
    if count != len(layout):
        raise WireError(f"versions: {count} entries for a layout of {len(layout)} shards")
    _need(body, 8 * count, "versions")
    versions = np.frombuffer(body, "<i8", count).astype(np.int64)
    if (versions < -1).any():
        bad = int(np.flatnonzero(versions < -1)[0])
        raise WireError(f"versions: shard {layout.specs[bad].key} has version {int(versions[bad])} < -1")
    return versions


# ---- delta requests ---------------------------------------------------------------------------
@dataclass
class Ask:
    """One shard a client asks for and the version it holds."""

    shard: int
    since: int


def encode_delta_request(asks: Sequence[Ask], wait_ms: int = 0) -> List:
    return [WAIT.pack(wait_ms) + b"".join(_ASK.pack(a.shard, 0, a.since) for a in asks)]


def _check_rows(rows: np.ndarray, limit: int, what: str) -> None:
    if rows.size == 0:
        return
    if rows.size > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise WireError(f"{what}: row ids are not strictly increasing")
    if rows[0] < 0 or rows[-1] >= limit:
        raise WireError(f"{what}: row id {int(rows[0] if rows[0] < 0 else rows[-1])} out of range [0, {limit})")


def _table(body, dtype: np.dtype, count: int, layout: Layout, what: str) -> np.ndarray:
    if len(body) < dtype.itemsize * count:
        raise WireError(f"{what}: body of {len(body)} bytes is shorter than its {count}-entry table")
    table = np.frombuffer(body, dtype, count)
    shards = table["shard"].astype(np.int64)
    if count and int(shards.max()) >= len(layout):
        raise WireError(f"{what}: shard index {int(shards.max())} is not in the layout ({len(layout)} shards)")
    return table


def decode_delta_request(body, count: int, layout: Layout) -> Tuple[List[Ask], int]:
    """The asks and how long (ms) the asker is willing to wait for news."""
    if len(body) < WAIT.size:
        raise WireError(f"delta request: body of {len(body)} bytes has no wait field")
    (wait_ms,) = WAIT.unpack_from(body)
    body = body[WAIT.size :]
    _need(body, REQUEST.itemsize * count, "delta request")
    table = np.frombuffer(body, REQUEST, count)
    shards, pads, sinces = (table[f].tolist() for f in ("shard", "pad", "since"))  # a few asks: lists beat numpy
    if count and max(shards) >= len(layout):
        raise WireError(f"delta request: shard index {max(shards)} is not in the layout ({len(layout)} shards)")
    if len(set(shards)) != count:
        raise WireError("delta request: a shard is listed twice")
    if any(pads):
        raise WireError("delta request: padding is not zero")
    asks = [Ask(shard, since) for shard, since in zip(shards, sinces)]
    for a in asks:
        if a.since < -1:
            raise WireError(f"delta request, shard {layout.specs[a.shard].key}: since {a.since} < -1")
    return asks, wait_ms


# ---- delta replies ----------------------------------------------------------------------------
@dataclass
class EncodedPart:
    """One delta as its wire pieces; immutable, so a server may send it to several askers."""

    entry: Tuple[int, int, int, int, int]  # PART fields
    versions: Optional[np.ndarray]
    rows: Optional[np.ndarray]
    values: Optional[np.ndarray]
    n: int
    full: bool

    @property
    def nbytes(self) -> int:
        """Its size in a reply (padding included)."""
        return PART.itemsize + 8 + sum(a.nbytes for a in (self.versions, self.rows, self.values) if a is not None)


def encode_part(d: Delta) -> EncodedPart:
    uniform = d.n == 0 or bool((d.row_versions == d.version).all())
    flags = (FULL if d.full else 0) | (COMPLETE if d.complete else 0) | (UNIFORM if uniform else 0)
    return EncodedPart(
        (d.shard, flags, d.since, d.version, d.n),
        None if uniform else d.row_versions.astype("<i8", copy=False),
        d.rows.astype("<i4") if not d.full and d.n else None,
        np.ascontiguousarray(d.values).view(np.uint8) if d.n else None,
        d.n,
        d.full,
    )


def encode_delta_reply(parts: Sequence[EncodedPart]) -> List:
    """Buffers to send (no copies of the values): part table, versions, row ids, padding, values."""
    table = np.array([p.entry for p in parts], dtype=PART) if parts else np.zeros(0, PART)
    n_rows = sum(p.n for p in parts if p.rows is not None)
    return [table, *(p.versions for p in parts if p.versions is not None), *(p.rows for p in parts if p.rows is not None),
            bytes(-4 * n_rows % 8), *(p.values for p in parts if p.values is not None)]


def decode_delta_reply(body, count: int, layout: Layout) -> List[Delta]:
    """Deltas whose tensors are views into `body` (valid until the buffer is reused)."""
    if count > MAX_PARTS:
        raise WireError(f"delta reply: {count} parts exceed the limit of {MAX_PARTS}")
    table = _table(body, PART, count, layout, "delta reply")
    entries = list(zip(*(table[f].tolist() for f in PART.names)))  # (shard, flags, since, version, n)
    n_vers = n_ids = value_bytes = 0
    reached = {}  # shard -> (version, complete) of its previous part in this reply
    for shard, f, since, version, k in entries:
        spec = layout.specs[shard]
        if f & ~(FULL | COMPLETE | UNIFORM):
            raise WireError(f"delta reply, shard {spec.key}: unknown flags {f:#x}")
        if shard in reached and reached[shard] != (since, True):
            raise WireError(f"delta reply, shard {spec.key}: a part starting at {since} follows one reaching {reached[shard]} (version, complete)")
        reached[shard] = (version, bool(f & COMPLETE))
        if k > spec.rows or (f & FULL and k != spec.rows):
            raise WireError(f"delta reply, shard {spec.key}: {k} rows for a shard of {spec.rows}{' (full)' if f & FULL else ''}")
        if version < 0 or since < -1 or (not f & FULL and version <= since):
            raise WireError(f"delta reply, shard {spec.key}: versions since {since} -> {version} do not advance")
        n_vers += 0 if f & UNIFORM else k
        n_ids += 0 if f & FULL else k
        value_bytes += k * spec.row_bytes
    off_vers = PART.itemsize * count
    off_ids = off_vers + 8 * n_vers
    off_vals = off_ids + 4 * n_ids + (-4 * n_ids % 8)
    _need(body, off_vals + value_bytes, "delta reply")
    ids = np.frombuffer(body, "<i4", n_ids, off_ids).astype(np.int64)  # every part's row ids
    _check_ids(ids, entries, layout)
    out = []
    for shard, f, since, version, k in entries:
        spec = layout.specs[shard]
        if f & UNIFORM:
            rv = np.ndarray((k,), np.int64, np.int64(version), 0, (0,))  # read-only, allocates nothing
        else:
            rv = np.frombuffer(body, "<i8", k, off_vers)
            off_vers += 8 * k
            # A row version above the part's would make the receiver skip that row's later updates.
            low = -1 if f & FULL else since + 1
            if k and (int(rv.min()) < low or int(rv.max()) > version):
                bad = int(rv.min()) if int(rv.min()) < low else int(rv.max())
                raise WireError(f"delta reply, shard {spec.key}: row version {bad} outside [{low}, {version}]")
        rows = None
        if not f & FULL:
            rows, ids = ids[:k], ids[k:]
        values = np.frombuffer(body, _row_dtype(spec.row_bytes), k, off_vals)
        off_vals += k * spec.row_bytes
        out.append(Delta(shard, since, version, rows, values, rv, bool(f & FULL), bool(f & COMPLETE)))
    return out


def _check_ids(ids: np.ndarray, entries, layout: Layout) -> None:
    """Row ids strictly increasing within each part and inside its shard: checked for every part at
    once, then part by part only to name the one at fault."""
    parts = [(shard, k) for shard, f, _, _, k in entries if not f & FULL and k]
    if not parts:
        return
    counts = np.array([k for _, k in parts])
    ends = np.cumsum(counts)
    up = ids[1:] > ids[:-1]
    up[ends[:-1] - 1] = True  # a part may start below where the previous one ended
    limits = np.array([layout.specs[shard].rows for shard, _ in parts])
    if up.all() and ids[ends - counts].min() >= 0 and (ids[ends - 1] < limits).all():
        return
    for (shard, k), end in zip(parts, ends.tolist()):
        _check_rows(ids[end - k : end], layout.specs[shard].rows, f"delta reply, shard {layout.specs[shard].key}, row ids")


_ROW_DTYPES: dict = {}


def _row_dtype(row_bytes: int) -> np.dtype:
    """One raw element per row (built once per row size: numpy dtypes are slow to make)."""
    if row_bytes not in _ROW_DTYPES:
        _ROW_DTYPES[row_bytes] = np.dtype((np.void, row_bytes))
    return _ROW_DTYPES[row_bytes]
