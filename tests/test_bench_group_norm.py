import json
import os
import subprocess
import sys

from test_data import REPO, repo_env


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
    assert all(r["ms"] > 0 and r["GBps"] > 0 for r in result["rows"])
    # which forward of ours ran (the torch backend here: no GPU, no interpreter); "-" for peers
    assert {r["forward"] for r in result["rows"] if r["impl"] == "ck-default"} <= {"single-pass", "split", "torch"}
    assert {r["forward"] for r in result["rows"] if not r["impl"].startswith("ck-")} == {"-"}
