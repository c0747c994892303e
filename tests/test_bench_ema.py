"""Smoke test of benchmarks/bench_ema.py's tiny mode, and its SD2 parameter list."""
import json
import math

import scripts


def load_bench(monkeypatch):
    return scripts.load("benchmarks/bench_ema.py", monkeypatch)


def test_sd2_parameter_list(monkeypatch):
    shapes = load_bench(monkeypatch).sd2_shapes()
    assert len(shapes) == 686
    assert sum(math.prod(s) for s in shapes) == 865_910_724


def test_tiny_run_writes_table_json_and_plot(tmp_path, monkeypatch, capsys):
    # Timing Triton's interpreter says nothing; its kernels are tested in test_ema_update.py.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    result = load_bench(monkeypatch).main(["--tiny", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_ema.json").read_text())
    assert (tmp_path / "bench_ema.png").stat().st_size > 0
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    methods = {(r["bench"], r["dtype"], r["method"]) for r in saved["rows"]}
    for dtype in ("bf16", "fp32"):
        assert ("ema", dtype, "torch._foreach_lerp_ (+casts)") in methods
        assert ("adamw_ema", dtype, "FusedAdamWEMA torch") in methods
        assert ("adamw_ema", dtype, "AdamW(fused) + ck.ema_update_") in methods
    assert all(r["ms"] > 0 and r["GBps"] > 0 for r in saved["rows"])
    ema_rows = [r for r in saved["rows"] if r["bench"] == "ema"]
    assert all(r["host_us"] > 0 and r["graph_ms"] is None and "tiny mode" in r["graph_error"] for r in ema_rows)
    assert "copy bandwidth" in capsys.readouterr().out


def test_a_row_whose_backend_fell_back_says_which_ran(monkeypatch):
    bench = load_bench(monkeypatch)
    monkeypatch.setattr(bench.ck, "used_backends", lambda: {"adamw_ema_": "triton", "ema_update_": "cuda"})
    assert bench.label("FusedAdamWEMA cuda") == "FusedAdamWEMA cuda (ran triton)"
    assert bench.label("ck.ema_update_ cuda") == "ck.ema_update_ cuda"
    assert bench.label("torch._foreach_lerp_ (+casts)") == "torch._foreach_lerp_ (+casts)"
