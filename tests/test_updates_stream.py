"""Ekko-style update propagation with real processes: convergence, bytes, restarts, silent peers."""

from fastplan.comm.updates.replication import StreamConfig, propagation_latencies, run_stream
from fastplan.comm.updates.scheduler import ROW_OVERHEAD


def everyone(results):
    return list(results["replicas"].values()) + [results["trainer"]]


def test_replicas_converge_byte_equal_and_the_wire_carries_little_more_than_the_changed_rows():
    cfg = StreamConfig(replicas=3, rows=5000, rows_per_s=20_000, duration_s=1.0, seed=1)
    results = run_stream(cfg)
    assert sorted(results["trainer"]["converged"]) == [1, 2, 3]
    assert all(r["converged"] for r in results["replicas"].values())
    assert len(propagation_latencies(results)) == cfg.steps
    changed = results["trainer"]["rows_written"] * cfg.dim * 4 * cfg.replicas
    rows_sent = sum(n["stats"]["delta_rows"] for n in everyone(results))
    assert sum(n["stats"]["full_shards"] for n in everyone(results)) == 0
    # Each changed row reaches each replica about once (a row rewritten before a pull travels once).
    assert rows_sent <= results["trainer"]["rows_written"] * cfg.replicas
    wire = sum(n["stats"]["bytes_out"] for n in everyone(results))
    headers = 2000 * sum(n["stats"]["pulls"] for n in everyone(results)) + 1000 * 20  # requests, handshakes
    assert wire <= 1.1 * (changed + rows_sent * ROW_OVERHEAD) + headers, (wire, changed)


def test_killed_replica_restarts_and_catches_up_with_full_shards():
    cfg = StreamConfig(replicas=3, rows=2000, rows_per_s=40_000, duration_s=1.5, kill_replica=2, cache_rows=3000, seed=3)
    results = run_stream(cfg)
    assert results["restarted"] and results["killed_exitcode"] == 17
    assert results["replicas"][2]["restarted"] and results["replicas"][2]["converged"]
    assert sorted(results["trainer"]["converged"]) == [1, 2, 3]
    # The restarted replica was older than the bounded update cache: full shards flowed.
    assert sum(n["stats"]["full_shards"] for n in everyone(results)) >= 1


def test_peer_that_stops_answering_is_named_and_the_others_keep_syncing():
    cfg = StreamConfig(replicas=3, rows=2000, rows_per_s=20_000, duration_s=1.5, stall_replica=3, seed=4)
    cfg.sync.timeout_s = 0.5
    results = run_stream(cfg)
    assert sorted(results["trainer"]["converged"]) == [1, 2, 3]
    named = [e["what"] for r in (1, 2) for e in results["replicas"][r]["errors"] if e["rank"] == 3]
    assert named and all("rank 3" in w for w in named) and any("did not answer" in w for w in named), named


def test_under_a_bandwidth_cap_a_row_already_sent_is_not_sent_or_listed_again():
    cfg = StreamConfig(replicas=2, rows=5000, rows_per_s=20_000, duration_s=1.0, scheduler="fifo",
                       bandwidth_bytes_per_s=1.5e6, seed=5)  # 2.6 MB/s of changes per replica: a backlog
    results = run_stream(cfg)
    assert sorted(results["trainer"]["converged"]) == [1, 2]
    trainer = results["trainer"]["stats"]
    changed = results["trainer"]["rows_written"] * cfg.dim * 4 * cfg.replicas
    wire = sum(n["stats"]["bytes_out"] for n in everyone(results))
    headers = 200 * sum(n["stats"]["pulls"] for n in everyone(results)) + 1000 * 20
    assert wire <= 1.1 * (changed + trainer["delta_rows"] * ROW_OVERHEAD) + headers, (wire, changed)
