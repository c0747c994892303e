"""Smoke test of benchmarks/traffic_audit.py on the tiny config: per-image groups, JSON."""
import json

import pytest

import scripts


@pytest.fixture
def audit(monkeypatch):
    return scripts.load("benchmarks/traffic_audit.py", monkeypatch)  # it imports bench_train


def test_tiny_run_groups_the_traffic_that_grows_with_the_image(audit, tmp_path):
    rows = audit.main(["--tiny", "--top", "5", "--out", str(tmp_path)])  # --top cuts the print, not the rows
    saved = json.loads((tmp_path / "traffic_audit.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["total_GB"] > 0
    assert all(r["MB"] > 0 and r["calls"] > 0 for r in rows)
    places = {(r["op"], r["where"]) for r in rows}
    assert ("convolution_backward.default", "bwd:ConvolutionBackward0") in places
    assert any(where.startswith("fwd:") and ".0." not in where for _, where in places)  # block indices folded
    # What a GPU runs apart from a convolution with a bias: the bias's add_ and its gradient's sum.
    gpu = {(r["op"], r["where"]): r["MB"] for r in rows if r["op"].endswith("(GPU)")}
    assert ("convolution_backward bias sum (GPU)", "bwd:ConvolutionBackward0") in gpu
    assert ("convolution bias add_ (GPU)", "fwd:conv_in") in gpu


def test_a_row_not_on_the_ladder_lists_the_valid_ones(audit):
    with pytest.raises(ValueError, match=r"valid: baseline, \+ our attention"):
        audit.main(["--tiny", "--row", "+ warp drive"])
