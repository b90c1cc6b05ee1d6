"""Sync nodes in one process: a source answers stragglers with the steps it encoded once, and a
rollback pauses pulling until it is resumed."""

import time

import torch

from fastplan.comm.updates.state import ModelStateManager
from fastplan.comm.updates.sync import SyncNode
from tests.test_updates_wire import KEYS, job, new_store, wait_for  # noqa: F401 (job is a fixture)


def test_a_replica_steps_behind_gets_the_published_steps_in_order_and_nothing_is_built_for_it(job):
    kv, source, cfg = job
    replica = SyncNode(1, 2, new_store(), kv, config=cfg)
    replica.pause()
    replica.start(pull=True)
    try:
        for step in range(3):
            source.publish({KEYS[0]: (torch.tensor([step, 10 + step]), torch.full((2, 8), float(step)))})
        replica.resume()
        wait_for(lambda: replica.store.checksum() == source.store.checksum(), "the replica to catch up")
        assert replica.store.versions() == source.store.versions() == {KEYS[0]: 3, KEYS[1]: 0}
        assert source.stats.built == 0 and source.stats.deltas == 3, source.stats
        assert replica.stats.applied == 3 and replica.stats.rows_applied == 6
    finally:
        replica.stop()


def test_a_rollback_pauses_pulling_until_resumed(job):
    kv, source, cfg = job
    replica = SyncNode(1, 2, new_store(), kv, config=cfg).start(pull=True)
    probe = torch.arange(64)
    baseline = new_store().tensors()[KEYS[0]][probe].sum(1)  # the healthy model's scores
    manager = ModelStateManager(replica.store, lambda t: t[KEYS[0]][probe].sum(1), baseline, threshold=0.5, node=replica)
    try:
        healthy = replica.store.checksum()
        source.publish({KEYS[0]: (torch.arange(8), torch.full((8, 8), 100.0))})  # a biased update
        wait_for(lambda: replica.store.versions()[KEYS[0]] == 1, "the replica to take the biased update")
        report = manager.check()
        assert not report.healthy and replica.paused and replica.store.checksum() == healthy
        source.publish({KEYS[1]: (torch.tensor([3]), torch.ones(1, 8))})  # news keeps coming: not pulled
        try:
            wait_for(lambda: replica.store.checksum() != healthy, "a pull while paused", timeout=0.5)
            raise AssertionError("the replica pulled the bad update again while paused")
        except TimeoutError:
            pass
        assert replica.store.versions() == {KEYS[0]: 0, KEYS[1]: 0}
        manager.resume()
        wait_for(lambda: replica.store.checksum() == source.store.checksum(), "the replica to resume")
        assert replica.store.versions() == {KEYS[0]: 1, KEYS[1]: 1} and not replica.errors
    finally:
        replica.stop()


def test_replicas_probe_each_other_rarely_while_the_source_serves_and_relay_once_it_is_gone(job):
    kv, source, cfg = job
    one, two = (SyncNode(rank, 3, new_store(), kv, config=cfg).start(pull=True) for rank in (1, 2))
    try:
        source.publish({KEYS[0]: (torch.tensor([1, 2]), torch.ones(2, 8))})
        wait_for(lambda: one.store.checksum() == two.store.checksum() == source.store.checksum(), "both replicas")
        time.sleep(0.3)  # connections settle
        before = one.stats.versions_served + two.stats.versions_served
        time.sleep(1.5)
        assert one.stats.versions_served + two.stats.versions_served - before <= 6  # 30 at probe_interval_s
        two.pause()
        source.publish({KEYS[1]: (torch.tensor([5]), torch.full((1, 8), 7.0))})
        wait_for(lambda: one.store.checksum() == source.store.checksum(), "replica 1 to get the last step")
        source.stop()
        two.resume()
        wait_for(lambda: two.store.checksum() == one.store.checksum(), "replica 1 to relay the step to replica 2")
        assert two.store.versions() == {KEYS[0]: 1, KEYS[1]: 1}
    finally:
        one.stop()
        two.stop()
