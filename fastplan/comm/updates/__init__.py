"""Ekko-style propagation of embedding updates to inference replicas: versioned shards, peer pull,
priority scheduling and rollback."""

from fastplan.comm.updates.scheduler import UpdateScheduler
from fastplan.comm.updates.shard_store import ShardStore
from fastplan.comm.updates.state import ModelStateManager
from fastplan.comm.updates.sync import SyncNode

__all__ = ["ModelStateManager", "ShardStore", "SyncNode", "UpdateScheduler"]
