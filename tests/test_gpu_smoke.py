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
    # The parent believes in a GPU; the children find none, so every check fails (or, at 10 ms,
    # cannot even start in time).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert smoke.main(["--out", str(tmp_path), "--timeout-s", str(timeout_s)]) == 0
    exports = (tmp_path / "smoke.env").read_text().splitlines()
    assert [line.split("  #")[0] for line in exports] == [f"export {variable}=0" for _, variable in smoke.CHECKS.values()]
    out = capsys.readouterr().out
    assert out.count("FAILED") == len(smoke.CHECKS)
    assert ("no answer in" in out) == (timeout_s < 1)


def test_close_fails_on_nan_and_on_errors_beyond_the_tolerance(smoke):
    want = torch.tensor([1.0, -2.0])
    smoke.close("ok", want + 0.03, want)
    for got in (want + 0.05, torch.tensor([1.0, float("nan")])):
        with pytest.raises(AssertionError, match="max error"):
            smoke.close("bad", got, want)
