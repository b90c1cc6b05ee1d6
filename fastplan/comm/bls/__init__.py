"""Bounded-lag (BLS) all-to-all for sharded inference: the `"bls"` backend and the lag-L pipeline."""

from fastplan.comm.bls.collective import (
    BLSError,
    BLSProcessGroup,
    BLSTimeoutError,
    BLSWork,
    new_bls_group,
    register_bls_backend,
)
from fastplan.comm.bls.pipeline import BLSInferencePipeline, NotYet
from fastplan.comm.bls.wiring import BLSConfig, wire_bls

__all__ = [
    "BLSConfig",
    "BLSError",
    "BLSInferencePipeline",
    "BLSProcessGroup",
    "BLSTimeoutError",
    "BLSWork",
    "NotYet",
    "new_bls_group",
    "register_bls_backend",
    "wire_bls",
]
