"""Smoke test of benchmarks/bench_layer_norm.py's tiny mode: table, JSON and plot."""
import importlib.util
import json
import os
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_tiny_run_writes_table_json_and_plot(tmp_path, monkeypatch, capsys):
    # TRITON_INTERPRET stays as conftest.py set it: without a GPU "ck" runs its Triton kernels in
    # the interpreter (one 64 x 96 shape: seconds), so the benchmark's call of them is run too.
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its siblings
    spec = importlib.util.spec_from_file_location("bench_layer_norm", BENCHMARKS / "bench_layer_norm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--tiny", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "layer_norm.json").read_text())
    assert (tmp_path / "layer_norm.png").stat().st_size > 0
    assert saved["rows"] == json.loads(json.dumps(rows))
    impls = ("ck", "torch-autocast", "torch-bf16")
    assert {(r["impl"], r["mode"]) for r in rows} == {(i, m) for i in impls for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["ms"] > 0 and r["of_copy"] > 0 and r["bytes"] == (4 if r["mode"] == "fwd" else 8) * r["tokens"] * r["C"] * 2
        base = next(b for b in rows if b["impl"] == "torch-autocast" and b["mode"] == r["mode"])
        assert r["speedup_vs_baseline"] == base["ms"] / r["ms"]  # no graph time in tiny mode: the eager times
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert {r["backend"] for r in rows if r["impl"] == "ck"} == {"triton" if interpreted else "torch"}
    assert "x torch-autocast" in capsys.readouterr().out
