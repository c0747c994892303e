"""Smoke test of benchmarks/bench_layer_norm.py's tiny mode: table, JSON and plot."""
import os

import scripts
from test_bench_geglu import run_tiny


def test_tiny_run_writes_table_json_and_plot(tmp_path, monkeypatch, capsys):
    # TRITON_INTERPRET stays as conftest.py set it: without a GPU "ck" runs its Triton kernels in
    # the interpreter (one 64 x 96 shape: seconds), so the benchmark's call of them is run too.
    rows = run_tiny("layer_norm", tmp_path, monkeypatch)
    impls = ("ck", "torch-autocast", "torch-bf16")
    assert {(r["impl"], r["mode"]) for r in rows} == {(i, m) for i in impls for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["ms"] > 0 and r["of_copy"] > 0 and r["bytes"] == (4 if r["mode"] == "fwd" else 8) * r["tokens"] * r["C"] * 2
        base = next(b for b in rows if b["impl"] == "torch-autocast" and b["mode"] == r["mode"])
        assert r["speedup_vs_baseline"] == base["ms"] / r["ms"]  # no graph time in tiny mode: the eager times
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert {r["backend"] for r in rows if r["impl"] == "ck"} == {"triton" if interpreted else "torch"}
    assert "x torch-autocast" in capsys.readouterr().out


def test_no_autograd_graph_is_alive_while_cases_are_timed(tmp_path, monkeypatch):
    # A graph made before the timing (on the default stream) and kept alive breaks the capture
    # of the backward on a side stream (see measure()); the H200 run of 2026-11-27 died of it.
    import gc

    import torch

    monkeypatch.syspath_prepend(str(scripts.ROOT / "benchmarks"))  # bench_layer_norm imports it so too
    import token_ops

    timed = []

    def checking_time_modes(*args):
        gc.collect()
        timed.append([t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.grad_fn is not None])
        return real_time_modes(*args)

    real_time_modes = token_ops.time_modes
    monkeypatch.setattr(token_ops, "time_modes", checking_time_modes)
    run_tiny("layer_norm", tmp_path, monkeypatch)
    assert len(timed) == 3 and timed == [[]] * 3
