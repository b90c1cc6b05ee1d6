"""Versioned shards, deltas, the update scheduler and rollback, in one process."""

import torch

from fastplan.comm.updates.scheduler import UpdateScheduler
from fastplan.comm.updates.shard_store import ShardStore
from fastplan.comm.updates.state import ModelStateManager

KEY = ("t", 0)


def store(rows=100, dim=4, cache_rows=1000):
    return ShardStore({KEY: torch.zeros(rows, dim)}, cache_rows=cache_rows)


def test_delta_carries_only_rows_changed_since_the_askers_version():
    trainer, replica = store(), store()
    trainer.apply_update(KEY, torch.tensor([1, 2]), torch.ones(2, 4))
    replica.apply_delta(trainer.delta_since(KEY, 0))
    trainer.apply_update(KEY, torch.tensor([2, 7]), torch.full((2, 4), 2.0))
    delta = trainer.delta_since(KEY, replica.versions()[KEY])
    assert sorted(delta.rows.tolist()) == [2, 7] and not delta.full
    replica.apply_delta(delta)
    assert torch.equal(replica.tensors()[KEY], trainer.tensors()[KEY])
    assert replica.versions() == trainer.versions() == {KEY: 2}


def test_asker_older_than_the_update_cache_gets_the_full_shard():
    trainer = store(cache_rows=4)
    for v in range(5):
        trainer.apply_update(KEY, torch.tensor([v, v + 10]), torch.full((2, 4), float(v)))
    assert trainer.delta_since(KEY, 0).full
    assert not trainer.delta_since(KEY, 4).full
    late = store()
    late.apply_delta(trainer.delta_since(KEY, 0))
    assert torch.equal(late.tensors()[KEY], trainer.tensors()[KEY])


def test_rows_the_asker_already_has_are_not_sent_again():
    trainer, replica = store(), store()
    for v in range(6):
        trainer.apply_update(KEY, torch.arange(10 * v, 10 * v + 10), torch.randn(10, 4))
    scheduler = UpdateScheduler(bytes_per_s=30 * 32 / 0.01, interval_s=0.01)  # ~30 rows a round
    part, complete = scheduler.select(trainer, trainer.delta_since(KEY, 0))
    assert not complete and len(part.rows) < 60
    replica.apply_delta(part, complete=False)
    rest = trainer.delta_since(KEY, 0, replica.known_beyond(KEY))
    assert set(rest.rows.tolist()).isdisjoint(part.rows.tolist())
    assert len(rest.rows) + len(part.rows) == 60
    replica.apply_delta(rest)
    assert torch.equal(replica.tensors()[KEY], trainer.tensors()[KEY])


def test_priority_scheduler_sends_big_hot_changes_before_fifo_would():
    trainer = store(rows=200)
    trainer.apply_update(KEY, torch.arange(0, 100), torch.full((100, 4), 0.01))  # old, small changes
    trainer.apply_update(KEY, torch.arange(100, 110), torch.full((10, 4), 5.0))  # new, big changes
    trainer.record_reads(KEY, torch.arange(100, 110).repeat(50))
    delta = trainer.delta_since(KEY, 0)
    budget = UpdateScheduler(bytes_per_s=10 * 32 / 0.01, interval_s=0.01)
    prio, _ = budget.select(trainer, delta)
    fifo, _ = UpdateScheduler(budget.bytes_per_s, budget.interval_s, policy="fifo").select(trainer, delta)
    assert sorted(prio.rows.tolist()) == list(range(100, 110))
    assert sorted(fifo.rows.tolist()) == list(range(0, 10))


def test_rollback_restores_the_exact_earlier_bytes():
    replica = store()
    replica.apply_update(KEY, torch.arange(20), torch.randn(20, 4))
    probe = torch.arange(20)
    baseline = replica.tensors()[KEY][probe].sum(1).clone()
    manager = ModelStateManager(replica, lambda t: t[KEY][probe].sum(1), baseline, threshold=0.5)
    healthy_bytes = replica.tensors()[KEY].clone()
    healthy_versions = replica.versions()
    replica.apply_update(KEY, torch.tensor([3]), torch.full((1, 4), 0.001) + healthy_bytes[3])  # tiny drift
    assert manager.check().healthy
    good_bytes = replica.tensors()[KEY].clone()
    replica.apply_update(KEY, torch.arange(5, 15), torch.full((10, 4), 100.0))  # a biased update
    report = manager.check()
    assert not report.healthy and "drift" in report.reason and report.restored_rows == 10
    assert torch.equal(replica.tensors()[KEY], good_bytes)  # bytes equal, not close
    assert report.versions == {KEY: healthy_versions[KEY] + 1}
