"""The sum over the first dim of a backward's fp32 partial sums, in one launch, in a fixed order.

LayerNorm's, GEGLU's and GroupNorm's backwards leave one row of column sums per program
(dweight, dbias), and attention's split dK/dV one (B, Lk, 2, H, D) slice per query split. torch's `sum(0)` of
such a (P, N) tensor ran on a handful of blocks on the H200 (ncu, fifth run): 20 us for
LayerNorm's 528 x 640 and GEGLU's bias, 7 us a tensor for attention's 2 x 0.8M, plus a cast
kernel each. Here each program owns a run of columns and walks all P rows with it, adding
tiles of BLOCK_R rows in fp32 and reducing the tile at the end: the same order on every run
(deterministic), the cast and a strided output (a packed gradient) in the same store.

Reference: `out.copy_(partial.sum(0))`.
"""
import torch
import triton
import triton.language as tl

from cckernels.triton.launch import cdiv, next_power_of_2

TILE = 4096  # elements of a program's tile (BLOCK_R x BLOCK_C) at most: 32 fp32 a thread at 4 warps
MAX_BLOCK_R = 256  # and BLOCK_C >= 16
MIN_PROGRAMS = 256  # about two an SM while columns allow: this is a latency-bound walk


@triton.jit
def _column_sum_kernel(
    PARTIAL,  # (P, rows * cols) fp32, each of the P slices contiguous, stride_p apart
    OUT,  # (rows, cols), column stride 1, row stride stride_out
    P, N, cols, stride_p, stride_out,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_range = offs < N
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, P, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ptrs = PARTIAL + r[:, None].to(tl.int64) * stride_p + offs[None, :]
        acc += tl.load(ptrs, mask=(r < P)[:, None] & in_range[None, :], other=0.0)
    out = (offs // cols).to(tl.int64) * stride_out + offs % cols
    tl.store(OUT + out, tl.sum(acc, 0).to(OUT.dtype.element_ty), mask=in_range)


def column_sum(partial, out):
    """out = partial.sum(0) in out's dtype. partial: (P, *out.shape) fp32, each partial[p]
    contiguous, any stride between them (P may be 0: zeros); out: 1-D and contiguous, or 2-D
    (rows, cols) with unit column stride and any row stride. Returns out."""
    if out.dim() not in (1, 2):
        raise ValueError(f"out must be 1-D or 2-D, got shape {tuple(out.shape)}")
    rows, cols = out.shape if out.dim() == 2 else (1, out.numel())
    P, N = partial.shape[0], rows * cols
    if partial.dtype != torch.float32 or partial.shape[1:] != out.shape or (P and not partial[0].is_contiguous()):
        raise ValueError(f"partial must be fp32 of shape (P, {', '.join(map(str, out.shape))}) with contiguous "
                         f"slices, got {partial.dtype} {tuple(partial.shape)} with strides {partial.stride()}")
    if out.stride(-1) != 1 and cols > 1:
        raise ValueError(f"out needs unit column stride, got strides {out.stride()}")
    if N == 0:
        return out
    # The order of a column's additions depends on P alone (BLOCK_R), so a packed gradient and
    # separate ones get the same bits.
    block_r = max(1, min(next_power_of_2(P), MAX_BLOCK_R))
    block_c = min(TILE // block_r, max(16, next_power_of_2(cdiv(N, MIN_PROGRAMS))))
    stride_out = out.stride(0) if out.dim() == 2 else 0
    _column_sum_kernel[(cdiv(N, block_c),)](partial, out, P, N, cols, partial.stride(0), stride_out,
                                            BLOCK_R=block_r, BLOCK_C=block_c)
    return out


# ----------------------------------------------------------------------------------------
# Ahead-of-time inspection (python -m cckernels.inspect): the tiles column_sum gives LayerNorm's
# 528 x 640 partials (the H200's programs) and attention's 2 x 0.8M; P's row stride and N are
# multiples of 16 there, which Triton specializes on, so the partials load 16 bytes at a time.
# ----------------------------------------------------------------------------------------
INSPECT = [{
    "op": "column_sum", "kernel": _column_sum_kernel, "dtypes": (torch.float32, torch.float16, torch.bfloat16),
    "args": {"PARTIAL": "*fp32", "OUT": "*T", "P": "i32", "N": "i32:16", "cols": "i32", "stride_p": "i32:16",
             "stride_out": "i32"},
    "variants": {"rows": {"BLOCK_R": 256, "BLOCK_C": 16}, "columns": {"BLOCK_R": 2, "BLOCK_C": 2048}},
    "options": {"num_warps": 4},
    "expect": {"ldg128": True},
}]  # fmt: skip
