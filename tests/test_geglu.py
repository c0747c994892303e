"""ck.geglu: the Triton kernels (interpreter on CPU, GPU marked) against fp64, views, dispatch."""
import pytest
import torch
from test_group_norm import nan_filled_empty

import cckernels as ck
from cckernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def outputs_and_grads(fn, x, dy, bias=None):
    """(y, dx, dbias) of y = fn(x, bias) backward from dy (dbias None without a bias)."""
    x = x.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    y = fn(x, bias)
    y.backward(dy)
    return y, x.grad, None if bias is None else bias.grad


def check(x, backend="triton", bias=None):
    """Output 2x and gradients 3x the error of PyTorch's own GEGLU in x's dtype (a bias in its
    dtype, added in x's), against fp64; outputs of the kernels start as NaN."""
    F = x.shape[-1] // 2
    dy = torch.randn(*x.shape[:-1], F, device=x.device).to(x.dtype)
    with nan_filled_empty():
        got = outputs_and_grads(lambda t, b: ck.geglu(t, b, backend=backend), x, dy, bias)
    assert ck.used_backends()["geglu"] == backend
    want = outputs_and_grads(reference.geglu, x.double(), dy.double(), None if bias is None else bias.double())
    base = outputs_and_grads(reference.geglu, x, dy, bias)
    y, dx, dbias = got
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], F) and dx.shape == x.shape
    if bias is not None:
        assert dbias.dtype == bias.dtype and dbias.shape == bias.shape
    for name, g, r, p, factor in zip(("y", "dx", "dbias"), got, want, base, (2, 3, 3)):
        if g is None:
            continue
        err = (g.double() - r).abs().max().item()
        base_err = (p.double() - r).abs().max().item()
        bound = factor * base_err + FLOOR[x.dtype] * (1 + r.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (torch {x.dtype}: {base_err:.3g})"


def randn(*shape, dtype=torch.float32):
    return (torch.randn(*shape, device=DEVICE) * 2).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2,), (1, 6), (77, 200), (2, 100, 2 * 33), (1, 257, 2 * 1025)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64(dtype, shape):
    # F = 1025: one column past the forward's block of 1024, a masked second program per row
    check(randn(*shape, dtype=dtype))


@pytest.mark.parametrize("dtype, bias_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                               (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(2,), (1, 6), (77, 200), (2, 100, 2 * 33), (1, 257, 2 * 300)],
                         ids=lambda s: "x".join(map(str, s)))
def test_with_a_bias_matches_fp64(dtype, bias_dtype, shape):
    # rows 1, 77, 200, 257: partial tiles and row blocks (8 and 64 rows); F = 300: a partial
    # column block of 256; bf16 x with an fp32 bias: a bf16-autocast GEMM's output and an fp32 model's bias
    check(randn(*shape, dtype=dtype), bias=randn(shape[-1], dtype=bias_dtype))


def test_bias_gradient_is_deterministic_and_needs_no_grad_of_x():
    x, bias = randn(300, 2 * 40), randn(2 * 40).requires_grad_()
    dy = randn(300, 40)
    grads = [torch.autograd.grad(ck.geglu(x, bias, backend="triton"), bias, dy)[0] for _ in range(2)]
    assert torch.equal(*grads)
    torch.testing.assert_close(grads[0], torch.autograd.grad(reference.geglu(x, bias), bias, dy)[0],
                               rtol=1e-4, atol=1e-4)  # sums of 300 in another order
    no_rows = torch.autograd.grad(ck.geglu(randn(0, 2 * 40), bias, backend="triton"), bias, randn(0, 40))[0]
    assert torch.equal(no_rows, torch.zeros_like(bias))


@pytest.mark.parametrize("tiling", ["WIDE_TILE", "NARROW_TILE"])
def test_both_backward_tilings_give_the_same_gradients(tiling):
    # 77 rows: a partial program of rows; 300 outputs: a partial column block
    from cckernels.triton import geglu

    x, bias, dy = randn(77, 2 * 300), randn(2 * 300), randn(77, 300)
    want = outputs_and_grads(reference.geglu, x.double(), dy.double(), bias.double())[1:]
    with nan_filled_empty():
        got = geglu._backward(dy, x, bias, getattr(geglu, tiling))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_backward_tiling_follows_the_program_count():
    from cckernels.triton.geglu import NARROW_TILE, WIDE_TILE, _backward_tiling

    cpu = torch.device("cpu")  # 2 SMs stand in: narrow from 16 programs
    assert _backward_tiling(64 * 7, 512, cpu) == WIDE_TILE  # 7 x 2 programs
    assert _backward_tiling(64 * 8, 512, cpu) == NARROW_TILE  # 8 x 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_match_the_contiguous_result(dtype):
    wide = randn(3, 5, 2 * 7 + 4, dtype=dtype)
    strided = wide[..., :14]  # rows 18 apart: no copy
    transposed = randn(5, 3, 14, dtype=dtype).transpose(0, 1)  # leading dims that do not flatten: copied
    bias = randn(14, dtype=dtype)
    for x in (strided, transposed):
        check(x, bias=bias)
        torch.testing.assert_close(ck.geglu(x, bias, backend="triton"), ck.geglu(x.contiguous(), bias, backend="triton"),
                                   rtol=0, atol=0)


def test_inference_path_matches_the_training_path():
    # without grad (sampling) the kernels run outside the autograd.Function; outputs poisoned
    x, bias = randn(77, 2 * 100, dtype=torch.bfloat16), randn(2 * 100).requires_grad_()
    train = ck.geglu(x, bias, backend="triton")
    with torch.no_grad(), nan_filled_empty():
        infer = ck.geglu(x, bias, backend="triton")
    assert infer.grad_fn is None and torch.equal(infer, train)


def test_int64_offsets_only_where_int32_would_overflow(monkeypatch):
    from cckernels.triton import geglu as triton_geglu

    def rows(n_rows, two_f, stride=None):
        return torch.empty_strided((n_rows, two_f), (stride or two_f, 1), device="meta")

    assert not triton_geglu._int64(rows(368 * 1024, 2 * 1280))  # SD2's largest at 256 px, batch 368
    assert triton_geglu._int64(rows(2**20, 2 * 1024))  # dx would hold 2^31 elements
    assert triton_geglu._int64(rows(2**16, 2 * 8, stride=2**15 + 16))  # a view whose rows reach far
    monkeypatch.setattr(triton_geglu, "_int64", lambda x2: True)  # the int64 kernels, on small inputs
    check(randn(3, 77, 2 * 33), bias=randn(2 * 33))


def test_what_the_kernel_cannot_take_falls_back_to_torch():
    bias = randn(6)
    for x, b in ((randn(4, 6).double(), None), (randn(6, 4).t(), None),  # fp64; last dim not contiguous
                 (randn(4, 6), bias.double()), (randn(4, 6), randn(12)[::2])):  # a bias of fp64, strided
        torch.testing.assert_close(ck.geglu(x, b), reference.geglu(x, b))
        assert ck.used_backends()["geglu"] == "torch"


@pytest.mark.parametrize("x, bias, message", [
    (torch.randn(3, 5), None, "last dim must be even"),
    (torch.tensor(1.0), None, "last dim must be even"),
    (torch.ones(2, 4, dtype=torch.int32), None, "dtype torch.int32"),
    (torch.randn(2, 4), torch.randn(2), r"bias must have shape \(4,\)"),
    (torch.randn(2, 4), torch.randn(2, 4), r"bias must have shape \(4,\)"),
    (torch.randn(2, 4), torch.ones(4, dtype=torch.int64), "bias has dtype torch.int64"),
    (torch.randn(2, 4), torch.randn(4, device="meta"), "bias is on meta"),
])
def test_bad_input_raises_naming_it(x, bias, message):
    with pytest.raises(ValueError, match=message):
        ck.geglu(x, bias)


def test_compiles_into_the_graph_as_a_custom_op():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    x, bias = randn(2, 9, 12).requires_grad_(), randn(12).requires_grad_()
    recorder = AotEagerAndRecordGraphs()
    compiled = torch.compile(lambda t, b: ck.geglu(t, b, backend="triton") * 2, backend=recorder, fullgraph=True)
    y = compiled(x, bias)
    y.sum().backward()
    targets = {str(n.target) for g in recorder.fw_graphs + recorder.bw_graphs for n in g.graph.nodes}
    assert {"cckernels.triton_geglu.default", "cckernels.triton_geglu_backward.default"} <= targets
    x_eager, bias_eager = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    y_eager = ck.geglu(x_eager, bias_eager, backend="triton") * 2
    y_eager.sum().backward()
    for got, want in ((y, y_eager), (x.grad, x_eager.grad), (bias.grad, bias_eager.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_custom_ops_pass_opcheck():
    from cckernels.triton.geglu import geglu_backward_op, geglu_op

    x, bias = randn(3, 10), randn(10)
    for b in (None, bias):
        torch.library.opcheck(geglu_op, (x.requires_grad_(), b if b is None else b.requires_grad_()))
        torch.library.opcheck(geglu_backward_op, (randn(3, 5), x.detach(), b if b is None else b.detach()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 6), (77, 200), (1, 257, 2 * 1025)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False])
def test_odd_shapes_on_gpu(dtype, shape, bias):
    # On a GPU Triton specializes sizes and strides divisible by 16 (the interpreter does not):
    # the CPU tests above cannot stand in for these
    check(randn(*shape, dtype=dtype), bias=randn(shape[-1], dtype=dtype) if bias else None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, F", [(32 * 1024, 1280), (32 * 64, 5120), (77, 1280)])
def test_sd2_shapes_on_gpu(dtype, rows, F):
    check(randn(rows, 2 * F, dtype=dtype))
    check(randn(rows, 2 * F, dtype=dtype), bias=randn(2 * F, dtype=dtype))
