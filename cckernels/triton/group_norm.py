"""GroupNorm (+ fused SiLU) in Triton: fp32 statistics, NCHW or channels_last, any spatial rank.

x (N, C, *spatial) is seen as (N, C, S) with S = prod(spatial) through three strides:
contiguous (C*S, S, 1) or channels_last (S*C, 1, C); y, dy and dx share x's strides (a dy with
others is copied into them), the skip's gradient that prenorm adds to dx may keep its own.

The forward takes one of two paths (group_norm_forward_path says which):

single pass  _single_pass_kernel: one program holds GROUPS whole groups of one sample in
             registers (GROUPS * C/G channels x S positions, at most SINGLE_PASS_BYTES
             of x), so x is read once: the mean first, then the sum of squared deviations
             from it (exact, fp32), mean and rstd stored for the backward, then y. Taken when
             the tile fits (8 KB under ck.prefer_gpu_time(): CUDA graphs, where the split
             path's extra launches cost no host time) and the N * G / GROUPS programs give
             every SM one; channels_last takes GROUPS groups so that each position's channel
             run is >= 64 bytes (coalesced) and, where the tile allows, a whole number of
             16-byte vectors (else the widest loads the run allows), contiguous takes one
             group (a run of C/G * S elements).
split        three passes, each tiling (BLOCK_C channels) x (a chunk of CHUNK positions), so
             one (sample, group) is spread over many programs and batch 1 at 64x64x320 still
             fills the GPU. Its forward reads x twice; the backward always runs this way:

forward   1. _channel_stats_kernel: per (sample, chunk, channel) mean and M2 (sum of squared
             deviations). Each BLOCK_S tile is reduced exactly (its own mean, then squared
             deviations from it) and merged into the running result with Chan's formula, so no
             E[x^2] - E[x]^2 cancellation however large the offset of x.
          2. _group_stats_kernel: per (sample, group) mean and rstd from those partials, again
             by Chan's rule in its parallel form (pooled mean first, then M2 + n*(mean_i-mean)^2).
          3. _normalize_kernel: y = silu?((x - mean) * a_c + bias_c) with a_c = rstd*w_c.
backward  1. _backward_partials_kernel: per (sample, chunk, channel) sums of dz and dz*xhat, where
             dz = dy * silu'(z) recomputes z from x, mean and rstd (nothing but mean and rstd is
             saved besides the inputs).
          2. _backward_group_kernel: per (sample, group) means of w*dz and w*dz*xhat.
          3. column_sum (cckernels/triton/column_sum.py): dweight, dbias per channel, summed
             over (sample, chunk) in a fixed order (deterministic: no atomics).
          4. _backward_dx_kernel: dx = rstd * (w*dz - mean(w*dz) - xhat * mean(w*dz*xhat)),
             plus x's gradient from its other uses where given (prenorm: the skip connection's).
All sums are fp32 whatever the I/O dtype.
"""
import math

import torch
import triton
import triton.language as tl

from cckernels.backend import Unsupported, gpu_time_preferred
from cckernels.group_norm_autograd import GroupNormFunction, custom_ops
from cckernels.reference import channels_last
from cckernels.tracing import emitting_custom_ops
from cckernels.triton.column_sum import column_sum
from cckernels.triton.launch import cdiv, next_power_of_2, sm_count

# Elements per (BLOCK_C, BLOCK_S) tile, 32 a thread at 4 warps. A tile's loads are in flight
# together: 4 16-byte loads a thread in bf16, about 32 KB an SM at PROGRAMS_PER_SM (2048 gave
# half, the same shortfall the CUDA kernels' SASS showed); 8192 would take the backward
# kernels past 128 registers (fewer programs an SM). No spills: python -m cckernels.inspect.
TILE = 4096
MAX_BLOCK_C = 64  # channels_last: 64 channels = one 128-byte line of bf16 per spatial position
MAX_BLOCK_S = 1024  # contiguous: up to 1024 positions of one channel per tile row
PROGRAMS_PER_SM = 4
# Most bytes of x one program holds in registers, 32 values a thread (SINGLE_PASS_ELEMENTS_PER_THREAD,
# which sets num_warps; more and ptxas spills): 32K bf16/fp16 values at 32 warps (64 registers a
# thread) or 16K fp32 ones at 16 warps (at 32 warps fp32 spills), and channels_last tiles at most
# 16 warps (at 32 their per-channel vectors spill).
SINGLE_PASS_BYTES = 65536
# The limit under ck.prefer_gpu_time() (the trainer's CUDA-graph capture and the warm-up before
# it, which so loads the same kernels: Triton loads a module at a kernel's first launch, which
# the driver refuses while a stream is captured). In graph replays (GPU time only; H200, bf16,
# SD2 shapes, both layouts, two runs: results 2026-11-26-0507 and 2026-11-27-0539/follow-up)
# the split forward beat or tied the single pass at every tile of 16-64 KB (1.0-1.9x: 32x640x
# 16x16 channels_last 23.5 against 35.9 us), and lost at 2 KB (32x1280x4x4: 12.9 against 9.2
# contiguous); at 8 KB it won at batch 256, tied at 32 and lost at 8 (13.6 against 9.4).
# Eager calls at those sizes are host-bound, where the single pass's one launch instead of
# three wins (forward host time 80-170 us against 120-280 us): SINGLE_PASS_BYTES there.
SINGLE_PASS_GPU_TIME_BYTES = 8192
SINGLE_PASS_ELEMENTS_PER_THREAD = 32
SINGLE_PASS_MAX_WARPS = {False: 32, True: 16}  # by channels_last
MIN_RUN_BYTES = 64  # channels_last: a program's channel run per position, for coalesced loads


@triton.jit
def _channel_stats_kernel(
    x_ptr,  # (N, C, S) input, strides (stride_n, stride_c, stride_s)
    mean_ptr,  # (N, K, C) fp32 out: mean of x over the chunk's positions, per channel
    m2_ptr,  # (N, K, C) fp32 out: sum of squared deviations from that mean
    C, S, CHUNK,  # CHUNK: positions per chunk, a multiple of BLOCK_S; K = cdiv(S, CHUNK)
    stride_n, stride_c, stride_s,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n, cb, k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    x_row = x_ptr + n.to(tl.int64) * stride_n + c[:, None] * stride_c
    count = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(k * CHUNK, tl.minimum(k * CHUNK + CHUNK, S), BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (s < S)[None, :]
        # evict_last: the normalize pass reads x again right after; L2 may still hold it
        x = tl.load(x_row + s[None, :] * stride_s, mask=mask, other=0.0, eviction_policy="evict_last")
        x = x.to(tl.float32)
        tile_count = tl.minimum(S - s0, BLOCK_S).to(tl.float32)
        tile_mean = tl.sum(x, axis=1) / tile_count
        dev = tl.where(mask, x - tile_mean[:, None], 0.0)
        tile_m2 = tl.sum(dev * dev, axis=1)
        total = count + tile_count
        delta = tile_mean - mean
        mean += delta * (tile_count / total)
        m2 += tile_m2 + delta * delta * (count * tile_count / total)
        count = total
    out = n * tl.num_programs(2) * C + k * C + c
    tl.store(mean_ptr + out, mean, mask=c_mask)
    tl.store(m2_ptr + out, m2, mask=c_mask)


@triton.jit
def _group_stats_kernel(
    mean_ptr, m2_ptr,  # (N, K, C) fp32 per-chunk channel partials from _channel_stats_kernel
    group_mean_ptr, group_rstd_ptr,  # (N, G) fp32 out
    C, S, K, CHUNK, CPG, eps,  # CPG: channels per group
    BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0)
    G = C // CPG
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    base = n.to(tl.int64) * K * C + g[:, None] * CPG
    parts = K * CPG  # each group's (chunk, channel) partials, flattened
    acc = tl.zeros([BLOCK_G, BLOCK_P], dtype=tl.float32)
    for i0 in range(0, parts, BLOCK_P):
        i = i0 + tl.arange(0, BLOCK_P)[None, :]
        mask = (g < G)[:, None] & (i < parts)
        count = tl.minimum(S - (i // CPG) * CHUNK, CHUNK).to(tl.float32)
        mu = tl.load(mean_ptr + base + (i // CPG) * C + i % CPG, mask=mask, other=0.0)
        acc += count * mu
    mean = tl.sum(acc, axis=1) / (CPG * S)
    acc = tl.zeros([BLOCK_G, BLOCK_P], dtype=tl.float32)
    for i0 in range(0, parts, BLOCK_P):
        i = i0 + tl.arange(0, BLOCK_P)[None, :]
        mask = (g < G)[:, None] & (i < parts)
        count = tl.minimum(S - (i // CPG) * CHUNK, CHUNK).to(tl.float32)
        mu = tl.load(mean_ptr + base + (i // CPG) * C + i % CPG, mask=mask, other=0.0)
        m2 = tl.load(m2_ptr + base + (i // CPG) * C + i % CPG, mask=mask, other=0.0)
        dev = mu - mean[:, None]
        acc += tl.where(mask, m2 + count * dev * dev, 0.0)
    var = tl.sum(acc, axis=1) / (CPG * S)
    tl.store(group_mean_ptr + n * G + g, mean, mask=g < G)
    tl.store(group_rstd_ptr + n * G + g, tl.rsqrt(var + eps), mask=g < G)


@triton.jit
def _load_channel_params(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, c, c_mask, C, CPG,
                         HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-channel (mean, rstd, weight, bias) of sample n as fp32 (BLOCK_C,) vectors."""
    G = C // CPG
    mean = tl.load(mean_ptr + n * G + c // CPG, mask=c_mask, other=0.0)
    rstd = tl.load(rstd_ptr + n * G + c // CPG, mask=c_mask, other=0.0)
    w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32) if HAS_WEIGHT else tl.full(c.shape, 1.0, tl.float32)
    b = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros(c.shape, tl.float32)
    return mean, rstd, w, b


@triton.jit
def _normalize_kernel(
    x_ptr, y_ptr,  # (N, C, S) input and output, same strides (stride_n, stride_c, stride_s)
    w_ptr, b_ptr,  # (C,) weight and bias, any float dtype (unused without HAS_WEIGHT / HAS_BIAS)
    mean_ptr, rstd_ptr,  # (N, G) fp32 group statistics
    C, S, CHUNK, CPG,
    stride_n, stride_c, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n, cb, k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean, rstd, w, b = _load_channel_params(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, c, c_mask, C, CPG, HAS_WEIGHT, HAS_BIAS)
    scale = rstd * w
    offset = n.to(tl.int64) * stride_n + c[:, None] * stride_c
    for s0 in range(k * CHUNK, tl.minimum(k * CHUNK + CHUNK, S), BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (s < S)[None, :]
        x = tl.load(x_ptr + offset + s[None, :] * stride_s, mask=mask, other=0.0, eviction_policy="evict_first")
        # x - mean first: a folded shift (b - mean * scale) would lose |mean| / std bits
        y = (x.to(tl.float32) - mean[:, None]) * scale[:, None] + b[:, None]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + offset + s[None, :] * stride_s, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _single_pass_kernel(
    x_ptr, y_ptr,  # (N, C, S) input and output, same strides (stride_n, stride_c, stride_s)
    w_ptr, b_ptr,  # (C,) weight and bias, any float dtype (unused without HAS_WEIGHT / HAS_BIAS)
    mean_ptr, rstd_ptr,  # (N, G) fp32 out: group statistics for the backward
    C, S, CPG, eps,
    stride_n, stride_c, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    GROUPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ALIGN: tl.constexpr,
):
    # Program (n, gb) holds groups [gb * GROUPS, gb * GROUPS + GROUPS) of sample n whole in
    # registers: GROUPS * CPG <= BLOCK_C channels by S <= BLOCK_S positions. ALIGN divides
    # GROUPS * CPG and C: the channel run starts and ends on ALIGN-channel boundaries, which
    # lets channels_last loads be 16 bytes wide (the compiler cannot see it: CPG is runtime).
    n, gb = tl.program_id(0), tl.program_id(1)
    G = C // CPG
    j = tl.arange(0, BLOCK_C)
    c = tl.multiple_of(gb * GROUPS * CPG + j, ALIGN)
    c_mask = tl.max_constancy((j < GROUPS * CPG) & (c < C), ALIGN)
    s = tl.arange(0, BLOCK_S)
    mask = c_mask[:, None] & (s < S)[None, :]
    offs = n.to(tl.int64) * stride_n + c[:, None] * stride_c + s[None, :] * stride_s
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # one_hot[g, j]: channel j of the tile belongs to local group g; folds channel sums into
    # group sums and spreads group values back over their channels
    g = tl.arange(0, GROUPS)
    one_hot = (j // CPG)[None, :] == g[:, None]
    count = CPG * S * 1.0  # fp32 (a Python float if Triton made both constant 1)
    mean = tl.sum(tl.where(one_hot, tl.sum(x, axis=1)[None, :], 0.0), axis=1) / count
    dev = tl.where(mask, x - tl.sum(tl.where(one_hot, mean[:, None], 0.0), axis=0)[:, None], 0.0)
    var = tl.sum(tl.where(one_hot, tl.sum(dev * dev, axis=1)[None, :], 0.0), axis=1) / count
    rstd = tl.rsqrt(var + eps)
    g_out = gb * GROUPS + g
    g_mask = g_out < G
    tl.store(mean_ptr + n * G + g_out, mean, mask=g_mask)
    tl.store(rstd_ptr + n * G + g_out, rstd, mask=g_mask)
    scale = tl.sum(tl.where(one_hot, rstd[:, None], 0.0), axis=0)
    if HAS_WEIGHT:
        scale *= tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    y = dev * scale[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_xhat_dz(x_ptr, dy_ptr, offs, mask, mean, rstd, w, b, SILU: tl.constexpr, EVICT: tl.constexpr):
    """(xhat, dL/dz) of one tile for z = xhat * w + b; with SILU, z is recomputed, not saved.
    dz is 0 where masked (dy loads as 0). EVICT: the loads' L2 eviction policy."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
    dz = tl.load(dy_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
    xhat = (x - mean[:, None]) * rstd[:, None]
    if SILU:
        z = xhat * w[:, None] + b[:, None]
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    return xhat, dz


@triton.jit
def _backward_partials_kernel(
    x_ptr, dy_ptr,  # (N, C, S), same strides (stride_n, stride_c, stride_s)
    w_ptr, b_ptr,  # (C,) weight and bias (unused without HAS_WEIGHT / HAS_BIAS)
    mean_ptr, rstd_ptr,  # (N, G) fp32 group statistics saved by the forward
    sum_dz_ptr, sum_dz_xhat_ptr,  # (N, K, C) fp32 out: per-chunk sums of dz and dz * xhat
    C, S, CHUNK, CPG,
    stride_n, stride_c, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n, cb, k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean, rstd, w, b = _load_channel_params(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, c, c_mask, C, CPG, HAS_WEIGHT, HAS_BIAS)
    offset = n.to(tl.int64) * stride_n + c[:, None] * stride_c
    sum_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dz_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(k * CHUNK, tl.minimum(k * CHUNK + CHUNK, S), BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (s < S)[None, :]
        # evict_last: the dx pass reads x and dy again right after
        xhat, dz = _load_xhat_dz(x_ptr, dy_ptr, offset + s[None, :] * stride_s, mask, mean, rstd, w, b, SILU,
                                 "evict_last")
        sum_dz += tl.sum(dz, axis=1)
        sum_dz_xhat += tl.sum(dz * xhat, axis=1)
    out = n * tl.num_programs(2) * C + k * C + c
    tl.store(sum_dz_ptr + out, sum_dz, mask=c_mask)
    tl.store(sum_dz_xhat_ptr + out, sum_dz_xhat, mask=c_mask)


@triton.jit
def _backward_group_kernel(
    sum_dz_ptr, sum_dz_xhat_ptr,  # (N, K, C) fp32 partials from _backward_partials_kernel
    w_ptr,  # (C,) weight (unused without HAS_WEIGHT)
    coef_dz_ptr, coef_xhat_ptr,  # (N, G) fp32 out: group means of w*dz and of w*dz*xhat
    C, S, K, CPG,
    HAS_WEIGHT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0)
    G = C // CPG
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    base = n.to(tl.int64) * K * C + g[:, None] * CPG
    parts = K * CPG
    acc_dz = tl.zeros([BLOCK_G, BLOCK_P], dtype=tl.float32)
    acc_xhat = tl.zeros([BLOCK_G, BLOCK_P], dtype=tl.float32)
    for i0 in range(0, parts, BLOCK_P):
        i = i0 + tl.arange(0, BLOCK_P)[None, :]
        mask = (g < G)[:, None] & (i < parts)
        offs = base + (i // CPG) * C + i % CPG
        w = tl.load(w_ptr + g[:, None] * CPG + i % CPG, mask=mask, other=0.0).to(tl.float32) if HAS_WEIGHT else 1.0
        acc_dz += w * tl.load(sum_dz_ptr + offs, mask=mask, other=0.0)
        acc_xhat += w * tl.load(sum_dz_xhat_ptr + offs, mask=mask, other=0.0)
    tl.store(coef_dz_ptr + n * G + g, tl.sum(acc_dz, axis=1) / (CPG * S), mask=g < G)
    tl.store(coef_xhat_ptr + n * G + g, tl.sum(acc_xhat, axis=1) / (CPG * S), mask=g < G)


@triton.jit
def _backward_dx_kernel(
    x_ptr, dy_ptr, dx_ptr,  # (N, C, S), same strides (stride_n, stride_c, stride_s)
    addend_ptr,  # (N, C, S), strides (stride_addend_n, _c, _s): added to dx with ADDEND
    w_ptr, b_ptr,  # (C,) weight and bias (unused without HAS_WEIGHT / HAS_BIAS)
    mean_ptr, rstd_ptr, coef_dz_ptr, coef_xhat_ptr,  # (N, G) fp32
    C, S, CHUNK, CPG,
    stride_n, stride_c, stride_s,
    stride_addend_n, stride_addend_c, stride_addend_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, ADDEND: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dx, plus x's gradient from its other uses (ADDEND: the block's skip connection)."""
    n, cb, k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean, rstd, w, b = _load_channel_params(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, c, c_mask, C, CPG, HAS_WEIGHT, HAS_BIAS)
    G = C // CPG
    coef_dz = tl.load(coef_dz_ptr + n * G + c // CPG, mask=c_mask, other=0.0)
    coef_xhat = tl.load(coef_xhat_ptr + n * G + c // CPG, mask=c_mask, other=0.0)
    offset = n.to(tl.int64) * stride_n + c[:, None] * stride_c
    for s0 in range(k * CHUNK, tl.minimum(k * CHUNK + CHUNK, S), BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (s < S)[None, :]
        xhat, dz = _load_xhat_dz(x_ptr, dy_ptr, offset + s[None, :] * stride_s, mask, mean, rstd, w, b, SILU,
                                 "evict_first")
        dx = rstd[:, None] * (w[:, None] * dz - coef_dz[:, None] - xhat * coef_xhat[:, None])
        if ADDEND:
            at = n.to(tl.int64) * stride_addend_n + c[:, None] * stride_addend_c + s[None, :] * stride_addend_s
            dx += tl.load(addend_ptr + at, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        tl.store(dx_ptr + offset + s[None, :] * stride_s, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _layout(x):
    """(S, strides (n, c, s)) of x seen as (N, C, S); Unsupported unless contiguous or channels_last."""
    C = x.shape[1]
    S = math.prod(x.shape[2:])
    if x.is_contiguous():
        return S, (C * S, S, 1)
    if channels_last(x):
        return S, (S * C, 1, C)
    raise Unsupported(f"x with strides {x.stride()} is neither contiguous nor channels_last")


def _walk_strides(t, strides):
    """t's strides seen as (N, C, S), where the kernels can read it along x's unit-stride dim
    (strides: x's, from _layout): its spatial dims merge into one stride. Size-1 dims take x's
    stride (any works: their index is 0), so a 1x1 map's contiguous gradient for a channels_last
    x reads as x; a channel slice of a concatenation's gradient (the UNet's skips) keeps its own
    strides. None where t must be copied into x's layout first."""
    spatial = [(n, st) for n, st in zip(t.shape[2:], t.stride()[2:]) if n > 1]
    if any(outer != inner * n for (_, outer), (n, inner) in zip(spatial, spatial[1:])):
        return None
    sizes = (t.shape[0], t.shape[1], math.prod(t.shape[2:]))
    mine = (t.stride(0), t.stride(1), spatial[-1][1] if spatial else 1)
    mine = tuple(m if n > 1 else x_stride for m, n, x_stride in zip(mine, sizes, strides))
    unit = strides.index(1)  # c for channels_last, s for contiguous: the coalesced dim
    return mine if mine[unit] == 1 else None


def _grow(x):
    """Tile growth factor: the interpreter pays per program, not per element."""
    return 1 if x.is_cuda else 4


def _tiling(x, C, S, strides):
    """(BLOCK_C, BLOCK_S, CHUNK, K): tile shape along the contiguous axis, and the spatial
    split into K chunks so that N * channel blocks * K programs cover every SM a few times."""
    N = x.shape[0]
    grow = _grow(x)
    if strides[1] == 1 and C > 1:  # channels_last: channels are contiguous
        block_c = min(next_power_of_2(C), MAX_BLOCK_C * grow)
        block_s = min(max(TILE * grow // block_c, 1), next_power_of_2(S))
    else:
        block_s = min(next_power_of_2(S), MAX_BLOCK_S * grow)
        block_c = min(max(TILE * grow // block_s, 1), next_power_of_2(C))
    # a couple of chunks on the interpreter exercise the split paths cheaply
    sms = sm_count(x.device, on_cpu=2)
    s_blocks = cdiv(S, block_s)
    k = max(1, min(s_blocks, cdiv(PROGRAMS_PER_SM * sms, N * cdiv(C, block_c))))
    chunk = cdiv(s_blocks, k) * block_s
    return block_c, block_s, chunk, cdiv(S, chunk)


def _single_pass_plan(N, C, S, G, channels_last, itemsize, sms, gpu_time=False):
    """(GROUPS, BLOCK_C, BLOCK_S, ALIGN, num_warps) of the single-pass forward, or None where
    the split path is the better one: a tile of GROUPS whole groups must fit SINGLE_PASS_BYTES
    (with gpu_time, SINGLE_PASS_GPU_TIME_BYTES as well), and the programs must give every SM one
    (else splitting the groups fills the GPU better)."""
    max_bytes = min(SINGLE_PASS_BYTES, SINGLE_PASS_GPU_TIME_BYTES) if gpu_time else SINGLE_PASS_BYTES
    cpg = C // G
    vec = 16 // itemsize
    max_warps = SINGLE_PASS_MAX_WARPS[channels_last]

    def elements(groups):
        return next_power_of_2(groups * cpg) * next_power_of_2(S)

    def fits(groups):
        n = elements(groups)
        return (n * itemsize <= max_bytes and n <= 32 * SINGLE_PASS_ELEMENTS_PER_THREAD * max_warps
                and N * cdiv(G, groups) >= sms)

    groups = 1
    if channels_last:  # each position's run of GROUPS * CPG channels must coalesce
        while groups * cpg * itemsize < MIN_RUN_BYTES and groups < G:
            groups *= 2
        # and be a whole number of 16-byte vectors where the tile allows it: 1920 channels (60
        # a group) at 8x8 in runs of 60 took 2-byte loads, in runs of 120 they take 16-byte ones
        aligned = groups
        while (aligned * cpg) % vec and C % vec == 0 and aligned < G:
            aligned *= 2
        if aligned != groups and fits(aligned):
            groups = aligned
    if not fits(groups):
        return None
    align = vec if channels_last else 1  # else the widest loads the run and C allow: 60 channels, 8 bytes
    while (groups * cpg) % align or C % align:
        align //= 2
    num_warps = max(elements(groups) // (32 * SINGLE_PASS_ELEMENTS_PER_THREAD), 4)  # <= max_warps: fits()
    return groups, next_power_of_2(groups * cpg), next_power_of_2(S), align, num_warps


def _plan(x, num_groups):
    N, C = x.shape[:2]
    S, strides = _layout(x)
    return _single_pass_plan(N, C, S, num_groups, strides[1] == 1 and C > 1, x.element_size(), sm_count(x.device, on_cpu=2),
                             gpu_time_preferred())


def group_norm_forward_path(x, num_groups):
    """Which forward runs for x: "single-pass" (each group read once, held in registers) or
    "split" (three passes, groups spread over many programs). Under ck.prefer_gpu_time() the
    answer may differ (SINGLE_PASS_GPU_TIME_BYTES)."""
    return "single-pass" if _plan(x, num_groups) else "split"


def _group_tiling(G, parts):
    """(BLOCK_G, BLOCK_P): groups per program and partials per group per step, ~1024 a tile."""
    block_p = min(next_power_of_2(parts), 1024)
    return min(max(1024 // block_p, 1), next_power_of_2(G)), block_p


def _check(x, weight, bias):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Unsupported(f"dtype {x.dtype}")
    if x.numel() == 0:
        raise Unsupported("empty input")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise Unsupported(f"{name} dtype {t.dtype}")
    S, strides = _layout(x)
    if x.shape[1] * S >= 2**31:  # offsets inside one sample are int32
        raise Unsupported(f"{x.shape[1] * S} elements per sample")
    return S, strides


def group_norm_forward(x, num_groups, weight, bias, eps, activation):
    """y, mean (N, G) fp32, rstd (N, G) fp32."""
    N, C = x.shape[:2]
    S, strides = _layout(x)
    cpg = C // num_groups
    mean = torch.empty(N, num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    y = torch.empty_like(x)  # keeps x's (dense) strides, hence its memory format
    flags = {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None, "SILU": activation == "silu"}
    plan = _plan(x, num_groups)
    if plan:
        groups, block_c, block_s, align, num_warps = plan
        _single_pass_kernel[(N, cdiv(num_groups, groups))](
            x, y, weight, bias, mean, rstd, C, S, cpg, eps, *strides, **flags,
            GROUPS=groups, BLOCK_C=block_c, BLOCK_S=block_s, ALIGN=align, num_warps=num_warps,
        )
        return y, mean, rstd
    block_c, block_s, chunk, K = _tiling(x, C, S, strides)
    part_mean = torch.empty(N, K, C, device=x.device, dtype=torch.float32)
    part_m2 = torch.empty_like(part_mean)
    grid = (N, cdiv(C, block_c), K)
    _channel_stats_kernel[grid](x, part_mean, part_m2, C, S, chunk, *strides, BLOCK_C=block_c, BLOCK_S=block_s)
    block_g, block_p = _group_tiling(num_groups, K * cpg)
    _group_stats_kernel[(N, cdiv(num_groups, block_g))](
        part_mean, part_m2, mean, rstd, C, S, K, chunk, cpg, eps, BLOCK_G=block_g, BLOCK_P=block_p
    )
    _normalize_kernel[grid](
        x, y, weight, bias, mean, rstd, C, S, chunk, cpg, *strides, **flags, BLOCK_C=block_c, BLOCK_S=block_s,
    )
    return y, mean, rstd


def group_norm_backward(dy, x, weight, bias, mean, rstd, activation, need_dx, need_affine, dx_addend=None):
    """(dx (+ dx_addend) or None, dweight fp32 or None, dbias fp32 or None)."""
    N, C = x.shape[:2]
    G = mean.shape[1]
    S, strides = _layout(x)
    if _walk_strides(dy, strides) != strides:  # the kernels walk dy with x's strides
        dy = torch.empty_like(x).copy_(dy)
    addend_strides = strides if dx_addend is None else _walk_strides(dx_addend, strides)
    if addend_strides is None:
        dx_addend, addend_strides = torch.empty_like(x).copy_(dx_addend), strides
    block_c, block_s, chunk, K = _tiling(x, C, S, strides)
    cpg = C // G
    has_w, has_b, silu = weight is not None, bias is not None, activation == "silu"
    sums = torch.empty(2, N, K, C, device=x.device, dtype=torch.float32)  # of dz * xhat, then of dz
    sum_dz_xhat, sum_dz = sums
    grid = (N, cdiv(C, block_c), K)
    _backward_partials_kernel[grid](
        x, dy, weight, bias, mean, rstd, sum_dz, sum_dz_xhat, C, S, chunk, cpg, *strides,
        HAS_WEIGHT=has_w, HAS_BIAS=has_b, SILU=silu, BLOCK_C=block_c, BLOCK_S=block_s,
    )
    dw = db = dx = None
    if need_affine:
        # two tensors, not views of one: a custom op's outputs may not alias
        dw, db = (column_sum(part.view(N * K, C), torch.empty(C, device=x.device, dtype=torch.float32))
                  for part in sums)
    if need_dx:
        coef_dz = torch.empty_like(mean)
        coef_xhat = torch.empty_like(mean)
        block_g, block_p = _group_tiling(G, K * cpg)
        _backward_group_kernel[(N, cdiv(G, block_g))](
            sum_dz, sum_dz_xhat, weight, coef_dz, coef_xhat, C, S, K, cpg,
            HAS_WEIGHT=has_w, BLOCK_G=block_g, BLOCK_P=block_p,
        )
        dx = torch.empty_like(x)
        _backward_dx_kernel[grid](
            x, dy, dx, dx_addend, weight, bias, mean, rstd, coef_dz, coef_xhat, C, S, chunk, cpg, *strides, *addend_strides,
            HAS_WEIGHT=has_w, HAS_BIAS=has_b, SILU=silu, ADDEND=dx_addend is not None, BLOCK_C=block_c, BLOCK_S=block_s,
        )
    return dx, dw, db


# cckernels::triton_group_norm(_backward): the same launchers as custom ops, for torch.compile.
group_norm_op = custom_ops("triton_group_norm", group_norm_forward, group_norm_backward)


def group_norm(x, num_groups, weight, bias, eps, activation, prenorm):
    """Backend entry (arguments validated by cckernels.group_norm); see the module docstring."""
    _check(x, weight, bias)
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    if emitting_custom_ops():
        y = group_norm_op(x, num_groups, weight, bias, eps, activation)[0]
        return (y, x) if prenorm else y
    return GroupNormFunction.apply(x, num_groups, weight, bias, eps, activation, prenorm,
                                   (group_norm_forward, group_norm_backward))


# ----------------------------------------------------------------------------------------
# Ahead-of-time inspection (python -m cckernels.inspect): what to compile for sm80/sm90 and
# what the machine code must show. Variants: the two layouts at their GPU tile shapes, with
# the unit stride Triton specializes to a constant (the vectorized path).
# ----------------------------------------------------------------------------------------
_ARGS = {
    "x_ptr": "*T", "y_ptr": "*T", "dy_ptr": "*T", "addend_ptr": "*T", "dx_ptr": "*T", "*_ptr": "*fp32",
    "C": "i32:16", "S": "i32:16", "CHUNK": "i32:16", "stride_*": "i32:16",
    "HAS_WEIGHT": True, "HAS_BIAS": True, "SILU": True, "ADDEND": True,
}  # fmt: skip
_LAYOUTS = {
    "nchw": {"stride_s": 1, "stride_addend_s": 1, "BLOCK_C": TILE // MAX_BLOCK_S, "BLOCK_S": MAX_BLOCK_S},
    "nhwc": {"stride_c": 1, "stride_addend_c": 1, "BLOCK_C": MAX_BLOCK_C, "BLOCK_S": TILE // MAX_BLOCK_C},
}
_STREAM = {"op": "group_norm", "dtypes": (torch.float32, torch.float16, torch.bfloat16), "args": _ARGS,
           "variants": _LAYOUTS, "expect": {"sm90": {"ldg128": True}}}  # fmt: skip
_REDUCE = {"op": "group_norm", "dtypes": (torch.float32,)}  # fp32 partials only
# The single pass at 16K-element tiles (32 elements a thread at 16 warps, the largest in fp32),
# batch 32: NCHW 32x32x320 (one group of 10 channels x 1024 positions) and NHWC 16x16x640 in
# bf16 (two groups of 20 channels x 256). In fp32 a 20-channel group alone is a 64-byte run (a
# 32 x 256 tile), so its largest NHWC tile comes from 1280 channels (one group of 40 x 256).
# Contiguous bf16/fp16 tiles go up to 32K elements at 32 warps: NCHW 32x32x960 (one group of 30
# channels x 1024).
def _single_pass_variant(channels, S, channels_last, strides):  # channels: itemsize -> C
    def args(dtype):
        plan = _single_pass_plan(32, channels[dtype.itemsize], S, 32, channels_last, dtype.itemsize, 132)
        return {**strides, **dict(zip(("GROUPS", "BLOCK_C", "BLOCK_S", "ALIGN"), plan))}

    return args


_SINGLE_PASS = {"nchw": _single_pass_variant({2: 320, 4: 320}, 1024, False, {"stride_s": 1}),
                "nhwc": _single_pass_variant({2: 640, 4: 1280}, 256, True, {"stride_c": 1}),
                # groups of 60 channels (SD2's 1920): 8-byte loads in bf16 (ALIGN 4), 16-byte in fp32
                "nhwc-60": _single_pass_variant({2: 1920, 4: 1920}, 256, True, {"stride_c": 1})}  # fmt: skip
_SINGLE_PASS_32K = {"nchw-32k": _single_pass_variant({2: 960}, 1024, False, {"stride_s": 1})}
_BLOCK_G, _BLOCK_P = _group_tiling(32, 10 * 16)  # SD2: 32 groups of 10 channels, 16 chunks
INSPECT = [
    {**_STREAM, "kernel": _channel_stats_kernel},
    {**_STREAM, "kernel": _normalize_kernel},
    {**_STREAM, "kernel": _single_pass_kernel, "variants": _SINGLE_PASS,
     "options": {"num_warps": _single_pass_plan(32, 320, 1024, 32, False, 2, 132)[-1]}},  # 16
    {**_STREAM, "kernel": _single_pass_kernel, "variants": _SINGLE_PASS_32K, "dtypes": (torch.float16, torch.bfloat16),
     "options": {"num_warps": _single_pass_plan(32, 960, 1024, 32, False, 2, 132)[-1]}},  # 32
    {**_STREAM, "kernel": _backward_partials_kernel},
    {**_STREAM, "kernel": _backward_dx_kernel},
    {**_REDUCE, "kernel": _group_stats_kernel, "args": {**_ARGS, "BLOCK_G": _BLOCK_G, "BLOCK_P": _BLOCK_P}},
    {**_REDUCE, "kernel": _backward_group_kernel, "args": {**_ARGS, "BLOCK_G": _BLOCK_G, "BLOCK_P": _BLOCK_P}},
]
