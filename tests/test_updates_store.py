"""Versioned shards, deltas, the update scheduler and rollback, in one process."""

from dataclasses import replace

import numpy as np
import torch

from fastplan.comm.updates.layout import Layout
from fastplan.comm.updates.scheduler import UpdateScheduler
from fastplan.comm.updates.shard_store import ShardStore, as_tensor
from fastplan.comm.updates.state import ModelStateManager
from fastplan.comm.updates.wire import decode_delta_reply, encode_delta_reply, encode_part

KEY = ("t", 0)


def store(rows=100, dim=4, cache_rows=1000):
    tensors = {KEY: torch.zeros(rows, dim)}
    return ShardStore(Layout.from_tensors(tensors), tensors, cache_rows=cache_rows)


def weights(s):
    return s.tensors()[KEY]


def wire_bytes(bufs):
    return b"".join(np.ascontiguousarray(b).tobytes() if isinstance(b, np.ndarray) else bytes(b) for b in bufs)


def test_delta_carries_only_rows_changed_since_the_askers_version():
    trainer, replica = store(), store()
    trainer.apply_update(KEY, torch.tensor([1, 2]), torch.ones(2, 4))
    replica.apply_delta(trainer.delta_since(0, 0))
    trainer.apply_update(KEY, torch.tensor([7, 2]), torch.full((2, 4), 2.0))  # unsorted rows are fine
    delta = trainer.delta_since(0, replica.versions()[KEY])
    assert delta.rows.tolist() == [2, 7] and not delta.full
    assert replica.apply_delta(delta)
    assert torch.equal(weights(replica), weights(trainer))
    assert replica.versions() == trainer.versions() == {KEY: 2}


def test_an_update_listing_a_row_twice_or_out_of_range_is_refused_naming_the_shard():
    s = store()
    for rows in ([3, 3], [100]):
        try:
            s.apply_update(KEY, torch.tensor(rows), torch.ones(len(rows), 4))
        except ValueError as e:
            assert "('t', 0)" in str(e)
        else:
            raise AssertionError(f"rows {rows} were accepted")
    assert s.versions() == {KEY: 0}


def test_asker_older_than_the_update_cache_gets_the_full_shard():
    trainer = store(cache_rows=4)
    for v in range(5):
        trainer.apply_update(KEY, torch.tensor([v, v + 10]), torch.full((2, 4), float(v + 1)))
    assert trainer.delta_since(0, 0).full
    assert not trainer.delta_since(0, 4).full
    late = store()
    late.apply_delta(trainer.delta_since(0, 0))
    assert torch.equal(weights(late), weights(trainer)) and late.versions() == {KEY: 5}


def test_a_delta_that_starts_beyond_the_holders_version_is_not_applied():
    trainer, replica = store(), store()
    trainer.apply_update(KEY, torch.tensor([1]), torch.ones(1, 4))
    trainer.apply_update(KEY, torch.tensor([2]), torch.ones(1, 4))
    assert not replica.apply_delta(trainer.delta_since(0, 1))  # replica is at 0: it would miss row 1
    assert replica.versions() == {KEY: 0} and float(weights(replica).abs().sum()) == 0.0


def test_rows_a_server_already_sent_in_a_cut_short_delta_are_not_sent_again():
    trainer, replica = store(), store()
    for v in range(6):
        trainer.apply_update(KEY, torch.arange(10 * v, 10 * v + 10), torch.randn(10, 4))
    scheduler = UpdateScheduler(bytes_per_s=30 * 28 / 0.01, interval_s=0.01)  # ~30 rows a round
    (part,) = scheduler.select(trainer, [trainer.delta_since(0, 0)])
    assert not part.complete and 0 < part.n < 60
    replica.apply_delta(part)
    assert replica.versions() == {KEY: 0}  # an incomplete delta keeps the shard version
    held = np.full(100, -1)
    held[part.rows] = part.row_versions  # what the server remembers sending on this connection
    trainer.apply_update(KEY, part.rows[:1], torch.ones(1, 4))  # ... one of which changes again
    rest = trainer.delta_since(0, 0, held)
    assert set(rest.rows.tolist()) & set(part.rows.tolist()) == {int(part.rows[0])}
    assert rest.n + part.n == 61
    replica.apply_delta(rest)
    assert torch.equal(weights(replica), weights(trainer)) and replica.versions() == {KEY: 7}


def test_priority_scheduler_sends_big_hot_changes_before_fifo_would():
    trainer = store(rows=200)
    trainer.track_importance()
    trainer.apply_update(KEY, torch.arange(0, 100), torch.full((100, 4), 0.01))  # old, small changes
    trainer.apply_update(KEY, torch.arange(100, 110), torch.full((10, 4), 5.0))  # new, big changes
    trainer.record_reads(KEY, torch.arange(100, 110).repeat(50))
    delta = trainer.delta_since(0, 0)
    budget = UpdateScheduler(bytes_per_s=10 * 28 / 0.01, interval_s=0.01)
    (prio,) = budget.select(trainer, [delta])
    (fifo,) = UpdateScheduler(budget.bytes_per_s, budget.interval_s, policy="fifo").select(trainer, [delta])
    assert prio.rows.tolist() == list(range(100, 110))
    assert fifo.rows.tolist() == list(range(0, 10))
    assert torch.equal(as_tensor(prio.values, trainer.layout.specs[0]), torch.full((10, 4), 5.0))


def test_rollback_restores_the_exact_earlier_bytes_and_stops_serving_undone_changes():
    replica = store()
    replica.apply_update(KEY, torch.arange(20), torch.randn(20, 4))
    probe = torch.arange(20)
    baseline = weights(replica)[probe].sum(1).clone()
    manager = ModelStateManager(replica, lambda t: t[KEY][probe].sum(1), baseline, threshold=0.5)
    replica.apply_update(KEY, torch.tensor([3]), torch.full((1, 4), 0.001) + weights(replica)[3])  # tiny drift
    assert manager.check().healthy
    good_bytes, good_versions = weights(replica).clone(), replica.versions()
    replica.apply_update(KEY, torch.arange(5, 15), torch.full((10, 4), 100.0))  # a biased update
    report = manager.check()
    assert not report.healthy and "drift" in report.reason and report.restored_rows == 10
    assert torch.equal(weights(replica), good_bytes)  # bytes equal, not close
    assert report.versions == good_versions == {KEY: 2}
    assert replica.delta_since(0, 2).n == 0  # the undone version is not offered to peers
    follower = store()
    follower.apply_delta(replica.delta_since(0, 0))
    assert torch.equal(weights(follower), good_bytes)


def test_a_replica_relays_rows_beyond_its_version_as_of_its_version_and_the_receiver_still_converges():
    trainer, a, b = store(), store(), store()
    trainer.apply_update(KEY, torch.tensor([1, 2]), torch.ones(2, 4))  # v1
    a.apply_delta(trainer.delta_since(0, 0))
    trainer.apply_update(KEY, torch.tensor([2]), torch.full((1, 4), 2.0))  # v2
    trainer.apply_update(KEY, torch.tensor([5]), torch.full((1, 4), 3.0))  # v3
    d = trainer.delta_since(0, 1)
    a.apply_delta(replace(d, rows=d.rows[:1], values=d.values[:1], row_versions=d.row_versions[:1], complete=False))
    body = wire_bytes(encode_delta_reply([encode_part(a.delta_since(0, 0))]))  # a at v1 holds row 2 at v2
    (relay,) = decode_delta_reply(memoryview(body), 1, a.layout)  # refused if row 2 travelled as v2
    assert relay.version == 1 and relay.row_versions.tolist() == [1, 1]
    b.apply_delta(relay)
    rest = trainer.delta_since(0, 1)
    assert rest.rows.tolist() == [2, 5]
    b.apply_delta(rest)
    assert torch.equal(weights(b), weights(trainer)) and b.versions() == {KEY: 3}


def test_a_full_shard_never_takes_a_row_back_to_an_older_version():
    trainer, replica = store(cache_rows=1), store()
    trainer.apply_update(KEY, torch.tensor([1]), torch.ones(1, 4))  # v1
    trainer.apply_update(KEY, torch.tensor([2]), torch.ones(1, 4))  # v2
    behind = trainer.delta_since(0, 0)  # the full shard at v2
    trainer.apply_update(KEY, torch.tensor([1]), torch.full((1, 4), 3.0))  # v3
    d = trainer.delta_since(0, 0)
    row1 = replace(d, rows=np.array([1]), values=d.values[1:2], row_versions=d.row_versions[1:2], full=False, complete=False)
    assert replica.apply_delta(row1)  # row 1 at v3 from a cut-short delta, shard still at v0
    assert behind.full and replica.apply_delta(behind)
    assert replica.versions() == {KEY: 2}
    assert float(weights(replica)[1, 0]) == 3.0  # still the v3 row
    replica.apply_delta(trainer.delta_since(0, 2))
    assert torch.equal(weights(replica), weights(trainer)) and replica.versions() == {KEY: 3}
