"""GEGLU, h * gelu(gate) with (h, gate) = (x + bias).chunk(2, dim=-1) (exact erf GELU, as the
feed-forward of SD2's transformer blocks), forward and backward in Triton.

Unfused, PyTorch runs gelu and a multiply forward (5 tensors of the output's size moved, and
gelu(gate) saved for the backward), then a multiply per factor, gelu's backward and the
concatenation of the two halves' gradients backward; the projection's Linear then sums that
whole gradient again for its bias (2 more sizes). Here the forward reads x once and writes the
output (3 sizes), adding the optional bias (the projection's, left out of its GEMM); the
backward reads dy and x once and writes dx (5), recomputing gelu, and the bias gradient comes
from the same pass: each program's column sums, added up per column afterwards (deterministic,
1/ROWS of a row's bytes more). Math in fp32 whatever the I/O dtype; one rounding per output.

x is seen as rows of 2F values (F = x.shape[-1] // 2) with a row stride (a strided view needs
no copy). The forward cuts the output's rows * F elements into programs of BLOCK consecutive
ones, whatever F is, so no lane idles at the end of a row (F = 1280 in blocks per row would
leave a third of them idle). The backward takes tiles of rows x BLOCK_F columns, which its
column sums need (SD2's F, 1280 ... 5120, are multiples of BLOCK_F).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from cckernels.backend import Unsupported, _on_device, first_order_only, triton_usable
from cckernels.tracing import emitting_custom_ops
from cckernels.triton.column_sum import column_sum
from cckernels.triton.launch import cdiv, row_view, sm_count

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024  # forward: output elements per program (8 per thread of 4 warps: one 16-byte bf16 access each)
BLOCK_F = 256  # backward: columns of a tile (32 threads x 8: 16-byte bf16 accesses along a row)
ROWS = 64  # backward: rows per program, in tiles: one partial bias-grad row per 64 rows of dx
# Backward tiles of (TILE_ROWS, warps), 8 values a thread each: 4 rows on 4 warps (72 registers
# on sm90) while programs are few, 2 rows on 2 warps from MANY_PROGRAMS an SM. H200, fifth run,
# forward+backward: 126 against 139 us at 8192x2560 (9.7 programs an SM), 248 against 251 at
# 32768x1280 (19), but 89 against 77 at 2048x5120 (4.8). Tried and slower at all three: 8 rows
# on 8 warps, and 32-row programs.
WIDE_TILE, NARROW_TILE, MANY_PROGRAMS = (4, 4), (2, 2), 8


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
def _halves(ptr, col, F, mask):
    """ptr[col] and ptr[col + F] in fp32 (0 where masked): h and gate of x's rows, or the bias's."""
    return tl.load(ptr + col, mask=mask, other=0.0).to(tl.float32), tl.load(ptr + F + col, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _geglu_fwd_kernel(x_ptr, bias_ptr, y_ptr, n, F, x_row_stride,
                      HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr):
    i, row, col, mask = _element(n, F, BLOCK, INT64)
    h, g = _halves(x_ptr + row * x_row_stride, col, F, mask)
    if HAS_BIAS:
        bias_h, bias_g = _halves(bias_ptr, col, F, mask)
        h += bias_h
        g += bias_g
    cdf, _ = _gelu_parts(g)
    tl.store(y_ptr + i, (h * g * cdf).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(dy_ptr, x_ptr, bias_ptr, dx_ptr, dbias_ptr, n_rows, F, x_row_stride,
                      HAS_BIAS: tl.constexpr, BLOCK_F: tl.constexpr, TILE_ROWS: tl.constexpr,
                      ROWS: tl.constexpr, INT64: tl.constexpr):
    """Rows [ROWS * pid0, ROWS * (pid0 + 1)) x columns [BLOCK_F * pid1, ...) of dx's halves; with
    a bias, their column sums go to row pid0 of dbias_ptr (fp32, (programs along rows, 2F))."""
    first_row = tl.program_id(0) * ROWS
    if INT64:
        first_row = first_row.to(tl.int64)
    col = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = col < F
    dh_sum = tl.zeros((TILE_ROWS, BLOCK_F), tl.float32)
    dg_sum = tl.zeros((TILE_ROWS, BLOCK_F), tl.float32)
    for r in tl.range(0, ROWS, TILE_ROWS):
        row = first_row + r + tl.arange(0, TILE_ROWS)
        mask = (row < n_rows)[:, None] & col_ok[None, :]
        dy = tl.load(dy_ptr + row[:, None] * F + col[None, :], mask=mask, other=0.0).to(tl.float32)
        h, g = _halves(x_ptr + row[:, None] * x_row_stride, col[None, :], F, mask)
        if HAS_BIAS:
            # loaded per tile in the tile's shape (L1 hits): held across tiles, the bias took 16
            # more registers a thread (96, not 72 on sm90: fewer programs an SM)
            bias_h, bias_g = _halves(bias_ptr, col[None, :] + 0 * row[:, None], F, mask)
            h += bias_h
            g += bias_g
        cdf, pdf = _gelu_parts(g)
        dh = dy * g * cdf
        dg = dy * h * (cdf + g * pdf)
        dx = dx_ptr + row[:, None] * 2 * F + col[None, :]
        tl.store(dx, dh.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dx + F, dg.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:  # 0 in masked lanes, where dy loads as 0
            dh_sum += dh
            dg_sum += dg
    if HAS_BIAS:
        dbias = dbias_ptr + tl.program_id(0) * 2 * F + col
        tl.store(dbias, tl.sum(dh_sum, axis=0), mask=col_ok)
        tl.store(dbias + F, tl.sum(dg_sum, axis=0), mask=col_ok)


def _int64(x2):
    """Whether some offset into x2 (rows, 2F; row stride) or dx (rows, 2F) reaches 2^31."""
    rows, two_f = x2.shape
    return max((rows - 1) * x2.stride(0) + two_f, rows * two_f) + BLOCK >= 2**31


def _forward(x, bias):
    x2 = row_view(x)
    F = x2.shape[1] // 2
    y = torch.empty((*x.shape[:-1], F), device=x.device, dtype=x.dtype)
    if y.numel():
        _geglu_fwd_kernel[(cdiv(y.numel(), BLOCK),)](x2, bias, y, y.numel(), F, x2.stride(0), HAS_BIAS=bias is not None,
                                                     BLOCK=BLOCK, INT64=_int64(x2))
    return y


def _backward_tiling(n_rows, F, device):
    """(TILE_ROWS, warps) of the backward for n_rows rows of F outputs: see WIDE_TILE."""
    programs = cdiv(n_rows, ROWS) * cdiv(F, BLOCK_F)
    return NARROW_TILE if programs >= MANY_PROGRAMS * sm_count(device, on_cpu=2) else WIDE_TILE


def _backward(dy, x, bias, tiling=None):
    """(dx, dbias): dbias in bias's dtype, None without a bias. tiling: (TILE_ROWS, warps) of the
    backward, by default as the number of programs says (see WIDE_TILE); bench_geglu times each."""
    x2 = row_view(x)
    n_rows, F = x2.shape[0], x2.shape[1] // 2
    tile_rows, num_warps = tiling or _backward_tiling(n_rows, F, x.device)
    dy = dy.contiguous()
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    grid = (cdiv(n_rows, ROWS), cdiv(F, BLOCK_F))
    partial = None if bias is None else torch.empty((grid[0], 2 * F), device=x.device, dtype=torch.float32)
    if dx.numel():
        _geglu_bwd_kernel[grid](dy, x2, bias, dx, partial, n_rows, F, x2.stride(0), HAS_BIAS=bias is not None,
                                BLOCK_F=BLOCK_F, TILE_ROWS=tile_rows, ROWS=ROWS, INT64=_int64(x2), num_warps=num_warps)
    if bias is None:
        return dx, None
    return dx, column_sum(partial, torch.empty(2 * F, device=x.device, dtype=bias.dtype))  # no rows: zeros


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return _forward(x, bias)

    @staticmethod
    @first_order_only("ck.geglu")
    def backward(ctx, dy):
        return _backward(dy, *ctx.saved_tensors)


# The same forward and backward as torch.library custom ops, which torch.compile keeps in its
# graph; `geglu` below emits them while cckernels/tracing.py traces an op. A custom op cannot
# return None: without a bias the backward op's dbias is an empty tensor, dropped again.
@torch.library.custom_op("cckernels::triton_geglu", mutates_args=())
def geglu_op(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    with _on_device(x.device):
        return _forward(x, bias)


@geglu_op.register_fake
def _(x, bias):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("cckernels::triton_geglu_backward", mutates_args=())
def geglu_backward_op(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with _on_device(x.device):
        dx, dbias = _backward(dy, x, bias)
    return dx, x.new_empty(0) if dbias is None else dbias


@geglu_backward_op.register_fake
def _(dy, x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(0) if bias is None else torch.empty_like(bias)


def _geglu_op_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = geglu_backward_op(dy, x, bias)
    return dx, None if bias is None else dbias


geglu_op.register_autograd(_geglu_op_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


def geglu(x, bias=None):
    """h * gelu(gate), (h, gate) = (x + bias).chunk(2, dim=-1): the "triton" backend of
    `cckernels.geglu`, which validates the arguments first. fp16/bf16/fp32 on a GPU (or the CPU
    under TRITON_INTERPRET=1), last dim contiguous, a contiguous bias; anything else raises
    `Unsupported` before touching memory."""
    if x.dtype not in DTYPES:
        raise Unsupported(f"dtype {x.dtype} (triton geglu takes float16, bfloat16, float32)")
    if x.stride(-1) != 1:
        raise Unsupported(f"last dim not contiguous (strides {x.stride()})")
    if x.shape[-1] == 0:
        raise Unsupported("an empty last dim")
    if bias is not None and (bias.dtype not in DTYPES or bias.stride(-1) != 1):
        raise Unsupported(f"bias of dtype {bias.dtype}, stride {bias.stride()} (takes a contiguous float16, "
                          "bfloat16 or float32 one)")
    if not triton_usable(x.device):
        raise Unsupported(f"device {x.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)")
    if emitting_custom_ops():
        return geglu_op(x, bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _GEGLU.apply(x, bias)
    return _forward(x, bias)


# ----------------------------------------------------------------------------------------
# Ahead-of-time inspection (python -m cckernels.inspect): SD2's F (1280 ... 5120) and row
# strides are multiples of 16, which Triton specializes on, so every load and store of x, y,
# dy and dx is 16 bytes. With the bias, as the UNet calls it.
# ----------------------------------------------------------------------------------------
INSPECT = [{
    "op": "geglu", "kernel": kernel, "dtypes": DTYPES,
    "args": {"*_ptr": "*T", "dbias_ptr": "*fp32", "n": "i32:16", "F": "i32:16", "x_row_stride": "i32:16",
             "HAS_BIAS": True, "BLOCK": BLOCK, "BLOCK_F": BLOCK_F, "TILE_ROWS": WIDE_TILE[0], "ROWS": ROWS, "INT64": False},
    "variants": {"int32": {}, "int64": {"INT64": True}},
    "options": {"num_warps": 4},
    "expect": {"ldg128": True, "stg128": True},
} for kernel in (_geglu_fwd_kernel, _geglu_bwd_kernel)]  # fmt: skip
