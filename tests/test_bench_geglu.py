"""Smoke test of benchmarks/bench_geglu.py's tiny mode: table, JSON and plot."""
import json

import scripts


def run_tiny(op, tmp_path, monkeypatch):
    """benchmarks/bench_{op}.py --tiny into tmp_path: its rows, checked against its JSON and PNG."""
    bench = scripts.load(f"benchmarks/bench_{op}.py", monkeypatch)
    rows = bench.main(["--tiny", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / f"{op}.json").read_text())
    assert (tmp_path / f"{op}.png").stat().st_size > 0
    assert saved["rows"] == json.loads(json.dumps(rows))
    return rows


def test_tiny_run_writes_table_json_and_plot(tmp_path, monkeypatch, capsys):
    # Timing Triton's interpreter says nothing; the kernels are tested in test_geglu.py.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = run_tiny("geglu", tmp_path, monkeypatch)
    assert {(r["impl"], r["mode"]) for r in rows} == {(i, m) for i in ("ck", "torch") for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["ms"] > 0 and r["of_copy"] > 0 and r["bytes"] == (3 if r["mode"] == "fwd" else 8) * r["tokens"] * r["F"] * 2
    assert [r["speedup_vs_baseline"] for r in rows if r["impl"] == "torch"] == [1.0, 1.0]
    assert "x torch" in capsys.readouterr().out
