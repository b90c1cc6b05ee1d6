"""`fastplan diff` and `fastplan plan --previous`: what moves between two plan files, as text and PNG."""

from types import SimpleNamespace

import pytest
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import Topology

from fastplan import FastShardingPlanner, PlanCache
from fastplan.models import ebc, report_tables
from fastplan.planfile import load_plan
from fastplan.replan_cli import diff_plan_files, plot_diff, table_states

SHARDERS = [EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD})]


def _plan_file(directory, name, tables, previous=None):
    """A plan file as `fastplan plan --out` writes it (plan, report, recorded inputs), read back."""
    planner = FastShardingPlanner(topology=Topology(world_size=4, compute_device="cuda"), cache=PlanCache(directory / "cache"),
                                  debug=False)
    if previous is None:
        planner.plan(ebc(tables), SHARDERS)
    else:
        planner.replan(ebc(tables), SHARDERS, previous.plan, max_moved_bytes=10**6)
    planner.last_plan_file.dump(directory / name)
    return load_plan(directory / name)


def test_diff_of_two_plan_files_lists_moves_and_draws_them(tmp_path):
    base = report_tables(40)
    old = _plan_file(tmp_path, "old.plan", base)
    new = _plan_file(tmp_path, "new.plan", [t for i, t in enumerate(base) if i % 8 != 2] + report_tables(42)[40:],
                     previous=old)
    diff = diff_plan_files(old, new)
    counts = diff.counts()
    assert counts["added"] == 2 and counts["removed"] == 5
    # Shapes and the optimizer come from the inputs the file records: row-wise Adagrad state moves too.
    moved = [t for t in diff.tables if t.moved_bytes]
    assert all(t.optimizer_bytes > 0 for t in moved)
    assert diff.previous_rank_perf == [r.perf for r in old.report.ranks]
    text = diff.table()
    assert "table_40" in text and "removed" in text and "received" in text
    png = tmp_path / "moves.png"
    plot_diff(diff, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_recorded_inputs_shapes_come_from_the_estimates_else_the_table_is_named(tmp_path):
    tables = report_tables(30)
    pf = _plan_file(tmp_path, "dp.plan", tables)
    pf.inputs = None
    dp = [name for mp in pf.plan.plan.values() for name, ps in mp.items() if ps.sharding_type == "data_parallel"]
    assert dp  # a data-parallel sharding records no shard metadata
    rows = {t.name: t.num_embeddings for t in tables}
    assert table_states(pf)[dp[0]].rows == rows[dp[0]]
    with pytest.raises(ValueError, match=dp[0]):
        table_states(SimpleNamespace(plan=pf.plan, inputs=None, estimates=None))


def test_shapes_and_optimizer_come_from_the_recorded_inputs(tmp_path):
    old = _plan_file(tmp_path, "six.plan", report_tables(6))
    inputs = {"shared": {"modules": [{"path": "", "fused_params": {"optimizer": "EmbOptimType.EXACT_ROWWISE_ADAGRAD"}}]},
              "tables": [{"fqn": key, "shape": [1000, 16], "dtype": "torch.float16"} for key in ("table_0", "table_1")]}
    states = table_states(SimpleNamespace(plan=old.plan, inputs=inputs, estimates=None), strict=False)
    assert (states["table_0"].rows, states["table_0"].element_size) == (1000, 2)
    assert (states["table_0"].optimizer, states["table_0"].optimizer_row_bytes) == ("exact_row_wise_adagrad", 4)


def test_plan_previous_then_diff_on_plan_files(tmp_path, capsys):
    from fastplan.cli import main

    spec = tmp_path / "tables.yaml"
    grown = tmp_path / "grown.yaml"
    rows = [f"- {{name: t{i}, num_embeddings: {100 + i}, embedding_dim: 8}}" for i in range(12)]
    spec.write_text("tables:\n" + "\n".join(rows) + "\n")
    grown.write_text("tables:\n" + "\n".join(rows + ["- {name: extra, num_embeddings: 50, embedding_dim: 8}"]) + "\n")
    old, new, png = tmp_path / "old.plan", tmp_path / "new.plan", tmp_path / "diff.png"
    assert main(["plan", "--tables", str(spec), "--world-size", "4", "--out", str(old), "--cache-dir", str(tmp_path / "c")]) == 0
    assert main(["plan", "--tables", str(grown), "--world-size", "4", "--previous", str(old), "--out", str(new),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert main(["diff", str(old), str(new), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "extra" in out and "added" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
