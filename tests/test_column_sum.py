"""column_sum, the fixed-order sum of fp32 partials behind LayerNorm's, GEGLU's and attention's
backwards (interpreter on CPU): against fp64, into strided outputs, reproducible, bad input."""
import pytest
import torch

from cckernels.triton.column_sum import column_sum

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # relative: fp32 sums, then one rounding


def check_against_fp64(P, rows, cols, dtype):
    partial = torch.randn(P, rows, cols, device=DEVICE) * 3 + 0.5
    out = torch.full((rows, cols), float("nan"), device=DEVICE, dtype=dtype)
    assert column_sum(partial, out) is out
    want = partial.double().sum(0)
    assert torch.allclose(out.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * (1 + P) ** 0.5)


# P = 300: two row tiles of 256, the second partial (the interpreter's time grows with the
# programs: 30 x 257 at P = 300 is 482 of them)
@pytest.mark.parametrize("P", [0, 1, 2, 3, 77, 300])
@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 640), (2, 1280), (7, 100), (30, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_against_fp64(P, rows, cols, dtype):
    check_against_fp64(P, rows, cols, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("P", [1, 77, 600])
@pytest.mark.parametrize("rows,cols", [(7, 100), (130, 257), (528, 640)])  # the last: LayerNorm's on the H200
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_against_fp64_on_gpu(P, rows, cols, dtype):
    # sizes and strides divisible by 16 (640) or not: Triton specializes them on a GPU only
    check_against_fp64(P, rows, cols, dtype)


def test_strided_rows_leave_the_gaps_alone():
    """attention's packed (B, Lk, 3, H, D) gradient: dk and dv rows 3 * H * D apart, q's between."""
    rows, cols, stride = 77, 128, 192
    packed = torch.full((rows, stride), -7.0, device=DEVICE, dtype=torch.bfloat16)
    out = packed[:, 64:]
    partial = torch.randn(3, rows, cols, device=DEVICE)
    column_sum(partial, out)
    assert torch.allclose(out.float(), partial.sum(0), rtol=8e-3, atol=1e-2)
    assert (packed[:, :64] == -7.0).all()


def test_slices_any_stride_apart_and_one_dim_out():
    partial = torch.randn(2, 5, 300, device=DEVICE)[:, 3]  # (2, 300), rows 1500 apart
    out = torch.empty(300, device=DEVICE)
    torch.testing.assert_close(column_sum(partial, out), partial.sum(0), rtol=1e-6, atol=1e-6)


def test_same_bits_whatever_the_width():
    """attention sums a packed (dk, dv) gradient in one call, separate ones in two: equal bits."""
    partial = torch.randn(9, 2, 3000, device=DEVICE)
    both = column_sum(partial, torch.empty(2, 3000, device=DEVICE))
    first = column_sum(partial[:, 0], torch.empty(3000, device=DEVICE))
    assert torch.equal(both[0], first)


def test_reproducible():
    partial = torch.randn(600, 640, device=DEVICE)
    a, b = (column_sum(partial, torch.empty(640, device=DEVICE)) for _ in range(2))
    assert torch.equal(a, b)


def test_bad_input_is_named():
    out = torch.empty(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="fp32 of shape"):
        column_sum(torch.randn(2, 4, 8, device=DEVICE).half(), out)
    with pytest.raises(ValueError, match="fp32 of shape"):
        column_sum(torch.randn(2, 8, 4, device=DEVICE), out)
    with pytest.raises(ValueError, match="contiguous"):
        column_sum(torch.randn(2, 8, 4, device=DEVICE).transpose(1, 2), out)
    with pytest.raises(ValueError, match="unit column stride"):
        column_sum(torch.randn(2, 8, 4, device=DEVICE), torch.empty(4, 8, device=DEVICE).t())
    with pytest.raises(ValueError, match="1-D or 2-D"):
        column_sum(torch.randn(2, 1, 4, 8, device=DEVICE), out[None])
