"""benchmarks/bench_group_norm.py: tiny mode end to end, and its table and plot from rows with
both timings (the GPU path, with timings faked: CUDA graphs need a GPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from test_data import REPO, repo_env
import scripts


def test_bench_group_norm_tiny_smoke(tmp_path):
    env = repo_env(drop=["TRITON_INTERPRET"])  # torch path: fast
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "bench_group_norm.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "group_norm.json").read_text())
    assert (tmp_path / "group_norm.png").stat().st_size > 0
    assert result["copy_GBps"] > 0
    impls = {r["impl"] for r in result["rows"]}
    assert {"ck-default", "torch-autocast", "torch-bf16"} <= impls
    assert {(r["layout"], r["mode"]) for r in result["rows"]} == {
        (layout, mode) for layout in ("nchw", "nhwc") for mode in ("fwd", "fwd+bwd")
    }
    assert all(r["ms"] > 0 and r["GBps"] > 0 and r["host_us"] > 0 for r in result["rows"])
    # no CUDA graphs on the CPU: the graph column is empty, and says why
    assert all(r["graph_ms"] is None and r["graph_of_copy"] is None and "tiny mode" in r["graph_error"]
               for r in result["rows"])  # fmt: skip
    assert "no graph time for any row: not timed in tiny mode" in out.stdout
    assert [h["mode"] for h in result["host"]] == ["fwd", "fwd+bwd"]
    # which forward of ours ran (the torch backend here: no GPU, no interpreter); "-" for peers
    assert {r["forward"] for r in result["rows"] if r["impl"] == "ck-default"} <= {"single-pass", "split", "torch"}
    assert {r["forward"] for r in result["rows"] if not r["impl"].startswith("ck-")} == {"-"}


def test_bench_group_norm_impls_picks_implementations(tmp_path):
    script, env = os.path.join(REPO, "benchmarks", "bench_group_norm.py"), repo_env(drop=["TRITON_INTERPRET"])
    run = lambda *impls: subprocess.run([sys.executable, script, "--tiny", "--out", str(tmp_path), "--impls", *impls],  # noqa: E731
                                        capture_output=True, text=True, timeout=300, env=env)
    out = run("torch-bf16")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "group_norm.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"torch-bf16", "torch-autocast"}  # the baseline always runs
    bad = run("apex-nope")
    assert bad.returncode == 2 and "--impls apex-nope: not available here; available: ck-default" in bad.stderr


def load_bench(monkeypatch):
    return scripts.load("benchmarks/bench_group_norm.py", monkeypatch)


def test_table_and_plot_from_both_timings(monkeypatch, tmp_path, capsys):
    """As on a GPU: every call 1 ms eagerly; as a graph replay ours 0.25 ms, autocast 0.5 ms,
    a same-size copy 0.2 ms, and torch-bf16 cannot be captured; host time 50 us for ours, 20
    for the peers."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bench = load_bench(monkeypatch)
    graph_ms = {"ck-default": 0.25, "torch-autocast": 0.5, "torch-bf16": None, "copy": 0.2}
    impl = None

    def fake_timings(fn, tiny, eager, graph):
        assert not tiny
        ms = graph_ms[impl]
        times = None if ms is None else (ms, ms * 0.9, ms * 1.1)
        return (1.0, 0.9, 1.1), times, None if times else "RuntimeError: cannot capture", 50.0 if ms == 0.25 else 20.0

    monkeypatch.setattr(bench, "timings", fake_timings)
    rows = []
    for impl, (fn, param_dtype, layouts) in bench.peers(torch.device("cpu"), tiny=True).items():
        rows += bench.measure(impl, fn, param_dtype, (2, 64, 4), "nchw", torch.device("cpu"), on_gpu=True)
    for r in rows:
        r["res"] = "tiny"
    bench.add_ratios(rows, copy_gbps=1.0)
    bench.print_table(rows)
    hosts = bench.host_times([r for r in rows if r["impl"] != "copy"], "impl", "mode", lambda impl: impl.startswith("ck-"))
    bench.print_host_times(hosts)
    bench.plot(rows, 1.0, tmp_path / "group_norm.png", bench.run_meta("cpu"))
    json.dumps({"rows": rows, "host": hosts}, allow_nan=False)

    ours = {r["mode"]: r for r in rows if r["impl"] == "ck-default"}
    assert ours["fwd"]["speedup_vs_autocast"] == 1.0 and ours["fwd"]["graph_speedup_vs_autocast"] == 2.0
    assert ours["fwd"]["graph_of_copy"] == 4 * ours["fwd"]["of_copy"]
    assert ours["fwd"]["graph_of_same_size_copy"] == pytest.approx(0.2 / 0.25) and ours["fwd"]["of_same_size_copy"] == 1.0
    assert ours["fwd+bwd"]["graph_of_same_size_copy"] == pytest.approx(2.5 * 0.2 / 0.25)  # 5 units of bytes, the copy's 2
    assert [r["mode"] for r in rows if r["impl"] == "copy"] == ["fwd"]
    bf16 = next(r for r in rows if r["impl"] == "torch-bf16")
    assert bf16["graph_ms"] is None and bf16["graph_of_copy"] is None and bf16["graph_speedup_vs_autocast"] is None
    assert hosts[0] == {"mode": "fwd", "ours_us": {"ck-default": 50.0}, "best_peer": "torch-autocast", "best_peer_us": 20.0}
    out = capsys.readouterr().out
    assert "no graph time for torch-bf16 nchw fwd, torch-bf16 nchw fwd+bwd: RuntimeError: cannot capture" in out
    assert (tmp_path / "group_norm.png").stat().st_size > 0


def test_a_run_killed_mid_case_keeps_the_cases_before(monkeypatch, tmp_path):
    # run_gpu.sh's time limit killed the third H200 run's bench_group_norm mid-case: the JSON
    # is rewritten after every case, so what was measured stays.
    bench = load_bench(monkeypatch)
    measure, calls = bench.measure, []

    def killed_at_the_second(*args):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(*args)

    monkeypatch.setattr(bench, "measure", killed_at_the_second)
    monkeypatch.setattr(sys, "argv", ["bench_group_norm.py", "--tiny", "--out", str(tmp_path)])
    with pytest.raises(KeyboardInterrupt):
        bench.main()
    saved = json.loads((tmp_path / "group_norm.json").read_text())
    assert {r["impl"] for r in saved["rows"]} == {calls[0]} and saved["host"] is None


def test_the_apex_peer_takes_the_cases_weights_and_gives_their_grads(monkeypatch):
    # apex is not installable here: a stand-in with its module's interface (torch's GroupNorm
    # plus act="silu"). The peer must differentiate w.r.t. the case's w and b, copy nothing.
    import types

    import torch.nn.functional as F

    class GroupNorm(torch.nn.GroupNorm):
        def __init__(self, groups, channels, act=""):
            super().__init__(groups, channels)
            self.act = act

        def forward(self, x):
            return F.silu(super().forward(x))

    apex = types.ModuleType("apex.contrib.group_norm")
    apex.GroupNorm = GroupNorm
    monkeypatch.setitem(sys.modules, "apex.contrib.group_norm", apex)
    bench = load_bench(monkeypatch)
    fn, param_dtype, layouts = bench.peers(torch.device("cpu"), tiny=False)["apex"]
    assert layouts == ("nhwc",)
    x, w, b = (t.requires_grad_() for t in (torch.randn(2, 64, 3, 3), torch.randn(64), torch.randn(64)))
    dy = torch.randn_like(x)
    for _ in range(2):  # the second call reuses the module
        grads = torch.autograd.grad(fn(x, w, b), (x, w, b), dy)
        expected = torch.autograd.grad(bench.eager_silu_group_norm(x, w, b), (x, w, b), dy)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want)
