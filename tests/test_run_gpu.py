"""benchmarks/run_gpu.sh ends by RUN_GPU_BUDGET_S whatever its steps do, with summary.md written.

A stand-in interpreter answers the script's one-line queries at once and hangs on every step,
so no GPU (and no real step) is needed: the first step is cut to what the total leaves, and
the steps after it are skipped and listed as such.
"""
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
case "$1" in
    -c) case "$2" in *device_count*) echo 1 ;; *get_device_name*) echo "NVIDIA Stand-in" ;; *) echo cpu ;; esac ;;
    -) cat > /dev/null ;;
    *) env | grep '^CCKERNELS_ATTENTION_TMA_DQ=' ; exec sleep 30 ;;
esac
"""


def test_run_gpu_ends_inside_its_total_budget(tmp_path):
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(python), RUN_GPU_BUDGET_S="36", CARRY_SCRATCH=str(tmp_path / "carry"))
    start = time.monotonic()
    subprocess.run([str(ROOT / "benchmarks" / "run_gpu.sh"), str(out)], env=env, check=True,
                   capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 36
    rows = {line.split("|")[1].strip(): line for line in (out / "summary.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| step")}
    first = "build" if (ROOT / "setup.py").exists() else "pytest-gpu"
    assert rows[first].split("|")[2].strip() == "124"  # cut by its timeout: 36 s less 25 s
    assert int(rows[first].split("|")[4]) <= 11
    for name in ("bench_attention", "bench_group_norm", "bench_ema", "bench_data", "profile_host", "bench_train"):
        assert "skipped: RUN_GPU_BUDGET_S=36 spent" in rows[name], rows[name]
    # The headline first: a short run cuts the kernel benchmarks, not the training table.
    order = list(rows)
    assert order.index("bench_train") == order.index("pytest-gpu") + 1
    assert order[-2:] == ["bench_attention", "bench_data"]


def test_run_gpu_runs_only_the_steps_named(tmp_path):
    """RUN_GPU_STEPS (a follow-up call on a warm machine): the steps it names run, the others,
    the build included, are listed as skipped."""
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(python), RUN_GPU_BUDGET_S="36", RUN_GPU_STEPS="bench_ema bench_emma",
               CARRY_SCRATCH=str(tmp_path / "carry"))
    subprocess.run([str(ROOT / "benchmarks" / "run_gpu.sh"), str(out)], env=env, check=True,
                   capture_output=True, text=True, timeout=120)
    rows = {line.split("|")[1].strip(): line for line in (out / "summary.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| step")}
    assert rows["bench_ema"].split("|")[2].strip() == "124"  # it ran (the stand-in hangs until the budget)
    assert "not a step (RUN_GPU_STEPS)" in rows["bench_emma"]  # a typo is said, not skipped silently
    for name in ("pytest-gpu", "bench_train", "bench_group_norm", "bench_attention", "bench_data"):
        assert "skipped: not in RUN_GPU_STEPS" in rows[name], rows[name]
    if (ROOT / "setup.py").exists():
        assert "skipped: not in RUN_GPU_STEPS" in rows["build"]


def test_a_follow_up_call_keeps_the_paths_smoke_switched_off(tmp_path):
    """A smoke step's switches (gpu_smoke.py's smoke.env, kept in the carry folder) hold for a
    follow-up call on the same machine that does not run smoke: its steps see them, and
    summary.md lists them."""
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    (tmp_path / "carry").mkdir()
    (tmp_path / "carry" / "smoke.env").write_text("export CCKERNELS_ATTENTION_TMA_DQ=0  # attention_tma_dq failed\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(python), RUN_GPU_BUDGET_S="36", RUN_GPU_STEPS="bench_ema",
               CARRY_SCRATCH=str(tmp_path / "carry"))
    env.pop("CCKERNELS_ATTENTION_TMA_DQ", None)
    subprocess.run([str(ROOT / "benchmarks" / "run_gpu.sh"), str(out)], env=env, check=True,
                   capture_output=True, text=True, timeout=120)
    assert "CCKERNELS_ATTENTION_TMA_DQ=0" in (out / "logs" / "bench_ema.log").read_text()
    summary = (out / "summary.md").read_text()
    assert "Switched off for the steps after smoke" in summary and "- `CCKERNELS_ATTENTION_TMA_DQ=0`" in summary


def test_run_gpu_refuses_a_machine_without_a_gpu_and_a_folder_with_files(tmp_path):
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON.replace('echo "NVIDIA Stand-in"', "echo cpu"))
    python.chmod(0o755)
    env = dict(os.environ, PYTHON=str(python), RUN_GPU_BUDGET_S="36", CARRY_SCRATCH=str(tmp_path / "carry"))
    script = str(ROOT / "benchmarks" / "run_gpu.sh")
    run = subprocess.run([script, str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "no GPU here" in run.stderr and not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.md").write_text("an earlier run's\n")
    env["RUN_GPU_ALLOW_CPU"] = "1"
    run = subprocess.run([script, str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "already holds files" in run.stderr
    assert (tmp_path / "out" / "summary.md").read_text() == "an earlier run's\n"
