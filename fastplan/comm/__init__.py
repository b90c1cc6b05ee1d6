"""Inference communication: the bounded-lag (BLS) all-to-all and the lag-L pipeline around it."""

from fastplan.comm.bls import BLSError, BLSProcessGroup, BLSTimeoutError, BLSWork, new_bls_group, register_bls_backend
from fastplan.comm.pipeline import BLSInferencePipeline
from fastplan.comm.wiring import BLSConfig, wire_bls

__all__ = [
    "BLSConfig",
    "BLSError",
    "BLSInferencePipeline",
    "BLSProcessGroup",
    "BLSTimeoutError",
    "BLSWork",
    "new_bls_group",
    "register_bls_backend",
    "wire_bls",
]
