"""ck.layer_norm: the Triton kernels (interpreter on CPU, GPU marked) against fp64, with and
without the fused residual add, views, dispatch, torch.compile."""
import pytest
import torch
from test_group_norm import nan_filled_empty

import cckernels as ck
from cckernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def randn(*shape, dtype=torch.float32):
    return (torch.randn(*shape, device=DEVICE) * 2 + 0.5).to(dtype)


def outputs_and_grads(fn, x, residual, weight, bias, dy, ds):
    """Outputs of fn(x, residual, weight, bias) (y, or y and the sum where ds is given) and the
    gradients of x, residual, weight, bias (None for a None input) backward from dy (and ds)."""
    inputs = [None if t is None else t.detach().clone().requires_grad_() for t in (x, residual, weight, bias)]
    out = fn(*inputs)
    outs = (out,) if ds is None else out
    torch.autograd.backward(outs, (dy,) if ds is None else (dy, ds))
    return (*outs, *(None if t is None else t.grad for t in inputs))


def check(x, residual=None, weight=None, bias=None, eps=1e-5, prenorm=True, backend="triton"):
    """Outputs 2x and gradients 3x the error of PyTorch's own (x + residual, then F.layer_norm in
    x's dtype with fp32 statistics) against fp64; the kernels' outputs start as NaN. With
    prenorm the sum is an output too, and its gradient joins x's."""
    dy, ds = torch.randn_like(x), torch.randn_like(x) if prenorm else None

    def run(x, r, w, b, op=ck.layer_norm, **kwargs):
        return op(x, w, b, eps, residual=r, prenorm=prenorm, **kwargs)

    with nan_filled_empty():
        got = outputs_and_grads(lambda *a: run(*a, backend=backend), x, residual, weight, bias, dy, ds)
    assert ck.used_backends()["layer_norm"] == backend
    double = [None if t is None else t.double() for t in (x, residual, weight, bias, dy, ds)]
    want = outputs_and_grads(lambda *a: run(*a, op=reference.layer_norm), *double)
    base = outputs_and_grads(lambda *a: run(*a, op=reference.layer_norm), x, residual, weight, bias, dy, ds)
    outputs = [("y", x)] + ([("sum", x)] if prenorm else [])
    grads = list(zip(("dx", "dresidual", "dweight", "dbias"), (x, residual, weight, bias)))
    # dx is rstd * (w dy - mean(w dy) - ...): where those terms cancel (a row of equal values, as
    # C = 1, where rstd = 1/sqrt(eps)) its rounding is on their scale, not on dx's own.
    s = double[0] if residual is None else double[0] + double[1]
    rstd = (s.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    cancelled = (rstd * (double[4] * (1 if weight is None else double[2])).abs()).max().item()
    for (name, t), g, r, p in zip(outputs + grads, got, want, base):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        factor = 2 if name in ("y", "sum") else 3
        err = (g.double() - r).abs().max().item()
        base_err = (p.double() - r).abs().max().item()
        scale = max(r.abs().max().item(), cancelled if name in ("dx", "dresidual") else 0)
        bound = factor * base_err + FLOOR[x.dtype] * (1 + scale)
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (torch {x.dtype}: {base_err:.3g})"
    return got


SHAPES = [(1, 1), (1, 77, 40), (2, 100, 96), (257, 320), (1, 33, 1025)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_with_a_residual_matches_fp64(dtype, shape):
    # C = 96 and 1025: not powers of two (a masked tile); 1025 tiles of 1 row of 2048 lanes;
    # rows 1, 77, 200, 257: partial tiles; fp32 parameters with a low-precision x, as the UNet
    C = shape[-1]
    check(randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), randn(C), randn(C))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("prenorm", [True, False])
def test_without_a_residual_matches_fp64(dtype, affine, prenorm):
    # prenorm: x comes back as the sum, and its gradient is added to dx in the kernel
    C = 77
    weight = randn(C, dtype=dtype) if affine in ("both", "weight") else None
    bias = randn(C, dtype=dtype) if affine in ("both", "bias") else None
    check(randn(3, 50, C, dtype=dtype), None, weight, bias, eps=1e-6, prenorm=prenorm)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_residual_without_prenorm_matches_fp64(dtype):
    check(randn(2, 77, 96, dtype=dtype), randn(2, 77, 96, dtype=dtype), randn(96), randn(96), prenorm=False)


def test_the_residual_gets_the_same_gradient_as_x_and_the_sum_is_torchs_add():
    x, r = randn(40, 24, dtype=torch.bfloat16), randn(40, 24, dtype=torch.bfloat16)
    y, s, dx, dr, _, _ = check(x, r, randn(24), randn(24))
    assert torch.equal(s, x + r)  # rounded once, as torch's add
    assert torch.equal(dx, dr)


def test_x_as_its_own_residual():
    # s = 2x: autograd gives x the kernel's dx twice, once as x's and once as the residual's
    x0, w, b, dy, ds = randn(6, 40), randn(40), randn(40), randn(6, 40), randn(6, 40)
    grads = []
    for dtype, op, kwargs in ((torch.float32, ck.layer_norm, {"backend": "triton"}),
                              (torch.float64, reference.layer_norm, {})):
        x = x0.to(dtype).detach().requires_grad_()
        out = op(x, w.to(dtype), b.to(dtype), 1e-5, residual=x, prenorm=True, **kwargs)
        torch.autograd.backward(out, (dy.to(dtype), ds.to(dtype)))
        grads.append(x.grad.double())
    torch.testing.assert_close(*grads, rtol=1e-4, atol=1e-4)


def test_without_a_residual_the_sum_is_x_through_the_kernels_backward():
    x = randn(5, 24).requires_grad_()
    y, s = ck.layer_norm(x, randn(24), randn(24), prenorm=True, backend="triton")
    assert torch.equal(s, x) and s.grad_fn is y.grad_fn  # s's gradient reaches the kernel, not an add


def test_parameter_gradients_are_deterministic():
    x, r, w, b = randn(300, 40), randn(300, 40), randn(40).requires_grad_(), randn(40).requires_grad_()
    dy = randn(300, 40)
    grads = [torch.autograd.grad(ck.layer_norm(x, w, b, residual=r, backend="triton"), (w, b), dy) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    empty = torch.autograd.grad(ck.layer_norm(randn(0, 40), w, b, backend="triton"), (w, b), randn(0, 40))
    assert all(torch.equal(g, torch.zeros(40, device=DEVICE)) for g in empty)


def test_backward_programs_fill_the_sms_before_taking_32_rows_each(monkeypatch):
    from cckernels.triton import layer_norm

    monkeypatch.setattr(layer_norm, "sm_count", lambda device, on_cpu: 132)
    cpu = torch.device("cpu")
    assert layer_norm._programs(2048, 1, cpu) == 16  # SD2's 1280-wide blocks at batch 32: 128 programs
    assert layer_norm._programs(8192, 1, cpu) == 32  # 256 programs
    assert layer_norm._programs(32768, 8, cpu) == 64  # about 4 an SM
    assert layer_norm._programs(100, 8, cpu) == 8  # one tile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_match_the_contiguous_result(dtype):
    wide = randn(3, 5, 24 + 8, dtype=dtype)
    strided = wide[..., :24]  # rows 32 apart: no copy
    transposed = randn(5, 3, 24, dtype=dtype).transpose(0, 1)  # leading dims that do not flatten: copied
    w, b = randn(24), randn(24)
    for x in (strided, transposed):
        check(x, transposed, w, b)
        for got, want in zip(ck.layer_norm(x, w, b, residual=strided, prenorm=True, backend="triton"),
                             ck.layer_norm(x.contiguous(), w, b, residual=strided.contiguous(), prenorm=True,
                                           backend="triton")):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_inference_path_matches_the_training_path():
    # without grad (sampling) the kernels run outside the autograd.Function; outputs poisoned
    x, r = randn(3, 77, 40, dtype=torch.bfloat16), randn(3, 77, 40, dtype=torch.bfloat16)
    w, b = randn(40).requires_grad_(), randn(40)
    train = ck.layer_norm(x, w, b, residual=r, prenorm=True, backend="triton")
    with torch.no_grad(), nan_filled_empty():
        infer = ck.layer_norm(x, w, b, residual=r, prenorm=True, backend="triton")
    assert infer[0].grad_fn is None
    for got, want in zip(infer, train):
        assert torch.equal(got, want)


def test_int64_offsets_only_where_int32_would_overflow(monkeypatch):
    from cckernels.triton import layer_norm as triton_layer_norm

    def rows(n_rows, C, stride=None):
        return torch.empty_strided((n_rows, C), (stride or C, 1), device="meta")

    assert not triton_layer_norm._int64(rows(368 * 1024, 320))  # SD2's largest at 256 px, batch 368
    assert triton_layer_norm._int64(rows(2**21, 1024))  # y would hold 2^31 elements
    assert triton_layer_norm._int64(rows(64, 320), rows(64, 320, stride=2**25))  # a residual whose rows reach far
    monkeypatch.setattr(triton_layer_norm, "_int64", lambda *views: True)  # the int64 kernels, on small inputs
    check(randn(3, 77, 40), randn(3, 77, 40), randn(40), randn(40))


def test_what_the_kernel_cannot_take_falls_back_to_torch():
    from cckernels.triton.layer_norm import MAX_C

    w = randn(8)
    for x, weight in ((randn(4, 8).double(), None), (randn(8, 4).t(), w),  # fp64; last dim not contiguous
                      (randn(4, 8), randn(16)[::2]), (randn(2, MAX_C + 1), None)):  # a strided weight; too wide
        torch.testing.assert_close(ck.layer_norm(x, weight), reference.layer_norm(x, weight, None, 1e-5))
        assert ck.used_backends()["layer_norm"] == "torch"


@pytest.mark.parametrize("kwargs, message", [
    ({"x": torch.tensor(1.0)}, "non-empty last dim"),
    ({"x": torch.randn(3, 0)}, "non-empty last dim"),
    ({"x": torch.ones(2, 4, dtype=torch.int32)}, "dtype torch.int32"),
    ({"weight": torch.randn(3)}, r"weight must have shape \(4,\)"),
    ({"bias": torch.randn(4, device="meta")}, "bias is on meta"),
    ({"residual": torch.randn(2, 3)}, "residual must match x"),
    ({"residual": torch.randn(2, 4).half()}, "residual must match x"),
    ({"eps": -1e-3}, r"eps must be a number in \[0, inf\), got -0.001"),
])
def test_bad_input_raises_naming_it(kwargs, message):
    args = {"x": torch.randn(2, 4), **kwargs}
    with pytest.raises(ValueError, match=message):
        ck.layer_norm(args.pop("x"), **args)


@pytest.mark.parametrize("with_residual", [True, False])
def test_compiles_into_the_graph_as_a_custom_op(with_residual):
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    inputs = [randn(2, 9, 12).requires_grad_(), randn(2, 9, 12).requires_grad_() if with_residual else None,
              randn(12).requires_grad_(), randn(12).requires_grad_()]

    def fn(x, r, w, b):
        y, s = ck.layer_norm(x, w, b, residual=r, prenorm=True, backend="triton")
        return y * s

    recorder = AotEagerAndRecordGraphs()
    compiled = torch.compile(fn, backend=recorder, fullgraph=True)
    eager_inputs = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    compiled(*inputs).sum().backward()
    targets = {str(n.target) for g in recorder.fw_graphs + recorder.bw_graphs for n in g.graph.nodes}
    assert {"cckernels.triton_layer_norm.default", "cckernels.triton_layer_norm_backward.default"} <= targets
    fn(*eager_inputs).sum().backward()
    for got, want in zip(inputs, eager_inputs):
        if got is not None:
            torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)


def test_custom_ops_pass_opcheck():
    from cckernels.triton.layer_norm import layer_norm_backward_op, layer_norm_op

    x, r, w, b = randn(3, 10), randn(3, 10), randn(10), randn(10)
    for residual, weight, bias in ((r, w, b), (None, w, None), (r, None, b)):
        torch.library.opcheck(layer_norm_op, tuple(None if t is None else t.clone().requires_grad_()
                                                   for t in (x, residual, weight, bias)) + (1e-5,))
        _, s, mean, rstd = layer_norm_op(x, residual, weight, bias, 1e-5)
        saved = x if residual is None else s
        torch.library.opcheck(layer_norm_backward_op, (randn(3, 10), None if residual is None else randn(3, 10), saved,
                                                       weight, bias, mean, rstd))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 77, 40), (257, 1025)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual", [True, False])
def test_odd_shapes_on_gpu(dtype, shape, residual):
    # On a GPU Triton specializes sizes and strides divisible by 16 (the interpreter does not):
    # the CPU tests above cannot stand in for these
    C = shape[-1]
    r = randn(*shape, dtype=dtype) if residual else None
    check(randn(*shape, dtype=dtype), r, randn(C), randn(C), prenorm=residual)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, C", [(32 * 1024, 320), (32 * 256, 640), (8 * 256, 1280), (77, 1024)])
def test_sd2_shapes_on_gpu(dtype, rows, C):
    check(randn(rows, C, dtype=dtype), randn(rows, C, dtype=dtype), randn(C), randn(C))
    check(randn(rows, C, dtype=dtype), None, randn(C, dtype=dtype), randn(C, dtype=dtype))
