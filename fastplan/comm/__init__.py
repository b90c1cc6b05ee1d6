"""Communication for sharded models: two systems that share only `transport`.

- `fastplan.comm.bls`: the bounded-lag all-to-all for inference and its pipeline.
- `fastplan.comm.updates`: propagation of embedding updates from trainers to inference replicas.
"""

from fastplan.comm.bls import (
    BLSConfig,
    BLSError,
    BLSInferencePipeline,
    BLSProcessGroup,
    BLSTimeoutError,
    BLSWork,
    NotYet,
    new_bls_group,
    register_bls_backend,
    wire_bls,
)

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
