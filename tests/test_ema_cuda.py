"""The compiled CUDA multi-tensor EMA (csrc/ema.cuh) against an fp64 reference."""
import pytest
import torch

import cckernels as ck

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ck.build_info()["_C"], reason="cckernels._C was not built"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 1 and 3: shorter than a pack; 77, 1000003: odd with a tail; 65537: one element past a chunk;
# 384 * 65536 + 1: one chunk past a full launch, so the tensor continues in the next launch.
SIZES = [1, 3, 77, 1000003, 65536, 65537, 384 * 65536 + 1]


def _fp64_expected(ema, params, decay):
    return [decay * e.double() + (1.0 - decay) * p.double() for e, p in zip(ema, params)]


def _max_err(tensors, expected):
    return max(float((t.double() - x).abs().max()) for t, x in zip(tensors, expected) if t.numel())


def _check(ema, params, decay):
    """Runs the CUDA backend and checks it against fp64 with the 2x-of-torch rule."""
    expected = _fp64_expected(ema, params, decay)
    torch_ema = [e.clone() for e in ema]
    ck.ema_update_(torch_ema, params, decay, backend="torch")
    ck.ema_update_(ema, params, decay, backend="cuda")
    assert ck.used_backends()["ema_update_"] == "cuda"
    assert _max_err(ema, expected) <= 2 * _max_err(torch_ema, expected) + 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [0.5, 0.9999])
def test_odd_sizes(dtype, decay):
    ema = [torch.randn(n, device="cuda") for n in SIZES]
    params = [torch.randn(n, device="cuda", dtype=dtype) for n in SIZES]
    _check(ema, params, decay)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decay_zero_copies_params_and_one_keeps_ema(dtype):
    params = [torch.randn(n, device="cuda", dtype=dtype) for n in (1, 77, 1000003)]
    ema = [torch.randn(p.shape, device="cuda") for p in params]
    kept = [e.clone() for e in ema]
    ck.ema_update_(ema, params, 1.0, backend="cuda")
    assert all(torch.equal(e, k) for e, k in zip(ema, kept))
    ck.ema_update_(ema, params, 0.0, backend="cuda")
    assert all(torch.equal(e, p.float()) for e, p in zip(ema, params))


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_tensors(dtype):
    # Far more tensors than one launch's table holds, of mixed shapes, some empty.
    gen = torch.Generator().manual_seed(1)
    sizes = [int(s) for s in torch.randint(0, 5000, (700,), generator=gen)] + [0, 1, 0]
    shapes = [(s,) if i % 3 else (1, s, 1) for i, s in enumerate(sizes)]
    ema = [torch.randn(s, device="cuda") for s in shapes]
    params = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]
    _check(ema, params, 0.99)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["ema", "params", "both"])
def test_misaligned_views_leave_neighbours_untouched(dtype, which):
    # Views starting at element 1 are not 16-byte aligned: the scalar path must run, and
    # nothing outside the views may change.
    ema_base = torch.randn(1000003 + 2, device="cuda")
    param_base = torch.randn(1000003 + 2, device="cuda", dtype=dtype)
    lo = {"ema": (1, 0), "params": (0, 1), "both": (1, 1)}[which]
    ema = ema_base[lo[0] : lo[0] + 1000003]
    params = param_base[lo[1] : lo[1] + 1000003]
    ema_before = ema_base.clone()
    param_before = param_base.clone()
    _check([ema, torch.randn(77, device="cuda")], [params, torch.randn(77, device="cuda", dtype=dtype)], 0.9)
    outside = torch.ones_like(ema_base, dtype=torch.bool)
    outside[lo[0] : lo[0] + 1000003] = False
    assert torch.equal(ema_base[outside], ema_before[outside])
    assert torch.equal(param_base, param_before)


def test_mixed_dtypes_in_one_call():
    # fp32 norms beside bf16/fp16 weights: one multi-tensor pass per dtype, each past one launch.
    sizes = [1, 77, 65537, 1000003] + [int(n) for n in torch.randint(0, 3000, (200,), generator=torch.Generator().manual_seed(3))]
    params = [torch.randn(n, device="cuda", dtype=DTYPES[i % 3]) for i, n in enumerate(sizes)]
    ema = [torch.randn(n, device="cuda") for n in sizes]
    _check(ema, params, 0.999)


def test_channels_last_conv_weights_stay_on_cuda():
    p = torch.randn(64, 3, 3, 3, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    e = torch.randn(p.shape, device="cuda").to(memory_format=torch.channels_last)
    _check([e], [p], 0.999)


def test_non_contiguous_falls_back():
    p = torch.randn(33, 64, device="cuda")[:, ::2]
    e = torch.randn(33, 32, device="cuda")
    expected = _fp64_expected([e], [p], 0.9)
    ck.ema_update_([e], [p], 0.9, backend="cuda")
    assert ck.used_backends()["ema_update_"] == "torch"  # the one after cuda in ema_update_'s order
    assert _max_err([e], expected) < 1e-6


def test_runs_on_current_stream():
    e, p = torch.randn(1000003, device="cuda"), torch.randn(1000003, device="cuda")
    expected = _fp64_expected([e], [p], 0.9)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ck.ema_update_([e], [p], 0.9, backend="cuda")
    stream.synchronize()
    assert _max_err([e], expected) < 1e-6


@pytest.mark.parametrize(
    "ema, params, match",
    [
        (lambda: [torch.randn(4)], lambda: [torch.randn(4)], r"ema\[0\] is on cpu"),
        (lambda: [torch.randn(4, device="cuda")], lambda: [torch.randn(4)], r"params\[0\] is on cpu"),
        (lambda: [torch.randn(4, device="cuda").half()], lambda: [torch.randn(4, device="cuda")], r"ema\[0\] has dtype"),
        (lambda: [torch.randn(4, device="cuda")], lambda: [torch.randn(5, device="cuda")], r"ema\[0\] shape \[4\] != params\[0\] shape \[5\]"),
        (lambda: [torch.randn(4, device="cuda")], lambda: [torch.randn(4, device="cuda").double()], r"params\[0\] has dtype"),
        (
            lambda: [torch.randn(4, 2, device="cuda")],
            lambda: [torch.randn(2, 4, device="cuda").t()],
            r"ema\[0\] \(strides \[2, 1\]\) and params\[0\] \(strides \[1, 4\]\)",
        ),
        (
            lambda: [torch.randn(4, device="cuda")] * 2,
            lambda: [torch.randn(4, device="cuda"), torch.randn(4, device="cuda").double()],
            r"params\[1\] has dtype",
        ),
        # A count in the message: streamed into it, a number killed the process on the GPU image
        # (2026-11-26); bindings.cpp formats every number itself since.
        (lambda: [torch.randn(4, device="cuda")], lambda: [], r"ema has 1 tensors but params has 0"),
    ],
)
def test_extension_rejects_bad_tensors_by_name(ema, params, match):
    from cckernels import _C

    with pytest.raises(ValueError, match=match):
        _C.ema_update_(ema(), params(), 0.9)


def test_extension_rejects_bad_decay():
    from cckernels import _C

    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\], got 1.5"):
        _C.ema_update_([torch.randn(4, device="cuda")], [torch.randn(4, device="cuda")], 1.5)
