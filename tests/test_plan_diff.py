"""PlanDiff: per-table status and the bytes each rank receives and sends between two plans."""

import pytest
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan

from fastplan.planner.diff import TableState, diff_plans

ROWS, DIM = 100, 16
ADAGRAD = TableState(ROWS, DIM, 4, "exact_row_wise_adagrad", 0, 4)  # 4 B of state per row of each shard


def _ps(st, boxes):
    """boxes: (rank, row0, col0, rows, cols); data parallel: ranks only."""
    if st == "data_parallel":
        return ParameterSharding(st, "dense", list(boxes), None)
    spec = EnumerableShardingSpec([ShardMetadata([r0, c0], [nr, nc], f"rank:{r}/cuda:{r}") for r, r0, c0, nr, nc in boxes])
    return ParameterSharding(st, "fused", [b[0] for b in boxes], spec)


def _plan(**tables):
    module = EmbeddingModuleShardingPlan()
    for name, ps in tables.items():
        module[name] = ps
    return ShardingPlan({"ebc": module})


def _diff(old, new, state=ADAGRAD, world_size=2):
    d = diff_plans(_plan(t=old), _plan(t=new), {"ebc.t": state}, world_size=world_size, old_world_size=2)
    return d.tables[0], d


def test_a_table_moved_to_another_rank_moves_its_weights_and_row_state():
    change, d = _diff(_ps("table_wise", [(0, 0, 0, ROWS, DIM)]), _ps("table_wise", [(1, 0, 0, ROWS, DIM)]))
    assert change.status == "moved"
    assert (change.weight_bytes, change.optimizer_bytes) == (ROWS * DIM * 4, ROWS * 4)
    assert d.received == [0, ROWS * DIM * 4 + ROWS * 4] and d.sent == [ROWS * DIM * 4 + ROWS * 4, 0]


def test_an_unchanged_table_moves_nothing():
    change, d = _diff(_ps("table_wise", [(1, 0, 0, ROWS, DIM)]), _ps("table_wise", [(1, 0, 0, ROWS, DIM)]))
    assert change.status == "kept" and d.moved_bytes == 0


def test_table_wise_to_row_wise_moves_only_the_rows_another_rank_takes():
    change, d = _diff(_ps("table_wise", [(0, 0, 0, ROWS, DIM)]),
                      _ps("row_wise", [(0, 0, 0, 50, DIM), (1, 50, 0, 50, DIM)]))
    assert change.status == "resharded"
    assert d.received == [0, 50 * DIM * 4 + 50 * 4] and d.sent[0] == d.received[1]


def test_merging_column_shards_needs_the_other_shards_row_state():
    change, d = _diff(_ps("column_wise", [(0, 0, 0, ROWS, 8), (1, 0, 8, ROWS, 8)]),
                      _ps("table_wise", [(0, 0, 0, ROWS, DIM)]))
    # Half the columns come from rank 1, and the merged row-wise state needs rank 1's per-row state.
    assert (change.weight_bytes, change.optimizer_bytes) == (ROWS * 8 * 4, ROWS * 4)
    assert d.sent == [0, ROWS * 8 * 4 + ROWS * 4]


def test_data_parallel_on_more_ranks_copies_the_table_to_each_new_rank():
    plain = TableState(ROWS, DIM, 4)
    change, d = _diff(_ps("data_parallel", [0, 1]), _ps("data_parallel", [0, 1, 2, 3]), plain, world_size=4)
    full = ROWS * DIM * 4
    assert change.status == "moved" and d.received == [0, 0, full, full]
    assert d.sent == [2 * full, 0]  # a replicated table is charged to its lowest rank


def test_rows_a_table_gains_are_fresh_and_move_nothing():
    grown = TableState(4 * ROWS, DIM, 4, "exact_row_wise_adagrad", 0, 4)
    change, d = _diff(_ps("table_wise", [(0, 0, 0, ROWS, DIM)]), _ps("table_wise", [(1, 0, 0, 4 * ROWS, DIM)]), grown)
    assert change.resized and change.moved_bytes == ROWS * DIM * 4 + ROWS * 4


def test_a_new_embedding_dimension_replaces_the_table():
    wider = TableState(ROWS, 2 * DIM, 4)
    change, d = _diff(_ps("table_wise", [(0, 0, 0, ROWS, DIM)]), _ps("table_wise", [(1, 0, 0, ROWS, 2 * DIM)]), wider)
    assert change.status == "replaced" and d.moved_bytes == 0 and d.sent == [0, 0]


def test_added_and_removed_tables():
    old = ShardingPlan({"ebc": EmbeddingModuleShardingPlan({"gone": _ps("table_wise", [(0, 0, 0, ROWS, DIM)])})})
    new = ShardingPlan({"ebc": EmbeddingModuleShardingPlan({"new": _ps("table_wise", [(1, 0, 0, ROWS, DIM)])})})
    d = diff_plans(old, new, {"ebc.new": ADAGRAD})
    assert {t.table: t.status for t in d.tables} == {"ebc.new": "added", "ebc.gone": "removed"}
    assert d.moved_bytes == 0
    assert "1 added, 1 removed" in d.table()


def test_a_table_without_state_is_named():
    with pytest.raises(KeyError, match="ebc.t"):
        diff_plans(_plan(t=_ps("table_wise", [(0, 0, 0, ROWS, DIM)])), _plan(t=_ps("table_wise", [(0, 0, 0, ROWS, DIM)])), {})
