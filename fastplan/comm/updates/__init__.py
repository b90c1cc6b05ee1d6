"""Ekko-style propagation of embedding updates to inference replicas: versioned shards, an
authenticated binary peer-pull protocol, priority scheduling and rollback."""

from fastplan.comm.updates.channel import PeerError, job_secret
from fastplan.comm.updates.layout import Layout, ShardSpec
from fastplan.comm.updates.scheduler import UpdateScheduler
from fastplan.comm.updates.shard_store import ShardStore
from fastplan.comm.updates.state import ModelStateManager
from fastplan.comm.updates.sync import SyncConfig, SyncNode
from fastplan.comm.updates.wire import Delta, WireError

__all__ = [
    "Delta", "Layout", "ModelStateManager", "PeerError", "ShardSpec", "ShardStore", "SyncConfig", "SyncNode",
    "UpdateScheduler", "WireError", "job_secret",
]
