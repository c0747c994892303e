"""benchmarks/bench_attention.py: tiny mode end to end, and its tables and plot from rows with
both timings (the GPU path, with timings faked: CUDA graphs need a GPU)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cckernels as ck
from test_data import repo_env
import scripts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    return scripts.load("benchmarks/bench_attention.py", monkeypatch)


def run_tiny(tmp_path, *args):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--tiny", "--out", str(tmp_path), *args]
    done = subprocess.run(cmd, env=repo_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads((tmp_path / "attention.json").read_text())


def test_benchmark_tiny_mode(tmp_path):
    stdout, result = run_tiny(tmp_path)
    rows = result["rows"]
    assert {r["backend"] for r in rows} >= {"triton", "triton atomic-dQ", "triton deterministic", "torch-reference"}
    assert (tmp_path / "attention.png").stat().st_size > 0
    # no CUDA graphs on the CPU: the graph column is empty, and says why
    assert all(r["graph_ms"] is None and "tiny mode" in r["graph_error"] and r["host_us"] > 0 for r in rows)
    assert "no graph time for any row: not timed in tiny mode" in stdout
    assert {h["pass"] for h in result["host"]} == {"fwd", "fwd+bwd"}
    # our kernels' block shapes as launched: the forward alone, then the backward's kernels too
    configs = {(r["shape"], r["pass"], r["backend"]): r["configs"] for r in rows if "configs" in r}
    assert configs[("tiny self L=130", "fwd", "triton")].keys() == {"fwd"}
    assert configs[("tiny self L=130", "fwd+bwd", "triton deterministic")].keys() == {"fwd", "dkdv", "dq"}
    assert configs[("tiny self L=130", "fwd+bwd", "triton atomic-dQ")].keys() == {"fwd", "dkdv"}
    # short keys: no atomic-dQ row (one kernel either way), a row with 4 waves of dK/dV splits
    cross = {r["backend"] for r in rows if r["shape"] == "tiny cross L=16" and r["pass"] == "fwd+bwd"}
    assert "triton 4 waves" in cross and "triton atomic-dQ" not in cross
    assert all(" w" in c and " s" in c for r in configs.values() for c in r.values())
    assert "our kernels' block shapes" in stdout


def test_benchmark_saves_after_every_shape(bench):
    # A GPU run cut by its step's timeout (a shape's first autotuning compiles dozens of
    # configs) still leaves the shapes measured so far.
    saved = []
    fns = {"torch-reference": lambda q, k, v: ck.attention(q, k, v, backend="torch")}
    rows = bench.measure(fns, bench.TINY_SHAPES, "cpu", torch.float32, True, save=lambda r: saved.append(len(r)))
    assert saved == [len(rows) // 2, len(rows)]


def test_benchmark_budget_measures_the_first_shape_only(tmp_path):
    stdout, result = run_tiny(tmp_path, "--budget-s", "0")
    assert "not measured: tiny cross L=16" in stdout
    assert {r["shape"] for r in result["rows"]} == {"tiny self L=130"}


def test_benchmark_only_the_named_shapes(tmp_path):
    _, result = run_tiny(tmp_path, "--only", "cross")
    assert {r["shape"] for r in result["rows"]} == {"tiny cross L=16"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--tiny", "--out", str(tmp_path),
           "--only", "512px"]
    done = subprocess.run(cmd, env=repo_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no shape matches" in done.stderr


def test_tables_and_plot_from_both_timings(bench, monkeypatch, tmp_path, capsys):
    """As on a GPU: every row timed eagerly (1 ms) and, but for one backend that cannot be
    captured, as a graph replay (ours 0.25 ms, peers 0.5 ms); host time 100 us."""
    monkeypatch.setattr(ck, "used_backends", lambda: {"attention": "triton"})  # "triton" is the reference here
    reference = lambda q, k, v: ck.attention(q, k, v, backend="torch")  # noqa: E731
    fns = {"triton": reference, "sdpa-flash": reference, "sdpa-cudnn": reference}
    # per shape: triton fwd, its two backward variants, then each peer's fwd and fwd+bwd
    graph_ms = [0.25, 0.25, 0.25, 0.5, 0.5, None, None]
    calls = []

    def fake_timings(fn, tiny, grads=(), eager=None, graph=None):
        assert not tiny
        ms = graph_ms[len(calls) % len(graph_ms)]
        calls.append(fn)
        graph = None if ms is None else (ms, ms * 0.9, ms * 1.1)
        return (1.0, 0.9, 1.1), graph, None if graph else "RuntimeError: cannot capture", 100.0

    monkeypatch.setattr(bench, "timings", fake_timings)
    rows = bench.measure(fns, bench.TINY_SHAPES, "cpu", torch.float32, tiny=False)
    assert len(rows) == 2 * len(graph_ms)
    summary, hosts = bench.summarize(rows), bench.host_times(rows, "backend", "pass", bench.ours)
    checks = bench.targets(summary)
    bench.print_table(rows, summary, hosts, checks)
    bench.plot(rows, tmp_path / "attention.png", bench.run_meta("cpu"))
    json.dumps({"rows": rows, "summary": summary, "host": hosts, "targets": checks}, allow_nan=False)

    fwd = next(s for s in summary if s["backend"] == "triton" and s["pass"] == "fwd")
    assert fwd["speedup_vs"] == {"sdpa-flash": 1.0, "sdpa-cudnn": 1.0}  # eager: host-bound alike
    assert fwd["graph_speedup_vs"] == {"sdpa-flash": 2.0}  # no graph time for cudnn: no ratio
    assert fwd["graph_speedup_vs_best_sdpa"] == 2.0 and fwd["speedup_vs_best_sdpa"] == 1.0
    assert math.isclose(fwd["graph_tflops"], 4 * fwd["tflops"])
    cross = [c for c in checks if "cross" in c[0]]
    assert cross and all(c[1:] == (False, True) for c in cross)  # 1.2x: missed eager, met in the graph
    assert hosts[0] == {"pass": "fwd", "ours_us": {"triton": 100.0}, "best_peer": "sdpa-flash", "best_peer_us": 100.0}
    out = capsys.readouterr().out
    assert "no graph time for sdpa-cudnn fwd, sdpa-cudnn fwd+bwd: RuntimeError: cannot capture" in out
    assert "eager 1.00  graph 2.00" in out
    assert (tmp_path / "attention.png").stat().st_size > 0
