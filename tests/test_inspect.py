"""Ahead-of-time compile checks (python -m cckernels.inspect) for sm80/sm90, on a CPU machine.

The compile run happens once per session in a subprocess without TRITON_INTERPRET (the
interpreter replaces the kernels and their autotune configs) and is cached on disk by
content, so reruns cost seconds. It covers every kernel on both archs in bf16 (the training
dtype) with the first config each kernel keeps; `python -m cckernels.inspect` covers every
config and dtype.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cckernels import inspect as ck_inspect
from test_data import repo_env

ROOT = Path(__file__).resolve().parent.parent
OPS = ("attention", "group_norm", "geglu", "layer_norm", "ema_update_", "adamw_ema_")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """(rows, stderr) of one quick run: bf16 (fp32-only kernels in fp32), attention at head
    dim 80 (128-wide tiles, masked; both backward variants), both GroupNorm layouts, GEGLU's
    and LayerNorm's int32 offsets, column_sum's LayerNorm-shaped tiles, csrc for sm90."""
    out = tmp_path_factory.mktemp("inspect") / "rows.json"
    env = repo_env(drop=["TRITON_INTERPRET"])
    cmd = [sys.executable, "-m", "cckernels.inspect", "--quick", "--dtype", "bf16",
           "--variant", "-", "d80", "d80-atomic-dq", "nchw", "nhwc", "int32", "rows",
           "--cuda-arch", "90", "--jobs", "2", "--json", str(out)]  # fmt: skip
    if shutil.which("nvcc") is None:
        cmd.append("--no-cuda")
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), run.stderr[-3000:]
    return json.loads(out.read_text()), run.stderr


@pytest.mark.parametrize("op", OPS)
def test_kernels_compile_fit_and_do_not_spill(report, op):
    rows, _ = report
    mine = [r for r in rows if r["op"] == op]
    assert {r["arch"] for r in mine if r["kind"] == "triton"} == {80, 90}
    failed = ck_inspect.failures(mine)
    assert not failed, "\n".join(failed)


def test_every_kernel_has_a_spec(report):
    _, stderr = report
    assert "no INSPECT entry" not in stderr, stderr[-3000:]


def test_attention_uses_tensor_cores(report):
    rows, _ = report
    for r in rows:
        if r["op"] == "attention" and r["kernel"] not in ("_attn_bwd_delta_kernel", "_attn_bwd_dq_convert_kernel"):
            assert r["counts"]["hgmma" if r["arch"] == 90 else "hmma"] > 0, r


def test_streaming_kernels_load_16_bytes_on_sm90(report):
    rows, _ = report
    sm90 = [r for r in rows if r["arch"] == 90]
    streaming = [r for r in sm90 if r["kind"] == "triton" and r["dtype"] == "bfloat16" and r["op"] != "attention"]
    # 4 GroupNorm passes and its single pass, EMA, AdamW+EMA, GEGLU's 2, LayerNorm's 2, column_sum
    assert len({r["kernel"] for r in streaming}) == 12
    for r in streaming:
        assert r["counts"]["ldg128"] > 0, r
    vectorized = [r for r in sm90 if r["kind"] == "cuda" and re.search(r"Functor|, 8, ", r["config"])]
    for r in vectorized:  # csrc: the EMA functors and the 8-wide bf16/fp16 GroupNorm instantiations
        # (the single pass: 16-byte cp.async, global to shared)
        assert r["counts"]["ldg128" if "single_pass" not in r["kernel"] else "ldgsts"] > 0, r


# ---- the machinery on synthetic input: no compiler needed --------------------------------
USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _k:
  REG:40 STACK:8 SHARED:1024 LOCAL:0 CONSTANT[0]:616 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
SASS = """
\tcode for sm_90a
\t\tFunction : _k
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;   /* 0x0000000402047981 */
                                                                     /* 0x000ea8000c1e1d00 */
        /*0010*/              @!P0 LDG.E.128.CONSTANT R8, desc[UR4][R2.64+0x10] ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;
        /*0040*/                   STL.64 [R1], R20 ;
        /*0050*/                   STG.E desc[UR4][R6.64], R0 ;
"""


def test_cubin_parsing():
    (info,) = ck_inspect.count_instructions(SASS, ck_inspect.parse_resource_usage(USAGE)).values()
    assert (info["regs"], info["static_smem"], info["local"]) == (40, 1024, 8)
    counts = {k: v for k, v in info["counts"].items() if v}
    assert counts == {"ldg128": 2, "ldg": 2, "hgmma": 1, "ldgsts": 1, "stl": 1, "stg": 1}


def _row(**kw):
    counts = dict.fromkeys(ck_inspect.COUNTERS, 0)
    counts.update(kw.pop("counts", {}))
    return {"arch": 90, "smem": 1024, "local": 0, "config": "BLOCK_M=64 w4 s3", "counts": counts, **kw}


def test_expectations():
    check = ck_inspect.check
    assert check(_row(counts={"hgmma": 4}), {"sm90": {"hgmma": True}}) == ("ok", [])
    assert check(_row(arch=80), {"sm90": {"hgmma": True}}) == ("ok", [])  # sm90-only expectation
    assert check(_row(), {"sm90": {"hgmma": True}})[0] == "FAIL"
    assert check(_row(counts={"ldg128": 2}), {"ldg128": False})[0] == "FAIL"
    assert "shared memory" in check(_row(smem=228 * 1024), {})[1][0]
    assert check(_row(arch=80, smem=200 * 1024), {})[0] == "FAIL"
    assert "spills" in check(_row(local=16), {})[1][0]
    assert "does not compile" in check({"error": "boom", "config": "-", "arch": 90}, {})[1][0]
    assert check(_row(smem=10**6), {}, kept={"other"}) == ("pruned", [])


def test_signature_from_spec():
    class Fn:
        arg_names = ["X", "Y", "n", "stride_a", "stride_b", "scale", "BLOCK"]

    args = {"X": "*T", "*": "*fp32", "n": "i32", "stride_*": "i32:16", "stride_b": 1, "scale": "fp32", "BLOCK": 64}
    signature, constexprs, attrs = ck_inspect.triton_signature(Fn, args, "bf16")
    assert signature == {"X": "*bf16", "Y": "*fp32", "n": "i32", "stride_a": "i32", "stride_b": "constexpr",
                         "scale": "fp32", "BLOCK": "constexpr"}  # fmt: skip
    assert constexprs == {"stride_b": 1, "BLOCK": 64}
    assert set(attrs) == {(0,), (1,), (3,)}  # pointers and the divisible-by-16 stride


# ---- the command line: a user's mistake is one line, before anything compiles -------------
def usage_error(capsys, *argv):
    """The one-line message main() exits with (status 2, argparse's) for these arguments."""
    with pytest.raises(SystemExit) as exit:
        ck_inspect.main(list(argv))
    assert exit.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("jobs", ["0", "-1", "two"])
def test_jobs_is_at_least_one(capsys, jobs):
    assert "--jobs: expected an integer >= 1" in usage_error(capsys, "--jobs", jobs)


def test_json_path_is_checked_before_compiling(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(ck_inspect, "collect", lambda *a, **k: pytest.fail("compiled before checking --json"))
    (tmp_path / "a_file").touch()
    assert "--json" in usage_error(capsys, "--json", str(tmp_path / "a_file" / "rows.json"))


@pytest.mark.parametrize("missing, message", [
    ("triton", "pip install triton"),
    ("cuobjdump", "cuobjdump is neither in Triton's wheel nor on PATH"),
    ("interpreter off", "unset TRITON_INTERPRET"),
])  # fmt: skip
def test_what_every_row_needs_is_checked_first(capsys, monkeypatch, missing, message):
    monkeypatch.setattr(ck_inspect, "collect", lambda *a, **k: pytest.fail("compiled without what it needs"))
    monkeypatch.setenv("TRITON_INTERPRET", "1" if missing == "interpreter off" else "0")
    if missing == "triton":
        monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    if missing == "cuobjdump":
        monkeypatch.setattr(ck_inspect, "tool", lambda name: None)
    assert message in usage_error(capsys, "--op", "ema_update_")


def test_without_nvcc_the_triton_rows_come_and_a_note_says_csrc_was_skipped():
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvcc").exists())
    cmd = [sys.executable, "-m", "cckernels.inspect", "--op", "ema_update_", "--quick", "--arch", "90",
           "--dtype", "fp32", "--jobs", "1", "--markdown"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=repo_env(drop=["TRITON_INTERPRET"], PATH=path), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| triton | _ema_kernel |" in run.stdout and "| cuda |" not in run.stdout
    for output in (run.stdout, run.stderr):  # the page says so, and so does the terminal
        assert "csrc rows skipped: nvcc is not on PATH" in output


@pytest.mark.parametrize("argv, message", [
    (["--kernel", "nope"], "unknown --kernel ['nope']"),
    (["--op", "ema_update_", "--variant", "d64"], "unknown --variant ['d64']; known, given the other options: ['-']"),
    (["--kernel", "_ema_kernel", "--variant", "d64"], "unknown --variant ['d64']"),
])  # fmt: skip
def test_kernel_and_variant_names_are_checked(argv, message):
    # a subprocess: this one's kernels are Triton's interpreter's, which inspect refuses
    cmd = [sys.executable, "-m", "cckernels.inspect", *argv]
    run = subprocess.run(cmd, cwd=ROOT, env=repo_env(drop=["TRITON_INTERPRET"]), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 2 and message in run.stderr.splitlines()[-1], run.stderr[-3000:]
