"""GEGLU, h * gelu(gate) with (h, gate) = x.chunk(2, dim=-1) (exact erf GELU, as the
feed-forward of SD2's transformer blocks), forward and backward in Triton.

Unfused, PyTorch runs gelu and a multiply forward (5 tensors of the output's size moved, and
gelu(gate) saved for the backward), then a multiply per factor, gelu's backward and the
concatenation of the two halves' gradients backward. Here the forward reads x once and writes
the output (3 sizes); the backward reads dy and x once and writes dx (5), recomputing gelu.
Math in fp32 whatever the I/O dtype; one rounding per output element.

x is seen as rows of 2F values (F = x.shape[-1] // 2) with a row stride (a strided view needs
no copy); the output's rows * F elements are cut into programs of BLOCK consecutive ones,
whatever F is, so no lane idles at the end of a row (F = 1280 in blocks per row would leave a
third of them idle).
"""
import torch
import triton
import triton.language as tl

from cckernels.backend import Unsupported, _on_device, triton_usable
from cckernels.tracing import emitting_custom_ops
from cckernels.triton.launch import cdiv

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024  # output elements per program (8 per thread of 4 warps: one 16-byte bf16 access each)


@triton.jit
def _gelu_parts(g):
    """(Phi(g), phi(g)): the normal CDF and density at g; gelu(g) = g * Phi(g)."""
    cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))  # 1 / sqrt(2)
    pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1 / sqrt(2 pi)
    return cdf, pdf


@triton.jit
def _element(n, F, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """This program's output elements i (of n = rows * F), their row and column, and mask.
    int32 offsets unless a tensor reaches 2^31 elements: a 64-bit division is a subroutine
    call, and this kernel's instruction count is close to its memory time on an H100."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    row = i // F
    return i, row, i - row * F, i < n


@triton.jit
def _geglu_fwd_kernel(x_ptr, y_ptr, n, F, x_row_stride, BLOCK: tl.constexpr, INT64: tl.constexpr):
    i, row, col, mask = _element(n, F, BLOCK, INT64)
    x = x_ptr + row * x_row_stride + col
    h = tl.load(x, mask=mask).to(tl.float32)
    g = tl.load(x + F, mask=mask).to(tl.float32)
    cdf, _ = _gelu_parts(g)
    tl.store(y_ptr + i, (h * g * cdf).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(dy_ptr, x_ptr, dx_ptr, n, F, x_row_stride, BLOCK: tl.constexpr, INT64: tl.constexpr):
    i, row, col, mask = _element(n, F, BLOCK, INT64)
    x = x_ptr + row * x_row_stride + col
    dy = tl.load(dy_ptr + i, mask=mask).to(tl.float32)
    h = tl.load(x, mask=mask).to(tl.float32)
    g = tl.load(x + F, mask=mask).to(tl.float32)
    cdf, pdf = _gelu_parts(g)
    dx = dx_ptr + row * 2 * F + col
    tl.store(dx, (dy * g * cdf).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx + F, (dy * h * (cdf + g * pdf)).to(dx_ptr.dtype.element_ty), mask=mask)


def _rows(x):
    """x as (rows, 2F) with a row stride: a view when x's leading dims flatten, else a copy."""
    two_f = x.shape[-1]
    if x.dim() == 1:
        return x.view(1, two_f)
    try:
        return x.view(-1, two_f)
    except RuntimeError:  # leading dims that do not flatten into one stride
        return x.contiguous().view(-1, two_f)


def _int64(x2):
    """Whether some offset into x2 (rows, 2F; row stride) or dx (rows, 2F) reaches 2^31."""
    rows, two_f = x2.shape
    return max((rows - 1) * x2.stride(0) + two_f, rows * two_f) + BLOCK >= 2**31


def _forward(x):
    x2 = _rows(x)
    F = x2.shape[1] // 2
    y = torch.empty((*x.shape[:-1], F), device=x.device, dtype=x.dtype)
    if y.numel():
        _geglu_fwd_kernel[(cdiv(y.numel(), BLOCK),)](x2, y, y.numel(), F, x2.stride(0), BLOCK=BLOCK, INT64=_int64(x2))
    return y


def _backward(dy, x):
    x2 = _rows(x)
    F = x2.shape[1] // 2
    dy = dy.contiguous()
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if dx.numel():
        _geglu_bwd_kernel[(cdiv(dy.numel(), BLOCK),)](dy, x2, dx, dy.numel(), F, x2.stride(0), BLOCK=BLOCK,
                                                      INT64=_int64(x2))
    return dx


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _forward(x)

    @staticmethod
    def backward(ctx, dy):
        return _backward(dy, *ctx.saved_tensors)


# The same forward and backward as torch.library custom ops, which torch.compile keeps in its
# graph; `geglu` below emits them while cckernels/tracing.py traces an op.
@torch.library.custom_op("cckernels::triton_geglu", mutates_args=())
def geglu_op(x: torch.Tensor) -> torch.Tensor:
    with _on_device(x.device):
        return _forward(x)


@geglu_op.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("cckernels::triton_geglu_backward", mutates_args=())
def geglu_backward_op(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with _on_device(x.device):
        return _backward(dy, x)


@geglu_backward_op.register_fake
def _(dy, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


geglu_op.register_autograd(lambda ctx, dy: geglu_backward_op(dy, ctx.saved_tensors[0]),
                           setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


def geglu(x):
    """h * gelu(gate), (h, gate) = x.chunk(2, dim=-1): the "triton" backend of
    `cckernels.geglu`, which validates the argument first. fp16/bf16/fp32 on a GPU (or the CPU
    under TRITON_INTERPRET=1), last dim contiguous; anything else raises `Unsupported` before
    touching memory."""
    if x.dtype not in DTYPES:
        raise Unsupported(f"dtype {x.dtype} (triton geglu takes float16, bfloat16, float32)")
    if x.stride(-1) != 1:
        raise Unsupported(f"last dim not contiguous (strides {x.stride()})")
    if not triton_usable(x.device):
        raise Unsupported(f"device {x.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)")
    if emitting_custom_ops():
        return geglu_op(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _GEGLU.apply(x)
    return _forward(x)


# ----------------------------------------------------------------------------------------
# Ahead-of-time inspection (python -m cckernels.inspect): SD2's F (1280 ... 5120) and row
# strides are multiples of 16, which Triton specializes on, so every load and store is 16 bytes.
# ----------------------------------------------------------------------------------------
INSPECT = [{
    "op": "geglu", "kernel": kernel, "dtypes": DTYPES,
    "args": {"*_ptr": "*T", "n": "i32:16", "F": "i32:16", "x_row_stride": "i32:16", "BLOCK": BLOCK, "INT64": False},
    "variants": {"int32": {}, "int64": {"INT64": True}},
    "options": {"num_warps": 4},
    "expect": {"ldg128": True, "stg128": True},
} for kernel in (_geglu_fwd_kernel, _geglu_bwd_kernel)]  # fmt: skip
