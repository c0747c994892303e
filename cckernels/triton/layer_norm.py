"""LayerNorm over the last dim, optionally of a sum x + residual (the pre-norm transformer's
residual add fused in), forward and backward in Triton; fp32 statistics whatever the I/O dtype.

A pre-norm block computes s = x + residual, then LayerNorm(s); backward, autograd adds the
LayerNorm's input gradient to the gradient arriving at s. Unfused that moves 13 tensors of
s's size: the add 3, torch's LayerNorm 2 forward and 5 backward (dx from dy and s, then a second
kernel that reads both again for dweight and dbias), autograd's add 3. Here: forward reads x and
residual and writes s and y (4); backward reads dy, s and the gradient of s, and writes dx,
which is also the residual's gradient (4), with dweight and dbias from the same pass: each
program's column sums, added up per column afterwards (deterministic). Without a residual, s is
x itself (returned with prenorm: the block's first LayerNorm, whose input is also the next
add's residual), and its gradient is added to dx in the same pass, not by autograd's add.

Rows (of C values, C <= MAX_C) are cut into tiles of TILE_ROWS x BLOCK_C (BLOCK_C = C rounded up
to a power of two): the forward takes one tile a program, the backward a run of tiles, so its
partial sums stay few (about 4 programs an SM, 32 rows or more each) whatever the number of
rows. s is stored rounded to the I/O dtype, as torch's add would, and normalized as stored:
forward and backward see the same values.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from cckernels.backend import Unsupported, _on_device, first_order_only, triton_usable
from cckernels.tracing import emitting_custom_ops
from cckernels.triton.column_sum import column_sum
from cckernels.triton.launch import cdiv, next_power_of_2, row_view, sm_count

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_C = 8192  # one row's values stay in registers
# Elements of a tile (TILE_ROWS = tile // BLOCK_C rows; SD2's C = 320: 8 rows of 512 forward)
# and per thread: the backward holds twice the values (its two column-sum accumulators as
# well), so half as many a thread: sm90, C = 320, bf16: 72 registers forward, 122 backward.
FWD_TILE, FWD_PER_THREAD = 4096, 32
BWD_TILE, BWD_PER_THREAD = 2048, 16
MIN_ROWS_PER_PROGRAM = 32  # backward: see _programs


@triton.jit
def _tile(first_row, n_rows, C, TILE_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows first_row + [0, TILE_ROWS), columns [0, BLOCK_C), and their validity."""
    row = first_row + tl.arange(0, TILE_ROWS)
    col = tl.arange(0, BLOCK_C)
    row_ok = row < n_rows
    return row, col, row_ok, row_ok[:, None] & (col < C)[None, :]


@triton.jit
def _layer_norm_fwd_kernel(x_ptr, res_ptr, weight_ptr, bias_ptr, y_ptr, s_ptr, mean_ptr, rstd_ptr,
                           n_rows, C, x_row_stride, res_row_stride, eps,
                           HAS_RES: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           TILE_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    first_row = tl.program_id(0) * TILE_ROWS
    if INT64:
        first_row = first_row.to(tl.int64)
    row, col, row_ok, mask = _tile(first_row, n_rows, C, TILE_ROWS, BLOCK_C)
    x = tl.load(x_ptr + row[:, None] * x_row_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row[:, None] * res_row_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row[:, None] * C + col[None, :], s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / C + eps)
    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(weight_ptr + col, mask=col < C, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + col, mask=col < C, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + row[:, None] * C + col[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean, mask=row_ok)
    tl.store(rstd_ptr + row, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(dy_ptr, ds_ptr, x_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, partial_ptr,
                           n_rows, C, x_row_stride, rows_per_program,
                           HAS_DS: tl.constexpr, HAS_WEIGHT: tl.constexpr, AFFINE: tl.constexpr,
                           TILE_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Rows [rows_per_program * pid, ...) of dx (plus ds: the gradient arriving at the sum);
    with AFFINE, their column sums of dy * xhat and of dy go to row pid of partial_ptr (fp32,
    (programs, 2, C): one sum over the programs afterwards gives dweight and dbias)."""
    pid = tl.program_id(0)
    start = pid * rows_per_program
    if INT64:
        start = start.to(tl.int64)
    col = tl.arange(0, BLOCK_C)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + col, mask=col < C, other=0.0).to(tl.float32)[None, :]
    dweight = tl.zeros((TILE_ROWS, BLOCK_C), tl.float32)
    dbias = tl.zeros((TILE_ROWS, BLOCK_C), tl.float32)
    for r in tl.range(0, rows_per_program, TILE_ROWS):
        row, col, row_ok, mask = _tile(start + r, n_rows, C, TILE_ROWS, BLOCK_C)
        dy = tl.load(dy_ptr + row[:, None] * C + col[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row[:, None] * x_row_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy
        if HAS_WEIGHT:
            wdy = dy * w
        # d/ds of LayerNorm: rstd * (w dy - mean(w dy) - xhat * mean(w dy xhat))
        dx = (wdy - tl.sum(wdy, axis=1)[:, None] / C - xhat * (tl.sum(wdy * xhat, axis=1) / C)[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(ds_ptr + row[:, None] * C + col[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row[:, None] * C + col[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if AFFINE:  # 0 in masked lanes, where dy loads as 0
            dweight += dy * xhat
            dbias += dy
    if AFFINE:  # both sums whichever parameters there are: no row of partial_ptr left unwritten
        col_ok = col < C
        tl.store(partial_ptr + pid * 2 * C + col, tl.sum(dweight, axis=0), mask=col_ok)
        tl.store(partial_ptr + pid * 2 * C + C + col, tl.sum(dbias, axis=0), mask=col_ok)


def _tile_shape(C, tile, per_thread):
    """(TILE_ROWS, BLOCK_C, num_warps) for rows of C values: tiles of at least `tile` elements,
    `per_thread` of them a thread."""
    block_c = next_power_of_2(C)
    rows = max(1, tile // block_c)
    return rows, block_c, rows * block_c // (32 * per_thread)


def _int64(*row_views):
    """Whether some offset into the (rows, C) views (with their row strides) or into a
    contiguous tensor of their rows (y, s, dx) reaches 2^31, with a margin of FWD_TILE rows
    (more than a forward tile) past the end."""
    rows, C = row_views[0].shape
    rows += FWD_TILE
    return max(rows * C, *(rows * t.stride(0) for t in row_views)) >= 2**31


def _forward(x, residual, weight, bias, eps):
    """(y, s, mean, rstd): s = x + residual (None without one), y = LayerNorm(s or x), mean and
    rstd fp32 per row."""
    x2 = row_view(x)
    r2 = None if residual is None else row_view(residual)
    n_rows, C = x2.shape
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    s = None if residual is None else torch.empty(x.shape, device=x.device, dtype=x.dtype)
    mean, rstd = (torch.empty(n_rows, device=x.device, dtype=torch.float32) for _ in range(2))
    tile_rows, block_c, num_warps = _tile_shape(C, FWD_TILE, FWD_PER_THREAD)
    if n_rows:
        _layer_norm_fwd_kernel[(cdiv(n_rows, tile_rows),)](
            x2, r2, weight, bias, y, s, mean, rstd, n_rows, C, x2.stride(0), 0 if r2 is None else r2.stride(0), eps,
            HAS_RES=r2 is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            TILE_ROWS=tile_rows, BLOCK_C=block_c, INT64=_int64(x2, *([] if r2 is None else [r2])), num_warps=num_warps)
    return y, s, mean, rstd


def _programs(n_rows, tile_rows, device):
    """Rows per backward program, a multiple of tile_rows: about 4 programs an SM (every SM
    busy), but at least MIN_ROWS_PER_PROGRAM while that still gives every SM one: each program
    writes 2 fp32 partial rows, which the sum reads again, so with r rows a program they move
    8/r of dx's bf16 bytes (a quarter of a pass at 32, half at 16). SD2's 1280-wide blocks at
    batch 32 have 2048 rows: 32 a program left 64 programs for 132 SMs (H200, fifth run:
    forward+backward 0.74x torch's), 16 gives 128."""
    sms = sm_count(device, on_cpu=2)
    rows = max(cdiv(n_rows, 4 * sms), min(MIN_ROWS_PER_PROGRAM, cdiv(n_rows, sms)))
    return cdiv(rows, tile_rows) * tile_rows


def _backward(dy, ds, x, weight, bias, mean, rstd):
    """(dx, affine): dx of x (s with a residual) plus ds where given; affine (2, C) fp32, the
    sums that give dweight and dbias (`_affine_grads`), None without parameters."""
    x2 = row_view(x)
    n_rows, C = x2.shape
    dy = dy.contiguous()
    ds = None if ds is None else ds.contiguous()
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    tile_rows, block_c, num_warps = _tile_shape(C, BWD_TILE, BWD_PER_THREAD)
    rows_per_program = _programs(max(n_rows, 1), tile_rows, x.device)
    programs = cdiv(n_rows, rows_per_program)
    affine = weight is not None or bias is not None
    partial = torch.empty((programs, 2, C), device=x.device, dtype=torch.float32) if affine else None
    if n_rows:
        _layer_norm_bwd_kernel[(programs,)](
            dy, ds, x2, weight, mean, rstd, dx, partial, n_rows, C, x2.stride(0), rows_per_program,
            HAS_DS=ds is not None, HAS_WEIGHT=weight is not None, AFFINE=affine,
            TILE_ROWS=tile_rows, BLOCK_C=block_c, INT64=_int64(x2), num_warps=num_warps)
    if partial is None:
        return dx, None
    return dx, column_sum(partial, torch.empty((2, C), device=x.device, dtype=torch.float32))  # no rows: zeros


def _affine_grads(affine, weight, bias):
    """(dweight, dbias) in the parameters' dtypes from _backward's sums, None where absent."""
    if affine is None:
        return None, None
    return tuple(None if p is None else total.to(p.dtype) for p, total in zip((weight, bias), affine))


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, prenorm):
        y, s, mean, rstd = _forward(x, residual, weight, bias, eps)
        ctx.save_for_backward(x if s is None else s, weight, bias, mean, rstd)
        ctx.has_residual = s is not None
        # x itself without a residual: autograd hands its gradient from the caller's other uses
        # to backward as ds, where autograd would have added it to dx in a pass of its own
        return (y, x if s is None else s) if prenorm else y

    @staticmethod
    @first_order_only("ck.layer_norm")
    def backward(ctx, dy, ds=None):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, affine = _backward(dy, ds, x, weight, bias, mean, rstd)
        return dx, dx if ctx.has_residual else None, *_affine_grads(affine, weight, bias), None, None


# The same forward and backward as torch.library custom ops, which torch.compile keeps in its
# graph; `layer_norm` below emits them while cckernels/tracing.py traces an op. A custom op
# cannot return None nor an alias of an input: without a residual, s is an empty tensor (x is
# saved instead, and returned as s outside the op: autograd adds its gradients), and so are the
# parameters' gradient sums without parameters.
@torch.library.custom_op("cckernels::triton_layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with _on_device(x.device):
        y, s, mean, rstd = _forward(x, residual, weight, bias, eps)
    return y, x.new_empty(0) if s is None else s, mean, rstd


@layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    s = x.new_empty(0) if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    stats = x.new_empty(rows, dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), s, stats, torch.empty_like(stats)


@torch.library.custom_op("cckernels::triton_layer_norm_backward", mutates_args=())
def layer_norm_backward_op(dy: torch.Tensor, ds: Optional[torch.Tensor], x: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], mean: torch.Tensor,
                           rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with _on_device(x.device):
        dx, affine = _backward(dy, ds, x, weight, bias, mean, rstd)
    return dx, x.new_empty(0) if affine is None else affine


@layer_norm_backward_op.register_fake
def _(dy, ds, x, weight, bias, mean, rstd):
    affine = x.new_empty(0) if weight is None and bias is None else x.new_empty((2, x.shape[-1]), dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), affine


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _ = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(x if residual is None else s, weight, bias, mean, rstd)
    ctx.has_residual = residual is not None


def _layer_norm_op_backward(ctx, dy, ds, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, affine = layer_norm_backward_op(dy, ds if ctx.has_residual else None, x, weight, bias, mean, rstd)
    affine = None if weight is None and bias is None else affine
    return dx, dx if ctx.has_residual else None, *_affine_grads(affine, weight, bias), None


layer_norm_op.register_autograd(_layer_norm_op_backward, setup_context=_setup_context)


def layer_norm(x, weight, bias, eps, residual, prenorm):
    """LayerNorm(s) over the last dim, s = x + residual (x without one), and with prenorm s too:
    the "triton" backend of `cckernels.layer_norm`, which validates the arguments first.
    fp16/bf16/fp32 on a GPU (or the CPU under TRITON_INTERPRET=1), last dims contiguous,
    C <= MAX_C, contiguous parameters of any of those dtypes; anything else raises `Unsupported`
    before touching memory."""
    tensors = [t for t in (x, residual, weight, bias) if t is not None]
    if any(t.dtype not in DTYPES for t in tensors):
        raise Unsupported(f"dtypes {[t.dtype for t in tensors]} (triton layer_norm takes float16, bfloat16, float32)")
    if any(t.stride(-1) != 1 for t in tensors):
        raise Unsupported(f"last dim not contiguous (strides {[t.stride() for t in tensors]})")
    if x.shape[-1] > MAX_C:
        raise Unsupported(f"{x.shape[-1]} channels (triton layer_norm takes at most {MAX_C})")
    if not triton_usable(x.device):
        raise Unsupported(f"device {x.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)")
    if emitting_custom_ops():
        y, s, _, _ = layer_norm_op(x, residual, weight, bias, eps)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _LayerNorm.apply(x, residual, weight, bias, eps, prenorm)
    else:
        y, s, _, _ = _forward(x, residual, weight, bias, eps)
    return (y, x if residual is None else s) if prenorm else y


# ----------------------------------------------------------------------------------------
# Ahead-of-time inspection (python -m cckernels.inspect): SD2's C (320, 640, 1280) and row
# strides are multiples of 16, which Triton specializes on, so every load and store of a row
# is 16 bytes. The UNet's call: residual, fp32 weight and bias; C = 320, in the tiles
# _tile_shape gives it.
# ----------------------------------------------------------------------------------------
INSPECT = [{
    "op": "layer_norm", "kernel": kernel, "dtypes": DTYPES,
    "args": {"*_ptr": "*T", "weight_ptr": "*fp32", "bias_ptr": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
             "partial_ptr": "*fp32", "n_rows": "i32", "C": "i32:16",
             "x_row_stride": "i32:16", "res_row_stride": "i32:16", "rows_per_program": "i32:16", "eps": "fp32",
             "HAS_RES": True, "HAS_DS": True, "HAS_WEIGHT": True, "HAS_BIAS": True, "AFFINE": True,
             "TILE_ROWS": tile_rows, "BLOCK_C": block_c, "INT64": False},
    "variants": {"int32": {}, "int64": {"INT64": True}},
    "options": {"num_warps": num_warps},
    "expect": {"ldg128": True, "stg128": True},
} for kernel, (tile_rows, block_c, num_warps) in (
    (_layer_norm_fwd_kernel, _tile_shape(320, FWD_TILE, FWD_PER_THREAD)),
    (_layer_norm_bwd_kernel, _tile_shape(320, BWD_TILE, BWD_PER_THREAD)),
)]  # fmt: skip
