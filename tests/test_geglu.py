"""ck.geglu: the Triton kernels (interpreter on CPU, GPU marked) against fp64, views, dispatch."""
import pytest
import torch
from test_group_norm import nan_filled_empty

import cckernels as ck
from cckernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def outputs_and_grad(fn, x, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(dy)
    return y, x.grad


def check(x, backend="triton"):
    """Output 2x and gradient 3x the error of PyTorch's own GEGLU in x's dtype, against fp64;
    outputs of the kernels start as NaN."""
    F = x.shape[-1] // 2
    dy = torch.randn(*x.shape[:-1], F, device=x.device).to(x.dtype)
    with nan_filled_empty():
        got = outputs_and_grad(lambda t: ck.geglu(t, backend=backend), x, dy)
    assert ck.used_backends()["geglu"] == backend
    want = outputs_and_grad(reference.geglu, x.double(), dy.double())
    base = outputs_and_grad(reference.geglu, x, dy)
    y, dx = got
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], F) and dx.shape == x.shape
    for name, g, r, p, factor in zip(("y", "dx"), got, want, base, (2, 3)):
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
    # F = 1025: one column past the kernel's block of 1024, a masked second program per row
    check(randn(*shape, dtype=dtype))


def test_strided_views_match_the_contiguous_result():
    wide = randn(3, 5, 2 * 7 + 4)
    strided = wide[..., :14]  # rows 18 apart: no copy
    transposed = randn(5, 3, 14).transpose(0, 1)  # leading dims that do not flatten: copied
    for x in (strided, transposed):
        check(x)
        torch.testing.assert_close(ck.geglu(x, backend="triton"), ck.geglu(x.contiguous(), backend="triton"),
                                   rtol=0, atol=0)


def test_int64_offsets_only_where_int32_would_overflow(monkeypatch):
    from cckernels.triton import geglu as triton_geglu

    def rows(n_rows, two_f, stride=None):
        return torch.empty_strided((n_rows, two_f), (stride or two_f, 1), device="meta")

    assert not triton_geglu._int64(rows(368 * 1024, 2 * 1280))  # SD2's largest at 256 px, batch 368
    assert triton_geglu._int64(rows(2**20, 2 * 1024))  # dx would hold 2^31 elements
    assert triton_geglu._int64(rows(2**16, 2 * 8, stride=2**15 + 16))  # a view whose rows reach far
    monkeypatch.setattr(triton_geglu, "_int64", lambda x2: True)  # the int64 kernels, on small inputs
    check(randn(3, 77, 2 * 33))


def test_what_the_kernel_cannot_take_falls_back_to_torch():
    for x in (randn(4, 6).double(), randn(6, 4).t()):  # fp64; last dim not contiguous
        torch.testing.assert_close(ck.geglu(x), reference.geglu(x))
        assert ck.used_backends()["geglu"] == "torch"


@pytest.mark.parametrize("x, message", [
    (torch.randn(3, 5), "last dim must be even"),
    (torch.tensor(1.0), "last dim must be even"),
    (torch.ones(2, 4, dtype=torch.int32), "dtype torch.int32"),
])
def test_bad_input_raises_naming_it(x, message):
    with pytest.raises(ValueError, match=message):
        ck.geglu(x)


def test_compiles_into_the_graph_as_a_custom_op():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    x = randn(2, 9, 12).requires_grad_()
    recorder = AotEagerAndRecordGraphs()
    compiled = torch.compile(lambda t: ck.geglu(t, backend="triton") * 2, backend=recorder, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    targets = {str(n.target) for g in recorder.fw_graphs + recorder.bw_graphs for n in g.graph.nodes}
    assert {"cckernels.triton_geglu.default", "cckernels.triton_geglu_backward.default"} <= targets
    x_eager = x.detach().clone().requires_grad_()
    (ck.geglu(x_eager, backend="triton") * 2).sum().backward()
    torch.testing.assert_close(y, ck.geglu(x_eager, backend="triton") * 2, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=0, atol=0)


def test_custom_ops_pass_opcheck():
    from cckernels.triton.geglu import geglu_backward_op, geglu_op

    x = randn(3, 10)
    torch.library.opcheck(geglu_op, (x.requires_grad_(),))
    torch.library.opcheck(geglu_backward_op, (randn(3, 5), x.detach()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, F", [(32 * 1024, 1280), (32 * 64, 5120), (77, 1280)])
def test_sd2_shapes_on_gpu(dtype, rows, F):
    check(randn(rows, 2 * F, dtype=dtype))
