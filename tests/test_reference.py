"""The torch reference ops against fp64 formulas written out independently."""
import pytest
import torch

import cckernels as ck

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Error of an fp32-accumulated result rounded once to the output dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def attention_fp64(q, k, v, scale):
    q, k, v = (t.double().permute(0, 2, 1, 3) for t in (q, k, v))  # BHLD
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    return (p @ v).permute(0, 2, 1, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Lq,Lk,H,D", [(1, 1, 1, 1, 32), (2, 77, 100, 3, 40), (1, 257, 77, 2, 64)])
def test_attention_reference(dtype, B, Lq, Lk, H, D):
    q, k, v = (torch.randn(B, L, H, D, dtype=dtype) for L in (Lq, Lk, Lk))
    out = ck.attention(q, k, v, backend="torch")
    assert out.dtype == dtype and out.shape == (B, Lq, H, D)
    torch.testing.assert_close(out.double(), attention_fp64(q, k, v, D**-0.5), atol=TOL[dtype], rtol=TOL[dtype])


def test_attention_strided_views_and_scale():
    B, L, H, D = 2, 33, 3, 32
    qkv = torch.randn(B, L, 3 * H * D)
    q, k, v = (t.view(B, L, H, D) for t in qkv.chunk(3, dim=-1))
    assert not q.is_contiguous()
    out = ck.attention(q, k, v, scale=0.3, backend="torch")
    torch.testing.assert_close(out.double(), attention_fp64(q, k, v, 0.3), atol=1e-5, rtol=1e-5)
    # last dim not contiguous: copied, same result
    qt = q.transpose(1, 3).contiguous().transpose(1, 3)
    assert qt.stride(-1) != 1
    torch.testing.assert_close(ck.attention(qt, k, v, scale=0.3), out)


def attention_grads_fp64(q, k, v, g):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    attention_fp64(q64, k64, v64, q.shape[-1] ** -0.5).backward(g.double())
    return q64.grad, k64.grad, v64.grad


def test_attention_reference_gradients():
    q, k, v = (torch.randn(1, L, 2, 40, requires_grad=True) for L in (77, 100, 100))
    g = torch.randn(1, 77, 2, 40)
    ck.attention(q, k, v, backend="torch").backward(g)
    for got, want in zip((q.grad, k.grad, v.grad), attention_grads_fp64(q, k, v, g)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def group_norm_fp64(x, G, w, b, eps, silu):
    N, C = x.shape[:2]
    xg = x.double().contiguous().view(N, G, -1)
    mean = xg.mean(-1, keepdim=True)
    var = xg.var(-1, unbiased=False, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).view(x.shape)
    shape = (1, C) + (1,) * (x.dim() - 2)
    if w is not None:
        y = y * w.double().view(shape)
    if b is not None:
        y = y + b.double().view(shape)
    return y * torch.sigmoid(y) if silu else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape,G", [((1, 96, 5, 7), 32), ((2, 320, 3, 3), 32), ((3, 12, 1, 1), 4)])
def test_group_norm_reference(dtype, channels_last, silu, shape, G):
    x = torch.randn(shape, dtype=dtype) * 3 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1], dtype=dtype), torch.randn(shape[1], dtype=dtype)
    y = ck.group_norm(x, G, w, b, activation="silu" if silu else None, backend="torch")
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    want = group_norm_fp64(x, G, w, b, 1e-5, silu)
    torch.testing.assert_close(y.double(), want, atol=4 * TOL[dtype], rtol=4 * TOL[dtype])


@pytest.mark.parametrize("shape", [(2, 6, 11), (1, 8, 3, 4, 5), (4, 6)])
def test_group_norm_reference_any_rank(shape):
    x = torch.randn(shape)
    y = ck.group_norm(x, 2, None, None, 1e-6, backend="torch")
    torch.testing.assert_close(y.double(), group_norm_fp64(x, 2, None, None, 1e-6, False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 6, 11), (1, 8, 3, 4, 5), (2, 4, 2, 3, 2, 2)])
def test_group_norm_reference_keeps_channels_last_in_any_rank(shape):
    # channels contiguous (the kernels' channels_last, in any spatial rank): the output too, as
    # the triton and cuda backends give it
    x = torch.randn(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    y = ck.group_norm(x, 2, backend="torch")
    assert y.stride() == x.stride()
    torch.testing.assert_close(y.double(), group_norm_fp64(x, 2, None, None, 1e-5, False), atol=1e-5, rtol=1e-5)


def test_group_norm_statistics_in_fp32():
    # fp16 data with a large offset: fp16 statistics would lose the variance entirely.
    x = (1000 + torch.randn(2, 32, 8, 8)).half()
    y = ck.group_norm(x, 8, backend="torch")
    torch.testing.assert_close(y.double(), group_norm_fp64(x, 8, None, None, 1e-5, False), atol=5e-3, rtol=5e-3)


def test_group_norm_reference_gradients():
    x = torch.randn(2, 12, 5, 3, requires_grad=True)
    w, b = torch.randn(12, requires_grad=True), torch.randn(12, requires_grad=True)
    g = torch.randn(2, 12, 5, 3)
    ck.group_norm(x, 3, w, b, activation="silu", backend="torch").backward(g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    group_norm_fp64(x64, 3, w64, b64, 1e-5, True).backward(g.double())
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9999, 1.0])
def test_ema_reference(dtype, decay):
    shapes = [(1,), (77,), (3, 5, 7), (1000,)]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    ema = [torch.randn(s) for s in shapes]
    want = [decay * e.double() + (1 - decay) * p.double() for e, p in zip(ema, params)]
    ck.ema_update_(ema, params, decay, backend="torch")
    for e, w in zip(ema, want):
        assert e.dtype == torch.float32
        torch.testing.assert_close(e.double(), w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 3, 1, 5), (2, 1, 4, 5), (2, 3, 1, 1), (2, 3, 4), (2, 3), (3, 5, 1, 7, 2), (0, 3, 4, 5)])
def test_channels_last_is_the_permuted_contiguity(shape):
    # From strides alone, it must agree with x.permute(0, *spatial, 1).is_contiguous() on every
    # layout: contiguous, channels_last, transposed, sliced, expanded (size-1 dims: any stride).
    from cckernels.reference import channels_last

    x = torch.randn(shape)
    last = x.movedim(1, -1).contiguous().movedim(-1, 1)
    big = torch.randn(*[2 * s + 1 for s in shape]).movedim(1, -1).contiguous().movedim(-1, 1)
    views = [x, last, x.transpose(0, 1), last[tuple(slice(0, s) for s in shape)],
             big[tuple(slice(0, s) for s in shape)], torch.randn(1, shape[1], *[1] * (len(shape) - 2)).expand(shape)]
    if len(shape) > 2:
        views += [x.transpose(-1, -2), last.transpose(-1, -2)]
    for v in views:
        assert channels_last(v) == v.permute(0, *range(2, v.dim()), 1).is_contiguous(), v.stride()
