"""benchmarks/profile_host.py --tiny: every case runs on the CPU and gets its time and profile."""
import subprocess
import sys
from pathlib import Path

from test_data import repo_env

ROOT = Path(__file__).resolve().parents[1]


def test_profile_host_tiny(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_host.py"), "--tiny", "--out", str(tmp_path)]
    subprocess.run(cmd, env=repo_env(), check=True, capture_output=True, text=True, timeout=300)
    report = (tmp_path / "profile_host.txt").read_text()
    for case in ("attention self L=8 triton", "attention cross Lk=77 sdpa", "group_norm 2x64x4x4 nhwc triton",
                 "group_norm 2x64x4x4 nhwc torch F.group_norm+silu", "geglu 8x32 triton", "geglu 8x32 torch gelu*mul",
                 "layer_norm 8x4 + residual triton", "layer_norm 8x4 + residual torch add+F.layer_norm"):
        assert f"== {case}: " in report, case
    assert report.count("us per forward+backward") == report.count("ncalls")
