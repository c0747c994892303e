"""benchmarks/ncu_kernels.py --tiny: every case's calls run on the CPU (no profiler), named on
stdout; --budget-s stops starting cases."""
import subprocess
import sys
from pathlib import Path

from test_data import repo_env

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ncu_kernels.py"), "--tiny", *args]
    return subprocess.run(cmd, env=repo_env(), check=True, capture_output=True, text=True, timeout=300).stdout


def test_ncu_kernels_tiny():
    lines = run().splitlines()
    assert [line.split()[1] for line in lines] == ["group_norm", *["attention"] * 3, "geglu", "layer_norm"]
    assert all(line.startswith("== ") and "(backend " in line for line in lines), lines
    assert all("not profiled" in line for line in run("--budget-s", "0").splitlines())
