"""GroupNorm (+ SiLU) kernels against an fp64 reference, with flash-attention's tolerance rule:
the kernel's max error must be within 2x (3x for gradients) of plain PyTorch's error in the
same dtype, plus a small floor. CPU tests run the Triton kernels in the interpreter on tiny
spatial sizes; GPU tests (marked) cover both backends at SD2 sizes."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cckernels as ck
from cckernels import reference
from cckernels.backend import Unsupported
from test_reference import group_norm_fp64 as fp64_group_norm  # the definition, in fp64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Floor relative to the reference's magnitude: fp32 results differ from torch's only by
# summation order (~1e-7), so the floor, not the 2x rule, decides there; low-precision errors
# are dominated by the one rounding of the output, which both sides share.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
SD2_CHANNELS = [320, 640, 960, 1280, 1920, 2560]


def torch_group_norm(x, G, w, b, eps, silu):
    """Plain PyTorch in x's dtype: the error baseline."""
    y = reference.torch_group_norm(x, G, w, b, eps)
    return F.silu(y) if silu else y


def misaligned(t):
    """A copy of t with t's strides whose data starts one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    return flat[1:].as_strided(t.shape, t.stride()).copy_(t)


def outputs_and_grads(fn, x, w, b, dy, misalign=False):
    """fn(x, w, b) and d(sum(fn * dy))/d(x, w, b) on fresh leaves (x and dy misaligned)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b)]
    if misalign:
        leaves[0], dy = misaligned(x.detach()).requires_grad_(), misaligned(dy)
        assert leaves[0].data_ptr() % 16 and dy.data_ptr() % 16
    y = fn(*leaves)
    y.backward(dy)
    return [y] + [None if t is None else t.grad for t in leaves]


@contextlib.contextmanager
def nan_filled_empty():
    """Every torch.empty / at::empty inside (Python or the C++ extension, any size: small
    tensors such as mean, rstd and dweight come from a pool that a large poison allocation
    never reaches) returns NaN, so any output or workspace element a kernel forgets to write
    shows up in the checks. PyTorch fills uninitialized memory in deterministic mode."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def check(x, G, w=None, b=None, silu=False, eps=1e-5, backend="triton", dy=None, misalign=False):
    """Runs ck.group_norm on `backend` and checks output and every gradient with the 2x/3x rule;
    misalign: the kernel gets x and dy one element off 16-byte alignment (no vector loads)."""
    dy = torch.randn_like(x) if dy is None else dy
    act = "silu" if silu else None
    with nan_filled_empty():
        got = outputs_and_grads(lambda x, w, b: ck.group_norm(x, G, w, b, eps, activation=act, backend=backend), x, w, b, dy,
                                misalign)
    assert ck.used_backends()["group_norm"] == backend
    want = outputs_and_grads(lambda x, w, b: fp64_group_norm(x, G, w, b, eps, silu), x.double(),
                             None if w is None else w.double(), None if b is None else b.double(), dy.double())
    base = outputs_and_grads(lambda x, w, b: torch_group_norm(x, G, w, b, eps, silu), x,
                             None if w is None else w.to(x.dtype), None if b is None else b.to(x.dtype), dy)
    y = got[0]
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    for name, g, r, p, factor in zip(("y", "dx", "dweight", "dbias"), got, want, base, (2, 3, 3, 3)):
        if r is None:
            continue
        assert g.dtype == (x.dtype if name in ("y", "dx") else (w if name == "dweight" else b).dtype)
        err = (g.double() - r).abs().max().item()
        base_err = (p.double() - r).abs().max().item()
        bound = factor * base_err + FLOOR[x.dtype] * (1 + r.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (torch {x.dtype}: {base_err:.3g})"


def make(shape, dtype, channels_last=False, offset=1.0, affine=True):
    x = (torch.randn(shape) * 2 + offset).to(dtype)
    if channels_last:
        x = x.permute(0, *range(2, x.dim()), 1).contiguous().permute(0, x.dim() - 1, *range(1, x.dim() - 1))
    C = shape[1]
    w, b = (torch.randn(C).to(dtype), torch.randn(C).to(dtype)) if affine else (None, None)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "C,channels_last,silu", list(zip(SD2_CHANNELS, [True, False] * 3, [True, True, False, True, False, True]))
)
def test_sd2_channel_counts(dtype, C, channels_last, silu):
    shape = (2, C, 3, 3) if C <= 960 else (1, C, 2, 3)
    x, w, b = make(shape, dtype, channels_last)
    check(x, 32, w, b, silu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_three_channels_per_group_odd_spatial(dtype, channels_last, silu):
    x, w, b = make((2, 96, 5, 7), dtype, channels_last)
    check(x, 32, w, b, silu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,G", [((3, 96, 1, 1), 32), ((1, 6, 1, 1), 3), ((1, 40, 1, 77), 8), ((2, 64, 17, 1), 32)])
def test_degenerate_spatial_sizes(dtype, shape, G):
    x, w, b = make(shape, dtype, channels_last=shape[2] > 1)
    check(x, G, w, b, silu=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 96, 77), (1, 64, 3, 5, 7)])
def test_1d_and_3d_inputs(dtype, channels_last, shape):
    x, w, b = make(shape, dtype, channels_last)
    assert x.is_contiguous() != channels_last
    check(x, 32, w, b, silu=True)


@pytest.mark.parametrize("has_w,has_b", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_weight_and_bias_optional(has_w, has_b, channels_last, backend):
    x, w, b = make((1, 96, 5, 3), torch.float32, channels_last)
    check(x, 32, w if has_w else None, b if has_b else None, silu=True, backend=backend)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiny tiles and many programs per SM: tests split each group over many programs."""
    from cckernels.triton import group_norm as gn

    for name, value in (("TILE", 32), ("MAX_BLOCK_C", 2), ("MAX_BLOCK_S", 2), ("PROGRAMS_PER_SM", 64),
                        ("SINGLE_PASS_BYTES", 0)):  # fmt: skip
        monkeypatch.setattr(gn, name, value)
    return gn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_split_groups(small_tiles, dtype, channels_last):
    x, w, b = make((1, 24, 7, 5), dtype, channels_last)
    assert small_tiles.group_norm_forward_path(x, 8) == "split"
    S, strides = small_tiles._layout(x)
    block_c, block_s, chunk, K = small_tiles._tiling(x, 24, S, strides)
    assert K >= 3 and block_c < 24  # each group spans several chunks and channel tiles
    check(x, 8, w, b, silu=True)


def test_statistics_survive_a_large_offset(small_tiles):
    # E[x^2] - E[x]^2 in fp32 would lose a unit variance under an offset of 3000 entirely
    # (1e7 vs ulp 1); per-chunk mean/M2 merged with Chan's formula keeps it.
    x, w, b = make((1, 32, 9, 7), torch.float32, offset=3000.0)
    with nan_filled_empty():
        y = ck.group_norm(x, 4, w, b, backend="triton")
    torch.testing.assert_close(y.double(), fp64_group_norm(x, 4, w, b, 1e-5, False), atol=2e-3, rtol=1e-3)


# The single-pass forward (one program holds whole groups): both sides of its size threshold,
# the layouts, odd sizes; check() also runs the backward on the mean and rstd it saved.


@pytest.fixture
def gn(monkeypatch):
    """The Triton module with a 4 KB single-pass tile limit: tiny inputs can exceed it."""
    from cckernels.triton import group_norm

    monkeypatch.setattr(group_norm, "SINGLE_PASS_BYTES", 4096)
    return group_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,G,channels_last,silu,affine",
    [
        ((2, 96, 5, 7), 32, False, True, True),  # 3 channels per group, odd S
        ((2, 96, 3, 3), 32, True, False, True),  # channels_last: 8 (16) groups of 3 a program
        ((2, 40, 3, 3), 10, True, True, True),  # ... 4 (8) groups a program, the last one partial
        ((2, 64, 3, 5), 4, True, True, True),  # channels_last runs of whole 16-byte packs
        ((1, 32, 5, 7), 4, False, True, False),  # batch 1
        ((3, 40, 1, 1), 8, True, True, True),  # 1x1 spatial
        ((2, 48, 77), 16, False, True, True),  # 1-D
        ((2, 24, 3, 2, 5), 8, True, False, False),  # 3-D
    ],
)
def test_single_pass_matches_fp64(gn, dtype, shape, G, channels_last, silu, affine):
    x, w, b = make(shape, dtype, channels_last, affine=affine)
    assert gn.group_norm_forward_path(x, G) == "single-pass"
    check(x, G, w, b, silu)


@pytest.mark.parametrize("channels_last", [False, True])
def test_single_pass_threshold(gn, monkeypatch, channels_last):
    # At a 1 KB limit, 256 fp32 elements. NCHW: 2 channels x 128 positions fit, 2 x 129 (256
    # wide) do not; channels_last: 2 groups of 8 fp32 channels (a 64-byte run) x 16 positions
    # fit, x 17 do not.
    monkeypatch.setattr(gn, "SINGLE_PASS_BYTES", 1024)
    G = 4 if channels_last else 16
    sizes = ((2, 32, 4, 4), (2, 32, 1, 17)) if channels_last else ((2, 32, 8, 16), (2, 32, 3, 43))
    for shape, path in zip(sizes, ("single-pass", "split")):
        x, w, b = make(shape, torch.float32, channels_last)
        assert gn.group_norm_forward_path(x, G) == path, shape
        check(x, G, w, b, silu=True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_single_pass_statistics_survive_a_large_offset(channels_last):
    # mean 1e3, std 1: E[x^2] - E[x]^2 in fp32 (1e6 with ulp 0.06) would be off by percents;
    # the mean first, then squared deviations, keeps rstd exact to fp32 rounding.
    from cckernels.triton import group_norm as gn

    x = (torch.randn(2, 64, 6, 5) + 1e3).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert gn.group_norm_forward_path(x, 4) == "single-pass"
    with nan_filled_empty():
        y, mean, rstd = gn.group_norm_forward(x, 4, None, None, 1e-5, None)
    xg = x.double().reshape(2, 4, -1)
    torch.testing.assert_close(mean.double(), xg.mean(-1), atol=0, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), (xg.var(-1, unbiased=False) + 1e-5).rsqrt(), atol=0, rtol=1e-5)
    torch.testing.assert_close(y.double(), fp64_group_norm(x, 4, None, None, 1e-5, False), atol=1e-3, rtol=0)


# (batch, channels, latent side, channels_last) -> Triton's forward on 132 SMs in bf16
SD2_TRITON_PATHS = {
    **dict.fromkeys([(32, 320, 32, False), (32, 640, 16, False), (32, 1280, 8, False), (32, 1280, 4, False),
                     (32, 2560, 8, False), (8, 1280, 16, False), (8, 1920, 16, False),
                     (32, 640, 16, True), (32, 1280, 8, True), (32, 2560, 8, True), (8, 1280, 16, True),
                     # 32K-element tiles at 32 warps (32x32x960: 30 channels -> 32 x 1024)
                     (32, 640, 32, False), (32, 960, 32, False), (8, 640, 32, False), (8, 2560, 16, False)],
                    "single-pass"),
    # tiles over 64 KB (64x64x320: 10 channels -> 16 x 4096), channels_last runs of 10 channels
    # (4 groups to reach 64 bytes: 64 x 1024), or too few programs (batch 1; 2 x 32 / 2 groups)
    **dict.fromkeys([(8, 320, 64, False), (8, 1920, 32, False), (8, 960, 64, False), (32, 320, 32, True),
                     (1, 320, 64, False), (1, 320, 64, True), (1, 320, 32, False), (2, 640, 16, True)], "split"),
}  # fmt: skip


# Under ck.prefer_gpu_time() (the trainer's CUDA graphs) only the tiles of at most 8 KB keep it
SD2_TRITON_GPU_TIME_SINGLE_PASS = {(32, 1280, 8, False), (32, 1280, 4, False), (32, 1280, 8, True)}


@pytest.mark.parametrize("gpu_time", [False, True])
def test_forward_path_for_sd2_shapes(gpu_time):
    from cckernels.triton.group_norm import _single_pass_plan

    for (N, C, side, channels_last), path in SD2_TRITON_PATHS.items():
        if gpu_time:
            path = "single-pass" if (N, C, side, channels_last) in SD2_TRITON_GPU_TIME_SINGLE_PASS else "split"
        plan = _single_pass_plan(N, C, side * side, 32, channels_last, 2, 132, gpu_time)
        assert ("single-pass" if plan else "split") == path, (N, C, side, channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
def test_prefer_gpu_time_takes_the_split_forward_above_its_limit(gn, monkeypatch, channels_last):
    # 2 KB fp32 tiles: within the (test's) 4 KB limit eagerly, over a 1 KB one under
    # prefer_gpu_time; the split forward must then give the same results as it does elsewhere.
    monkeypatch.setattr(gn, "SINGLE_PASS_GPU_TIME_BYTES", 1024)
    G = 4 if channels_last else 16
    x, w, b = make((2, 32, 4, 8) if channels_last else (2, 32, 8, 32), torch.float32, channels_last)
    assert gn.group_norm_forward_path(x, G) == "single-pass"
    with ck.prefer_gpu_time():
        assert gn.group_norm_forward_path(x, G) == "split"
        check(x, G, w, b, silu=True)
    assert gn.group_norm_forward_path(x, G) == "single-pass"


def test_channels_last_single_pass_loads_whole_vectors_where_it_can():
    from cckernels.triton.group_norm import _single_pass_plan

    # (N, C, side) -> (GROUPS, ALIGN) in bf16: 60-channel groups (1920) pair up into 120-channel
    # runs (15 16-byte vectors) at 8x8; at 16x16 that tile would be too large, so one group
    # takes 8-byte loads; 20-channel groups (640) reach 64 bytes aligned already
    for (N, C, side), want in {(32, 1920, 8): (2, 8), (32, 1920, 16): (1, 4), (32, 960, 16): (2, 4),
                               (32, 640, 16): (2, 8)}.items():
        groups, _, _, align, _ = _single_pass_plan(N, C, side * side, 32, True, 2, 132)
        assert (groups, align) == want, (N, C, side)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_weight_with_low_precision_input(dtype):
    # As the trainer runs it (autocast, or bf16 weights with fp32 norm weights): low-precision
    # activations, fp32 parameters; check() asserts each gradient keeps its leaf's dtype.
    x, _, _ = make((2, 64, 4, 4), dtype, channels_last=True)
    check(x, 32, torch.randn(64), torch.randn(64), silu=True)


def check_some_gradients(needs, backend="triton", shape=(1, 32, 3, 3), G=8, device="cpu"):
    """Only the leaves named in `needs` ("x", "w", "b") require grad: a frozen input (the
    kernels skip dx) or frozen parameters (they skip dweight and dbias). fp32, channels_last."""
    x, w, b = (t.to(device) for t in make(shape, torch.float32, channels_last=True))
    leaves = {"x": x, "w": w, "b": b}
    for name in needs:
        leaves[name].requires_grad_()
    dy = torch.randn_like(x)
    with nan_filled_empty():
        ck.group_norm(x, G, w, b, activation="silu", backend=backend).backward(dy)
    assert ck.used_backends()["group_norm"] == backend
    want = {name: t.detach().double().requires_grad_() for name, t in leaves.items()}
    fp64_group_norm(want["x"], G, want["w"], want["b"], 1e-5, True).backward(dy.double())
    for name, t in leaves.items():
        if name in needs:
            torch.testing.assert_close(t.grad.double(), want[name].grad, atol=1e-4, rtol=1e-4)
        else:
            assert t.grad is None, name


@pytest.mark.parametrize("needs", ["w", "x", "xb"])
def test_only_some_gradients(needs):
    check_some_gradients(needs)


def test_gradient_in_another_memory_format():
    x, w, b = make((2, 96, 4, 5), torch.float32, channels_last=True)
    check(x, 32, w, b, silu=True, dy=torch.randn(x.shape))  # contiguous dy for a channels_last x


@pytest.mark.parametrize("channels_last", [False, True])
def test_misaligned_input(channels_last):
    x, w, b = make((2, 64, 3, 5), torch.float16, channels_last)
    check(x, 8, w, b, silu=True, misalign=True)


@pytest.mark.parametrize("case", ["fp64", "strided", "empty", "fp64-weight"])
def test_unsupported_inputs_fall_back(case):
    from cckernels.triton.group_norm import group_norm as triton_group_norm

    x = torch.randn(0 if case == "empty" else 2, 8, 6, 6, dtype=torch.float64 if case == "fp64" else torch.float32)
    w = torch.randn(8, dtype=torch.float64) if case == "fp64-weight" else None
    if case == "strided":
        x = x[..., ::2]
    with pytest.raises(Unsupported):
        triton_group_norm(x, 4, w, None, 1e-5, None, False)
    y = ck.group_norm(x, 4, w, backend="triton")
    assert ck.used_backends()["group_norm"] == "torch"
    if case == "empty":
        assert y.shape == x.shape
    else:
        torch.testing.assert_close(y.double(), fp64_group_norm(x, 4, w, None, 1e-5, False), atol=1e-5, rtol=1e-5)


def check_prenorm(backend, dtype, channels_last, skip_format=None, device="cpu", shape=(2, 96, 5, 3)):
    """ck.group_norm(prenorm=True) returns x as the skip, and x's gradient is the GroupNorm's dx
    plus the skip's (added in the backward kernel: one rounding, so within 4 roundings of the sum
    of the separate call's dx and the skip's gradient, in fp64)."""
    x, w, b = make(shape, dtype, channels_last)
    x, w, b = x.to(device), w.to(device), b.to(device)
    dy, dskip = torch.randn_like(x), torch.randn_like(x)
    if skip_format is not None:
        dskip = dskip.contiguous(memory_format=skip_format)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    with nan_filled_empty():
        y, skip = ck.group_norm(*leaves[:1], 32, *leaves[1:], activation="silu", prenorm=True, backend=backend)
    assert ck.used_backends()["group_norm"] == backend
    assert torch.equal(skip, x) and (backend == "torch" or skip.grad_fn is y.grad_fn)  # through the kernel's backward
    torch.autograd.backward((y, skip), (dy, dskip))
    plain = outputs_and_grads(lambda x, w, b: ck.group_norm(x, 32, w, b, activation="silu", backend=backend), x, w, b, dy)
    assert torch.equal(y, plain[0])
    want = plain[1].double() + dskip.double()
    eps = torch.finfo(dtype).eps
    assert (leaves[0].grad.double() - want).abs().max() <= 4 * eps * (1 + want.abs().max())
    assert leaves[0].grad.stride() == x.stride()
    for got, ref in zip((leaves[1].grad, leaves[2].grad), plain[2:]):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_prenorm_adds_the_skip_gradient(backend, dtype, channels_last):
    check_prenorm(backend, dtype, channels_last)


@pytest.mark.parametrize("shape", [(1, 96, 1, 77), (1, 64, 1, 1), (2, 96, 3, 5, 7), (1, 96, 100)],
                         ids=lambda s: "x".join(map(str, s)))
def test_prenorm_odd_shapes(shape):
    check_prenorm("triton", torch.float16, channels_last=len(shape) > 3 and shape[-1] > 1, shape=shape)


def test_gradients_are_copied_only_where_the_kernels_cannot_walk_them():
    from cckernels.triton.group_norm import _walk_strides

    cl = torch.channels_last
    nhwc = (9 * 8, 1, 8)  # _layout's strides of a channels_last (2, 8, 3, 3)
    assert _walk_strides(torch.randn(2, 8, 3, 3).to(memory_format=cl), nhwc) == nhwc
    assert _walk_strides(torch.randn(2, 8, 3, 3), nhwc) is None  # contiguous: copied
    assert _walk_strides(torch.randn(2, 8, 1, 1), (8, 1, 8)) == (8, 1, 8)  # a 1x1 map reads as x
    concat = torch.randn(2, 24, 3, 3).to(memory_format=cl)
    assert _walk_strides(concat[:, 8:16], nhwc) == (24 * 9, 1, 24)  # a channel slice: its own strides
    assert _walk_strides(concat[:, :, :, :2], nhwc) is None  # spatial dims that do not merge
    nchw = (8 * 9, 9, 1)
    assert _walk_strides(torch.randn(2, 8, 3, 3), nchw) == nchw
    assert _walk_strides(torch.randn(2, 8, 3, 3).to(memory_format=cl), nchw) is None


def test_prenorm_reads_a_concatenations_gradient_slice_without_a_copy():
    """The UNet's skips: the gradient of h in cat([h, skip]) is a channel slice of the cat's."""
    x, w, b = make((2, 96, 5, 3), torch.float16, channels_last=True)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y, skip = ck.group_norm(*leaves[:1], 32, *leaves[1:], prenorm=True, backend="triton")
    dy = torch.randn_like(y)
    dskip = torch.randn(2, 160, 5, 3).to(torch.float16).to(memory_format=torch.channels_last)[:, 32:128]
    copies = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.copy_.default and args[0].dim() == 4:  # the interpreter's are flat
                copies.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    with Copies():
        torch.autograd.backward((y, skip), (dy, dskip))
    assert copies == []
    plain = outputs_and_grads(lambda x, w, b: ck.group_norm(x, 32, w, b, backend="triton"), x, w, b, dy)
    want = plain[1].double() + dskip.double()
    assert (leaves[0].grad.double() - want).abs().max() <= 4 * torch.finfo(torch.float16).eps * (1 + want.abs().max())


def test_prenorm_skip_gradient_in_another_memory_format():
    check_prenorm("triton", torch.float32, True, skip_format=torch.contiguous_format)


# nn.GroupNorm and patch_module on the default backend (Triton in the interpreter here)


def test_nn_group_norm_silu_loads_torch_state_dict():
    ref = torch.nn.GroupNorm(8, 32)
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    ours = ck.nn.GroupNorm(8, 32, activation="silu")
    ours.load_state_dict(ref.state_dict())
    assert "activation=silu" in repr(ours)
    x = torch.randn(2, 32, 3, 5).to(memory_format=torch.channels_last)
    y = ours(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.silu(ref(x)), atol=1e-5, rtol=1e-5)


def test_nn_group_norm_silu_module():
    m = ck.nn.GroupNormSiLU(4, 12, affine=False)
    assert m.activation == "silu" and not list(m.parameters())
    x = torch.randn(2, 12, 3)
    torch.testing.assert_close(m(x), F.silu(F.group_norm(x, 4)), atol=1e-5, rtol=1e-5)


def test_patched_model_matches_in_output_and_gradients():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.GroupNorm(32, 64), torch.nn.SiLU(),
        torch.nn.Conv2d(64, 32, 1), torch.nn.GroupNorm(8, 32, affine=False),
    )
    x = torch.randn(1, 4, 5, 6)
    want = model(x)
    want.square().sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert ck.nn.patch_module(model) == 2
    got = model(x)
    got.square().sum().backward()
    assert ck.used_backends()["group_norm"] == ck.available_backends("cpu")["group_norm"][0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip((p.grad for p in model.parameters()), want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


# The CUDA backend without a GPU: the extension's boundary checks and an NVRTC compile.


def test_cuda_extension_checks_run_without_a_gpu():
    from cckernels import cuda

    skip_without_cuda_group_norm()
    x = torch.randn(2, 8, 3, 3).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="x is on cpu"):
        cuda.loaded().group_norm_forward(x, 4, None, None, 1e-5, True)
    with pytest.raises(Unsupported, match="not channels_last"):
        cuda.group_norm(x.contiguous(), 4, None, None, 1e-5, None, False)
    with pytest.raises(Unsupported, match="dtype torch.float64"):
        cuda.group_norm(x.double(), 4, None, None, 1e-5, None, False)
    # grid limits (blocks of a sample in y, int32 offsets within a sample); meta tensors: no memory
    for shape in ((0, 8, 3, 3), (65536, 8, 1, 1), (1, 2**16, 2**8, 2**7)):
        big = torch.empty(shape, device="meta").to(memory_format=torch.channels_last)
        with pytest.raises(Unsupported, match="shape"):
            cuda.group_norm(big, 4, None, None, 1e-5, None, False)


@pytest.mark.parametrize("T", ["float", "__half", "__nv_bfloat16"])
def test_cuda_kernels_compile_under_nvrtc(T):
    from test_build import nvrtc_compile

    names = [f"&cck::gn::{k}<{T}, {v}>" for k, v in (("channel_stats_kernel", 1), ("normalize_kernel", "8, true"),
                                                      ("single_pass_kernel", "8, true"),
                                                      ("single_pass_kernel", "1, false"),
                                                      ("backward_single_pass_kernel", "8, true"),
                                                      ("backward_single_pass_kernel", "1, false"),
                                                      ("backward_partials_kernel", "4, true"),
                                                      ("backward_dx_kernel", "8, false"))]
    names += [f"&cck::gn::{k}" for k in ("group_stats_kernel", "backward_group_kernel", "backward_affine_kernel")]
    assert len(nvrtc_compile('#include "group_norm.cuh"\n', names)) == len(names)


# GPU: both backends at SD2 training sizes, including groups split over many programs.

GPU_SHAPES = [(1, 320, 64, 64), (4, 640, 32, 32), (8, 1280, 8, 8), (2, 1920, 16, 16), (3, 96, 7, 9), (2, 2560, 1, 1)]


def gpu_case(shape, dtype, channels_last):
    x, w, b = make(shape, dtype, channels_last)
    return x.cuda(), w.cuda(), b.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_triton(dtype, channels_last, shape):
    x, w, b = gpu_case(shape, dtype, channels_last)
    check(x, 32, w, b, silu=True)
    check(x, 32, w, b, silu=False)


# Triton's single pass on the GPU: odd shapes in batches that give >= 132 SMs a program each
TRITON_SINGLE_PASS_CASES = [
    ((96, 96, 5, 7), 32, False), ((96, 96, 5, 7), 32, True),  # 3 channels per group, odd S
    ((300, 40, 1, 1), 8, True),  # 1x1 spatial
    ((140, 36, 3, 3), 4, False),  # 9 channels per group
    ((140, 96, 77), 32, False),  # 1-D
    ((140, 64, 3, 5, 7), 32, True),  # 3-D
    ((32, 320, 32, 32), 32, False), ((32, 640, 16, 16), 32, True), ((32, 1280, 8, 8), 32, True),  # SD2
    # runs of 60 channels (8-byte loads in 16-bit dtypes) and of two 60-channel groups (16-byte)
    ((32, 1920, 16, 16), 32, True), ((32, 960, 16, 16), 32, True), ((32, 1920, 8, 8), 32, True),
]  # fmt: skip
# 32K-element tiles at 32 warps, contiguous fp16/bf16 only: 30 channels x 1023 positions (masked
# to 32 x 1024), and SD2's 32x32x960
TRITON_32K_CASES = [(dtype, shape) for dtype in (torch.float16, torch.bfloat16)
                    for shape in ((140, 60, 31, 33), (32, 960, 32, 32))]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,shape,G,channels_last",
                         [(dtype, *case) for dtype in DTYPES for case in TRITON_SINGLE_PASS_CASES] +
                         [(dtype, shape, 2 if shape[1] == 60 else 32, False) for dtype, shape in TRITON_32K_CASES])
def test_gpu_triton_single_pass(dtype, shape, G, channels_last):
    from cckernels.triton.group_norm import group_norm_forward_path

    x, w, b = gpu_case(shape, dtype, channels_last)
    assert group_norm_forward_path(x, G) == "single-pass"
    check(x, G, w, b, silu=True)
    check(x, G, None, None, silu=False)


def skip_without_cuda_group_norm(single_pass=False):
    """single_pass: the test runs the CUDA single passes, skipped where they are off
    (CCKERNELS_GROUP_NORM_CUDA_SINGLE_PASS=0: benchmarks/gpu_smoke.py sets it where they fail on
    a GPU, and its log says how). Call it before a test sets cuda.SINGLE_PASS itself."""
    from cckernels import cuda

    if cuda.loaded() is None or not hasattr(cuda.loaded(), "group_norm_forward"):
        pytest.skip("cckernels._C built without the GroupNorm kernels")
    if single_pass and not cuda.SINGLE_PASS:
        pytest.skip("CCKERNELS_GROUP_NORM_CUDA_SINGLE_PASS=0")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,G", [(s, 32) for s in GPU_SHAPES] + [((2, 30, 5, 5), 30), ((2, 36, 3, 3), 4)])
def test_gpu_cuda_channels_last(dtype, shape, G):
    skip_without_cuda_group_norm()
    x, w, b = gpu_case(shape, dtype, channels_last=shape[2] > 1)
    for silu in (True, False):
        check(x, G, w, b, silu, backend="cuda")
    check(x, G, None, None, True, backend="cuda")


# The CUDA single-pass forward takes a shape only when its blocks fill the GPU, so these
# odd shapes come in batches of >= 132 blocks; the kernel itself is the same for any batch.
CUDA_SINGLE_PASS_CASES = [
    ((64, 96, 5, 7), 32),  # 3 channels per group, odd S: blocks of lcm(3, pack) channels
    ((136, 40, 1, 1), 8),  # 1x1 spatial
    ((160, 36, 3, 3), 4),  # 36 channels: no 16-byte packs in fp16/bf16 (scalar loads)
    ((140, 96, 77), 32),  # 1-D
    ((140, 64, 3, 5, 7), 32),  # 3-D
    ((32, 640, 16, 16), 32), ((32, 1280, 8, 8), 32),  # SD2, 256 px (32x32x320: a cluster of 2)
]


# Groups too large for one block's shared memory: on sm90 a cluster of blocks stages each
# (cluster sizes 2 to 11 between the dtypes, 10 and 11 beyond the portable 8; odd positions per
# block; 3 channels per group without 16-byte packs in fp16/bf16; SD2 at 512 px and 256 px).
CUDA_CLUSTER_CASES = [((3, 960, 33, 31), 32), ((2, 1920, 31, 33), 32), ((4, 60, 257, 3), 20),
                      ((8, 320, 64, 64), 32), ((4, 960, 32, 32), 32), ((2, 960, 48, 48), 32),
                      ((32, 320, 32, 32), 32)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,G,path", [(s, G, "single-pass") for s, G in CUDA_SINGLE_PASS_CASES] +
                         [(s, G, "cluster") for s, G in CUDA_CLUSTER_CASES])  # fmt: skip
def test_gpu_cuda_single_pass(dtype, shape, G, path):
    from cckernels import cuda

    skip_without_cuda_group_norm(single_pass=True)
    if path == "cluster" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread block clusters need sm90")
    x, w, b = gpu_case(shape, dtype, channels_last=True)
    assert cuda.group_norm_forward_path(x, G).startswith(path)
    check(x, G, w, b, silu=True, backend="cuda")
    check(x, G, w, b, silu=False, backend="cuda")
    check(x, G, None, None, silu=True, backend="cuda")


# The CUDA split forward, forced (the single-pass plan leaves it few shapes): many chunks per
# sample with 16-byte packs, and with scalar loads (60 channels in fp16/bf16); 3 channels per
# group; batch 1; 1x1 spatial with channels_last strides.
CUDA_SPLIT_CASES = [((1, 96, 33, 31), 32), ((2, 60, 17, 19), 20), ((1, 320, 64, 64), 32), ((3, 40, 1, 1), 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,G", CUDA_SPLIT_CASES)
def test_gpu_cuda_split_forward(monkeypatch, dtype, shape, G):
    from cckernels import cuda

    skip_without_cuda_group_norm()
    monkeypatch.setattr(cuda, "SINGLE_PASS", False)
    x, w, b = gpu_case(shape, dtype, channels_last=True)
    assert cuda.group_norm_forward_path(x, G) == "split"
    check(x, G, w, b, silu=True, backend="cuda")
    check(x, G, None, None, silu=False, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("has_w,has_b", [(True, False), (False, True)])
@pytest.mark.parametrize("single_pass", [True, False])
def test_gpu_cuda_weight_or_bias_alone(monkeypatch, has_w, has_b, single_pass):
    from cckernels import cuda

    skip_without_cuda_group_norm(single_pass)
    monkeypatch.setattr(cuda, "SINGLE_PASS", single_pass)
    x, w, b = gpu_case((140, 96, 5, 7), torch.float32, channels_last=True)
    assert (cuda.group_norm_forward_path(x, 32) == "split") != single_pass
    check(x, 32, w if has_w else None, b if has_b else None, silu=True, backend="cuda")


# Pointers off 16-byte alignment: the CUDA kernels fall back to scalar loads (single pass,
# cluster and split forwards; backward), Triton to narrower ones.
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(140, 64, 3, 5), (3, 960, 33, 31), (1, 320, 64, 64)])
def test_gpu_misaligned_input(backend, dtype, shape):
    if backend == "cuda":
        skip_without_cuda_group_norm()
    x, w, b = gpu_case(shape, dtype, channels_last=True)
    check(x, 32, w, b, silu=True, backend=backend, misalign=True)


# dy in another layout than x: contiguous for channels_last, including batch 1, where both
# layouts' strides describe the same dense order. (At 1x1 spatial the H200 run showed the two
# layouts give x and dy identical strides, so there is nothing to test there.)
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape,G", [((2, 96, 4, 5), 32), ((1, 96, 4, 5), 32)])
def test_gpu_gradient_in_another_memory_format(backend, shape, G):
    if backend == "cuda":
        skip_without_cuda_group_norm()
    x, w, b = gpu_case(shape, torch.bfloat16, channels_last=True)
    dy = torch.randn(shape, device="cuda", dtype=x.dtype)
    assert dy.stride() != x.stride()
    check(x, G, w, b, silu=True, backend=backend, dy=dy)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(4, 640, 32, 32), (64, 96, 5, 7), (8, 1280, 8, 8)])
def test_gpu_fp32_weight_with_bf16_input(backend, shape):
    # the trainer's mix: bf16 activations, fp32 GroupNorm parameters
    if backend == "cuda":
        skip_without_cuda_group_norm()
    x, _, _ = gpu_case(shape, torch.bfloat16, channels_last=True)
    w, b = torch.randn(2, shape[1], device="cuda").unbind()
    check(x, 32, w, b, silu=True, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("needs", ["w", "x"])
@pytest.mark.parametrize("shape", [(64, 96, 5, 7), (1, 96, 33, 31)])  # CUDA: single-pass and split backward
def test_gpu_only_some_gradients(backend, needs, shape):
    if backend == "cuda":
        skip_without_cuda_group_norm()
    check_some_gradients(needs, backend, shape, G=32, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_prenorm_adds_the_skip_gradient(backend, dtype):
    from cckernels import cuda

    if backend == "cuda":
        skip_without_cuda_group_norm()
    check_prenorm(backend, dtype, channels_last=True, device="cuda")
    check_prenorm(backend, dtype, channels_last=True, skip_format=torch.contiguous_format, device="cuda")
    if backend == "cuda" and cuda.SINGLE_PASS:  # the skip's gradient added by the single-pass backward too
        check_prenorm(backend, dtype, channels_last=True, device="cuda", shape=(64, 96, 5, 7))


# The CUDA backward: one read of x and dy where two tiles of each fit (a block, or a cluster on
# sm90), else the split backward; the single pass writes dweight's and dbias's partials per
# block of a cluster (paths from gn::single_pass_plan and single_pass_pays, 132 SMs).
CUDA_BACKWARD_CASES = [((64, 96, 5, 7), 32, "single-pass"), ((140, 96, 77), 32, "single-pass"),
                       ((160, 36, 3, 3), 4, "single-pass"), ((4, 320, 32, 32), 32, "cluster"),
                       ((3, 960, 33, 31), 32, "cluster"), ((4, 60, 257, 3), 20, "cluster"),
                       ((8, 960, 48, 48), 32, "split")]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,G,path", CUDA_BACKWARD_CASES)
def test_gpu_cuda_backward_paths(dtype, shape, G, path):
    from cckernels import cuda

    skip_without_cuda_group_norm(single_pass=True)
    if path == "cluster" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread block clusters need sm90")
    x, w, b = gpu_case(shape, dtype, channels_last=True)
    got = cuda.group_norm_backward_path(x, G)
    if torch.cuda.get_device_properties(0).multi_processor_count == 132:
        assert got.startswith(path), (shape, got)
    check(x, G, w, b, silu=True, backend="cuda")
    check(x, G, None, None, silu=False, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("shape,path", [((64, 96, 6, 5), "single-pass"), ((3, 960, 33, 31), "cluster")])
@pytest.mark.parametrize("first_position", ["typical", "outlier"])
def test_gpu_cuda_single_pass_statistics_survive_a_large_offset(shape, path, first_position):
    # The single pass sums x - shift, shift = a group's value at position 0; 8 std away from
    # the mean there, E[d^2] - E[d]^2 would cancel and the kernel must take its second pass.
    from cckernels import cuda

    skip_without_cuda_group_norm(single_pass=True)
    x = torch.randn(shape, device="cuda") + 1e3
    if first_position == "outlier":
        x[:, :, 0, 0] += 8.0
    x = x.to(memory_format=torch.channels_last)
    if not cuda.group_norm_forward_path(x, 32).startswith(path):
        pytest.skip(f"this GPU runs {cuda.group_norm_forward_path(x, 32)} for {shape}, not {path}")
    y, mean, rstd = cuda.loaded().group_norm_forward(x, 32, None, None, 1e-5, False)
    xg = x.double().reshape(shape[0], 32, -1)
    torch.testing.assert_close(mean.double(), xg.mean(-1), atol=0, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), (xg.var(-1, unbiased=False) + 1e-5).rsqrt(), atol=0, rtol=1e-5)
    torch.testing.assert_close(y.double(), fp64_group_norm(x, 32, None, None, 1e-5, False), atol=1e-3, rtol=0)


# (batch, channels, latent side) -> the CUDA forward on an H100 (132 SMs, 113 KB a block) in bf16
# (tests/cpp/test_group_norm_plan.cpp checks the same plans on the host)
SD2_CUDA_PATHS = {
    **dict.fromkeys([(32, 640, 16), (32, 1280, 8), (32, 1280, 4), (32, 2560, 8), (8, 1280, 16), (8, 2560, 16)],
                    "single-pass"),
    # two tiles over 113 KB (32x32x320: 40 channels x 1024 positions x 2 bytes x 2 tiles = 160 KB,
    # so 2 blocks of 512 positions; 960 channels: lcm(30, 8) = 120 channels), or fewer blocks
    # than SMs (8 x 16 = 128)
    **dict.fromkeys([(32, 320, 32), (32, 1920, 16), (32, 640, 32), (8, 640, 32)], "cluster-2"),
    (8, 1920, 32): "cluster-5", (8, 320, 64): "cluster-7",
    # 64x64x960 (120 channels x 4096 positions) would need 18 blocks, beyond the 16 a cluster;
    # batch 1 has too few clusters to fill the GPU (and fits in L2, where the split forward's
    # second read is cheap); 32x32x32x960 would take 1280 blocks, more than 4 rounds of 264
    # (gn::single_pass_pays)
    **dict.fromkeys([(8, 960, 64), (1, 320, 64), (1, 320, 32), (32, 960, 32)], "split"),
}  # fmt: skip


# The backward's two tensors need twice the forward's tiles: smaller blocks or larger clusters,
# and pays for at most 2 rounds of blocks (gn::single_pass_pays).
SD2_CUDA_BACKWARD_PATHS = {
    **dict.fromkeys([(32, 640, 16), (32, 1280, 8), (32, 1280, 4), (32, 2560, 8), (8, 1280, 16)], "single-pass"),
    (8, 2560, 16): "cluster-2", (8, 640, 32): "cluster-4",
    **dict.fromkeys([(32, 1920, 16), (32, 320, 32), (32, 640, 32), (32, 960, 32), (8, 1920, 32), (8, 320, 64),
                     (8, 960, 64), (1, 320, 64), (1, 320, 32)], "split"),
}  # fmt: skip


@pytest.mark.gpu
def test_gpu_cuda_forward_path_for_sd2_shapes():
    from cckernels import cuda

    skip_without_cuda_group_norm(single_pass=True)
    props = torch.cuda.get_device_properties(0)
    if (props.major, props.minor, props.multi_processor_count) != (9, 0, 132):
        pytest.skip(f"the table is for an H100 SXM (sm90, 132 SMs), not {props.name}")
    for (N, C, side), path in SD2_CUDA_PATHS.items():
        x = torch.empty(N, C, side, side, device="cuda", dtype=torch.bfloat16, memory_format=torch.channels_last)
        assert cuda.group_norm_forward_path(x, 32) == path, (N, C, side)
    for (N, C, side), path in SD2_CUDA_BACKWARD_PATHS.items():
        x = torch.empty(N, C, side, side, device="cuda", dtype=torch.bfloat16, memory_format=torch.channels_last)
        assert cuda.group_norm_backward_path(x, 32) == path, (N, C, side)


# The extension's own messages, each holding a number: streamed into a message, a number
# killed the process on the GPU image (2026-11-26), so bindings.cpp formats every one itself.
@pytest.mark.gpu
def test_gpu_cuda_extension_rejects_bad_arguments_by_value():
    from cckernels import cuda

    skip_without_cuda_group_norm()
    ext = cuda.loaded()
    x = torch.randn(2, 8, 3, 3, device="cuda").to(memory_format=torch.channels_last)
    ones = torch.ones(8, device="cuda")
    with pytest.raises(ValueError, match=r"weight must be a contiguous \(8,\) tensor, got shape \[4\]"):
        ext.group_norm_forward(x, 4, torch.ones(4, device="cuda"), None, 1e-5, False)
    with pytest.raises(ValueError, match=r"bias must be a contiguous \(8,\) tensor, got shape \[8, 1\]"):
        ext.group_norm_forward(x, 4, None, torch.ones(8, 1, device="cuda"), 1e-5, False)
    with pytest.raises(ValueError, match="num_channels 8 is not divisible by num_groups 3"):
        ext.group_norm_forward(x, 3, ones, ones, 1e-5, False)
    with pytest.raises(ValueError, match=r"eps must be >= 0 \(as torch allows 0\), got -1"):
        ext.group_norm_forward(x, 4, ones, ones, -1.0, False)
    _, mean, rstd = ext.group_norm_forward(x, 4, ones, ones, 1e-5, False)
    with pytest.raises(ValueError, match=r"mean and rstd must be contiguous float32 \(2, 4\)"):
        ext.group_norm_backward(torch.randn_like(x), x, ones, ones, mean, rstd[:1], False, True, True, True)


@pytest.mark.gpu
def test_gpu_cuda_nchw_falls_back_to_triton():
    skip_without_cuda_group_norm()
    x = torch.randn(2, 64, 8, 8, device="cuda", dtype=torch.bfloat16)
    ck.group_norm(x, 32, backend="cuda")
    assert ck.used_backends()["group_norm"] == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backward_is_deterministic(backend):
    if backend == "cuda":
        skip_without_cuda_group_norm()
    x, w, b = gpu_case((2, 320, 32, 32), torch.bfloat16, channels_last=True)
    dy = torch.randn_like(x)
    runs = [outputs_and_grads(lambda x, w, b: ck.group_norm(x, 32, w, b, activation="silu", backend=backend), x, w, b, dy)
            for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)
