"""The command line: plan to a plan file, manage the cache, explain; every mistake is one line naming the field."""

import os
import pickle
import subprocess
import sys

import pytest

from fastplan.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = os.path.join(ROOT, "examples", "tables_500.yaml")


def test_help_imports_neither_torch_nor_torchrec():
    code = "import sys; from fastplan.cli import main\ntry: main(['plan', '--help'])\nexcept SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0 and "example:" in out.stdout, out.stderr[-2000:]


def test_plan_cache_and_explain_end_to_end(tmp_path, capsys):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["plan", "--tables", TABLES, "--world-size", "8", "--out", str(tmp_path / "m.plan"), *cache]) == 0
    assert "500 tables on 8 ranks" in capsys.readouterr().out
    assert main(["cache", "list", *cache]) == 0
    listed = capsys.readouterr().out
    assert "1 plan(s)" in listed
    assert main(["cache", "show", listed.split()[0][:10], *cache]) == 0 and "table_0" in capsys.readouterr().out
    assert main(["cache", "verify", *cache]) == 0
    assert main(["cache", "export", str(tmp_path / "ship"), *cache]) == 0
    assert main(["cache", "import", str(tmp_path / "ship"), "--cache-dir", str(tmp_path / "other")]) == 0
    assert "imported 1" in capsys.readouterr().out
    assert main(["explain", str(tmp_path / "m.plan"), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert main(["cache", "clear", *cache]) == 0 and "removed 1" in capsys.readouterr().out


def test_verify_removes_a_corrupt_entry_and_keeps_the_others(tmp_path, capsys):
    cache = ["--cache-dir", str(tmp_path)]
    spec = tmp_path / "t.yaml"
    for n in (3, 4):
        spec.write_text("tables:\n" + "".join(f"  - {{name: t{i}, num_embeddings: 100, embedding_dim: 8}}\n" for i in range(n)))
        assert main(["plan", "--tables", str(spec), "--world-size", "2", *cache]) == 0
    first = sorted((tmp_path / "plans").glob("*.plan"))[0]
    first.write_bytes(first.read_bytes()[:50])
    capsys.readouterr()
    assert main(["cache", "verify", *cache]) == 1
    assert "1 of 2 plan(s)" in capsys.readouterr().out and not first.exists()
    assert main(["cache", "list", *cache]) == 0 and "1 plan(s)" in capsys.readouterr().out


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['FASTPLAN_TEST_MARKER']}",))


def test_crafted_files_run_nothing_in_explain_or_cache_import(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTPLAN_TEST_MARKER", str(tmp_path / "ran"))
    (tmp_path / "ship").mkdir()
    for path in (tmp_path / "evil.plan", tmp_path / "ship" / ("a" * 64 + ".plan")):
        path.write_bytes(pickle.dumps(Payload()))
    assert main(["explain", str(tmp_path / "evil.plan")]) == 2
    assert main(["cache", "import", str(tmp_path / "ship"), "--cache-dir", str(tmp_path / "c")]) == 0
    assert main(["cache", "list", "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr()
    assert "imported 0" in out.out and "not a valid fastplan plan file" in out.err
    assert not (tmp_path / "ran").exists()


SPECS = {
    "dup": "tables:\n  - {name: a, num_embeddings: 10, embedding_dim: 8}\n  - {name: a, num_embeddings: 10, embedding_dim: 8}\n",
    "bool": "tables:\n  - {name: a, num_embeddings: true, embedding_dim: 8}\n",
    "ok": "tables:\n  - {name: a, num_embeddings: 1000, embedding_dim: 8}\n",
}


@pytest.mark.parametrize("args, field", [
    (["--tables", "dup"], "field 'name': table 'a' is listed twice"),
    (["--tables", "bool"], "field 'num_embeddings'"),
    (["--tables", "ok", "--hbm-gb", "nan"], "--hbm-gb"),
    (["--tables", "ok", "--batch-size", "-5"], "--batch-size"),
    (["--tables", "ok", "--hbm-gb", "0.000001"], "--hbm-gb: nothing is left per rank"),
    (["--tables", "ok", "--constraints", "nested"], "field 'cache_params.load_factor'"),
    (["--tables", "ok", "--constraints", "string"], "field 'sharding_types'"),
    (["--tables", "ok", "--out", "missing/m.plan"], "--out: directory"),
    (["--tables", "ok", "--json", "missing/m.json"], "--json: directory"),
])
def test_a_mistake_is_one_line_naming_the_field(tmp_path, capsys, args, field):
    for name, text in SPECS.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    (tmp_path / "nested.yaml").write_text("a:\n  cache_params: {load_factor: high}\n")
    (tmp_path / "string.yaml").write_text("a:\n  sharding_types: row_wise\n")
    resolved = [str(tmp_path / f"{a}.yaml") if a in (*SPECS, "nested", "string") else
                str(tmp_path / a) if a.startswith("missing") else a for a in args]
    assert main(["plan", "--world-size", "2", "--cache-dir", str(tmp_path / "c"), *resolved]) == 2
    out = capsys.readouterr()
    assert out.err.strip().count("\n") == 0 and field in out.err, out.err
    assert "tables on" not in out.out  # nothing was planned


def test_cache_export_into_a_missing_parent_is_refused(tmp_path, capsys):
    assert main(["cache", "export", str(tmp_path / "no" / "such"), "--cache-dir", str(tmp_path)]) == 2
    assert "directory" in capsys.readouterr().err


def test_bench_compares_with_torchrec_and_plots(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fastplan.cli", "bench", "--sizes", "10", "--world-sizes", "2", "--torchrec-max", "10",
         "--dp-max", "0", "--repeats", "1", "--plot", str(tmp_path / "b.png")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "FASTPLAN_CACHE_DIR": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    row = [line for line in out.stdout.splitlines() if line.split()[:2] == ["10", "2"]][0]
    _, _, torchrec, dp = row.split(" | ")
    torchrec_perf_over_fastplan = float(torchrec.split()[2])
    assert torchrec_perf_over_fastplan >= 1.0  # TorchRec's plan is not better than fastplan's
    assert dp.strip() == "skipped (cap 0 tables)"
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_plan_for_many_hosts_names_each_rank_s_local_device(tmp_path, capsys):
    import json

    spec = tmp_path / "t.yaml"
    spec.write_text("tables:\n" + "".join(f"  - {{name: t{i}, num_embeddings: 100000, embedding_dim: 64}}\n" for i in range(3)))
    constraints = tmp_path / "c.yaml"
    constraints.write_text("t0: {sharding_types: [row_wise]}\n")  # a shard on every rank, past cuda:127 too
    out = tmp_path / "plan.json"
    assert main(["plan", "--tables", str(spec), "--world-size", "256", "--local-world-size", "8", "--json", str(out),
                 "--constraints", str(constraints), "--cache-dir", str(tmp_path / "c")]) == 0
    placements = [s["placement"] for module in json.loads(out.read_text()).values() for ps in module.values()
                  for s in (ps.get("shards") or [])]
    assert len(placements) >= 256
    for p in placements:
        rank, device = p.removeprefix("rank:").split("/")
        assert device == f"cuda:{int(rank) % 8}"
    assert main(["plan", "--tables", str(spec), "--world-size", "256", "--local-world-size", "3"]) == 2
    assert "--local-world-size: 3 does not divide --world-size 256" in capsys.readouterr().err
