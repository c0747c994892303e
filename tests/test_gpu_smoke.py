"""benchmarks/gpu_smoke.py's bookkeeping on a CPU: every check runs in a child process, and one
that fails or does not answer in time has its path's variable exported as 0."""
import pytest
import torch

import scripts


@pytest.fixture(scope="module")
def smoke():
    return scripts.load("benchmarks/gpu_smoke.py")


def test_without_a_gpu_nothing_is_switched_off(smoke, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert smoke.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "smoke.env").read_text() == ""


@pytest.mark.parametrize("timeout_s", [300, 0.01])
def test_a_check_that_fails_or_hangs_switches_its_path_off(smoke, tmp_path, monkeypatch, capsys, timeout_s):
    # The parent believes in a GPU; the children find none, so every check with something to
    # check fails (or, at 10 ms, none can even start in time). Without the CUDA GroupNorm
    # kernels (no nvcc at install) those checks have nothing to check, and pass.
    from cckernels import cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert smoke.main(["--out", str(tmp_path), "--timeout-s", str(timeout_s)]) == 0
    failing = [variable for name, (_, variable) in smoke.CHECKS.items()
               if timeout_s < 1 or not name.startswith("group_norm") or hasattr(cuda.loaded(), "group_norm_forward")]
    exports = (tmp_path / "smoke.env").read_text().splitlines()
    assert [line.split("  #")[0] for line in exports] == [f"export {variable}=0" for variable in failing]
    out = capsys.readouterr().out
    assert out.count("FAILED") == len(failing)
    assert ("no answer in" in out) == (timeout_s < 1)


def test_close_fails_on_nan_and_on_errors_beyond_the_tolerance(smoke):
    want = torch.tensor([1.0, -2.0])
    smoke.close("ok", want + 0.03, want)
    for got in (want + 0.05, torch.tensor([1.0, float("nan")])):
        with pytest.raises(AssertionError, match="max error"):
            smoke.close("bad", got, want)


def test_the_group_norm_reference_is_torch_group_norm_with_silu_and_the_skip_gradient(smoke):
    x, dy, skip, w, b, (y, mean, rstd, dx, dw, db) = smoke.group_norm_case((2, 64, 5, 3), device="cpu")
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    z = torch.nn.functional.group_norm(leaves[0], 32, leaves[1], leaves[2], 1e-5)
    torch.nn.functional.silu(z).backward(dy.double())
    torch.testing.assert_close(y.double(), torch.nn.functional.silu(z).detach(), rtol=1e-5, atol=1e-5)
    groups = x.double().reshape(2, 32, -1)
    torch.testing.assert_close(mean.double(), groups.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd.double(), (groups.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=0)
    for got, want in ((dx, leaves[0].grad + skip.double()), (dw, leaves[1].grad), (db, leaves[2].grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_the_attention_check_runs_the_tma_path_on_cpu(smoke, tma_reductions_on_cpu, capsys):
    # Triton's interpreter with the descriptor reductions test_attention adds: the check as a
    # GPU visit runs it, at a size the interpreter takes (130 keys: over one 128-key block)
    smoke.check_attention_tma_dq(shapes=((2, 130, 2),), device="cpu")
    assert tma_reductions_on_cpu == [2 * 64] * 2  # the check's question, then the dK/dV launch's
    assert "the atomic dQ by TMA reductions passes" in capsys.readouterr().out
