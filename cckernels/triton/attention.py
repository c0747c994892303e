"""Fused attention (FlashAttention-2 style): forward and backward in Triton.

Layout BLHD (batch, length, heads, head dim) with any strides and a contiguous last dim, so
views of a (B, L, 3*H*D) projection need no copy. Non-causal. The forward never stores the
(Lq, Lk) score matrix: it streams K/V blocks with an online softmax and saves the row
logsumexp. The backward recomputes the probabilities block by block, in one of two ways:
- atomic (FlashAttention-2's): one kernel owns a K/V block and loops over queries, giving dK
  and dV and adding each tile's share of dQ to an fp32 buffer with atomics (5 matmuls per
  tile pair); a small kernel then converts dQ to the input dtype. The order of the atomic
  additions varies, so dQ's last bits vary run to run. On sm90 a tile is added by one TMA
  reduction (as FlashAttention-3 does), elsewhere element by element.
- deterministic: the same K/V kernel without dQ, then a kernel owning a query block that
  loops over keys for dQ (7 matmuls per tile pair: P and dP are computed twice). Every
  gradient element has exactly one writer: bit-identical gradients run to run.
`deterministic_backward()` picks one: torch.use_deterministic_algorithms(True) or
CCKERNELS_DETERMINISTIC=1 forces the deterministic one, CCKERNELS_DETERMINISTIC=0 the atomic
one; otherwise DETERMINISTIC_BY_DEFAULT decides.
Short keys (at most MAX_ONE_BLOCK_KEYS = 128, cross-attention's 77; fp16/bf16 on sm90; not
head dims above 64 at 65-128 keys, which spill) take neither: all keys are one block, so one
dK/dV kernel also computes delta and stores dQ, each dQ row from exactly one program (no
atomics, deterministic): one launch, q and dO read once. The forward takes short keys without
a loop too, as a block of the largest power of two of them and a masked tail block (77 keys:
64 + 16, not 128 padded: _key_blocks).

Scores live in the log2 domain: log2(e) is folded into the scale and exp2 replaces exp.
Head dims up to 128 are padded to the next power of two inside the kernels (masked loads).
"""
import functools
import os

import torch
import triton
import triton.language as tl

from cckernels.backend import Unsupported, _on_device, env_flag, first_order_only, triton_interpreting
from cckernels.packing import is_packed, packed_empty
from cckernels.tracing import emitting_custom_ops
from cckernels.triton.column_sum import column_sum
from cckernels.triton.launch import Tuned, cdiv, next_power_of_2, sm_count

LOG2E = 1.4426950408889634
FP32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32
MAX_HEAD_DIM = 128
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Triton's interpreter multiplies bf16 bit patterns as integers in tl.dot (triton-lang/triton#11584),
# so CPU calls refuse bf16; tests/triton_interpreter.py mends the interpreter for the CPU tests
# and sets this.
INTERPRETER_BF16_DOT = False
# Deterministic by default: measured, it is the faster one. The atomic backward does 5/7 of the
# deterministic one's matmul work (as FlashAttention-2), but on an H200 (bench_attention,
# benchmarks/results/2026-11-25-2357-NVIDIA-H200) the 512 px self-attention (L = 4096, bf16, D = 64)
# ran fwd+bwd at 369 TFLOP/s deterministic and 320 with atomic dQ: the fp32 atomics and the
# extra dQ pass cost more than the two recomputed matmuls. (The shorter shapes were host-bound
# in that run and do not tell the two apart.) CCKERNELS_DETERMINISTIC=0 picks the atomic one.
# Those atomics were per element (4,096 REDs a 64x64 tile); on sm90 they are now one TMA
# reduction a tile, not yet timed: bench_attention's "triton atomic-dQ" row is the comparison
# (the fifth H200 run: 1.849 ms against 1.542 deterministic and cuDNN's 1.348 at L = 4096).
DETERMINISTIC_BY_DEFAULT = True


# ----------------------------------------------------------------------------------------
# Block-shape configs. On a GPU each kernel is autotuned over a small pool, keyed by head
# dim and power-of-two length buckets (and dtype); `_prune` drops the configs that do not fit
# the device's shared memory or would spill registers, and shrinks blocks to short lengths
# (cross-attention with 77 keys gets one 128-key block: the short-key path). Under the
# interpreter (CPU tests) there is one small config so nothing is benchmarked.
# CCKERNELS_AUTOTUNE=0 skips the search (each new shape costs one compile, not a dozen) and
# takes the first config that fits: pools are ordered by expected speed on H100. So does
# torch.use_deterministic_algorithms(True): the search picks by timing, so another process
# (a resumed run) could pick other block shapes, hence another summation order and other bits.
# ----------------------------------------------------------------------------------------
def _configs(pool):
    if triton_interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pool]


# (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages): FlashAttention-2 / Triton-tutorial
# shapes for A100 (sm80, 163 KB shared memory) and H100 (sm90, 227 KB); the 8-warp 64x64
# dK/dV and dQ shapes are the ones that fit head dim 128, the smallest ones fp32; 32x64 with
# 8 warps is the dK/dV shape whose atomic-dQ pass fits head dims above 64 on sm80.
FWD_POOL = [
    (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 4), (64, 64, 4, 4), (128, 32, 4, 4),
    (64, 32, 4, 3), (64, 64, 8, 3),
]
DKDV_POOL = [
    (64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 8, 3), (64, 64, 8, 2), (64, 64, 4, 3), (32, 64, 4, 4), (32, 64, 4, 2),
    (32, 64, 8, 2),
]
DQ_POOL = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4), (64, 32, 4, 3)]
# fp32 runs IEEE dots on FMA units, not tensor cores: the accuracy path, not the speed path. The
# pools' tiles spill there (6-15 KB a thread on sm90), so fp32 takes one small shape per kernel,
# no search. With triton 3.6 none spills on sm80 or sm90 at head dims 64 and 80 (padded to
# 128, masked), with or without atomic dQ (python -m cckernels.inspect --dtype fp32 --quick;
# 3.8: 8 B in the sm80 d64 dK/dV). Cross-attention loops over its keys in these blocks.
FWD_FP32, DKDV_FP32, DQ_FP32 = (32, 16, 4, 2), (16, 16, 4, 2), (16, 32, 4, 2)
AUTOTUNE_KEY = ["q_bucket", "k_bucket", "HEAD_DIM", "ATOMIC_DQ", "STORE_DQ"]  # names a kernel lacks are ignored
# Keys up to this many are one block: the forward's short-key path, and the backward's single
# kernel for 16-bit inputs (STORE_DQ in _attn_bwd_dkdv_kernel).
MAX_ONE_BLOCK_KEYS = 128
# Footprints: (shared-memory bytes, fp32-equivalent register values) of a (BLOCK_M, BLOCK_N,
# head dim padded, stages, element size) config. Shared memory: the tiles loaded once plus the
# pipelined tiles times stages (and, in dK/dV, the pipelined fp32 lse and delta rows): exactly
# what Triton allocates on sm90, an upper bound on sm80 (`python -m cckernels.inspect` shows
# both). Registers: fp32 accumulators + fp32 score tiles + 16-bit tiles held for the whole loop
# at half weight. REGISTER_BUDGET: the values per thread at which fp16/bf16 compiles stop
# fitting 255 registers without spilling, measured over these pools and head dims 32-128:
# sm90's wgmma keeps up to 224 (256 spills); sm80's mma up to 160 (some 192s spill).
REGISTER_BUDGET = {90: 224, 80: 160}


def _padded(n):
    """A length or head dim as the kernels' blocks see it: the next power of two, at least 16
    (tl.dot's smallest tile side)."""
    return max(16, next_power_of_2(n))


def _fwd_footprint(m, n, d, stages, esize):
    return (m * d + stages * 2 * n * d) * esize, m * d + m * n + m * d // 2


def _dkdv_footprint(m, n, d, stages, esize, atomic_dq=False, store_dq=False, tma_dq=False):
    smem = (2 * n * d + stages * 2 * m * d) * esize + (stages - 1) * 2 * m * 4
    regs = 2 * n * d + 2 * m * n + n * d
    if store_dq:  # the atomic pass's dQ tile and scratch, plus the O tile for delta
        smem, regs = _dkdv_footprint(m, n, d, stages, esize, atomic_dq=True)
        return smem, regs + m * d // 2
    if atomic_dq:
        # Measured: dS transposed for dS @ K and the fp32 dQ tile rearranged for the atomics
        # share one scratch buffer; below 64 query rows both are held, dS at 4 bytes.
        scratch = max(m * d * 4, m * n * esize) if m >= 64 else m * d * 4 + m * n * 4
        if tma_dq:  # the fp32 dQ tile staged for the TMA reduction, besides
            scratch += m * d * 4
        return smem + scratch, regs + m * d + m * n // 2
    return smem, regs


def _dq_footprint(m, n, d, stages, esize):
    return (2 * m * d + stages * 2 * n * d) * esize, m * d + 2 * m * n + m * d


def _max_shared_memory(device):
    return triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]


def _prune(configs, named_args, footprint, fp32_shape, short_kv_block=False, target=None, **kwargs):
    """Configs that fit this device (or target = (arch, shared-memory bytes), e.g. (90, 232448))
    and these lengths, each block at most the padded length; fp32 takes `fp32_shape` alone.

    short_kv_block: when Lk <= 128 every config takes all keys as one block (short-key path);
    so does a STORE_DQ launch, which needs it.
    """
    q = named_args["Q"]
    m_cap, n_cap = _padded(named_args["Lq"]), _padded(named_args["Lk"])
    if q.dtype == torch.float32:
        m, n, w, s = fp32_shape
        return [triton.Config({"BLOCK_M": min(m, m_cap), "BLOCK_N": min(n, n_cap)}, num_warps=w, num_stages=s)]
    fits, capped = _fitting(configs, q, m_cap, n_cap, footprint, fp32_shape, short_kv_block, target, **kwargs)
    if not fits:
        fits = [min(capped, key=lambda shape: capped[shape][0])]
    if not env_flag("CCKERNELS_AUTOTUNE", True) or torch.are_deterministic_algorithms_enabled():
        fits = fits[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in fits]


def _fitting(configs, q, m_cap, n_cap, footprint, fp32_shape, short_kv_block, target, **kwargs):
    """(shapes (BLOCK_M, BLOCK_N, warps, stages) that fit shared memory and the register
    budget, {every capped shape: its footprint}) for 16-bit q."""
    if target is None:
        major, minor = _capability(q.device)
        target = (10 * major + minor, _max_shared_memory(q.device))
    arch, smem_limit = target
    one_block = (short_kv_block or kwargs.get("STORE_DQ")) and n_cap <= MAX_ONE_BLOCK_KEYS
    dq = ({"atomic_dq": True, "tma_dq": bool(kwargs.get("TMA_DQ"))} if kwargs.get("ATOMIC_DQ")
          else {"store_dq": True} if kwargs.get("STORE_DQ") else {})
    capped = {}
    for c in configs:
        if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == fp32_shape:
            continue  # listed for fp32 (and inspect), not one of the 16-bit pool's shapes
        m = min(c.kwargs["BLOCK_M"], m_cap)
        n = n_cap if one_block else min(c.kwargs["BLOCK_N"], n_cap)
        stages = 1 if one_block and short_kv_block else c.num_stages  # the forward's: no key loop to pipeline
        shape = (m, n, c.num_warps, stages)
        capped.setdefault(shape, footprint(m, n, kwargs["BLOCK_D"], stages, q.element_size(), **dq))
    budget = REGISTER_BUDGET[90 if arch == 90 else 80]
    fits = [shape for shape, (smem, regs) in capped.items() if smem <= smem_limit and regs <= budget * 32 * shape[2]]
    return fits, capped


@functools.cache
def _one_kernel_backward_fits(device, dtype, block_d, n_cap):
    """Whether some dK/dV config with dQ stored (STORE_DQ) fits this GPU without spilling: every
    key is in its one block, and head dims above 64 with 65-128 keys do not fit (they spilled,
    python -m cckernels.inspect). sm90 only: on sm80 the 64-query shapes that the register
    model lets through spilled. The interpreter has no registers to fit."""
    if device.type != "cuda":
        return True
    if _capability(device)[0] != 9:  # sm80 spilled; sm100+ never compiled (inspect knows 80 and 90)
        return False
    q = torch.empty(0, dtype=dtype, device="meta")  # its dtype is what counts
    configs, target = _attn_bwd_dkdv_kernel.configs, (90, _max_shared_memory(device))
    fits, _ = _fitting(configs, q, 128, n_cap, _dkdv_footprint, DKDV_FP32, False, target,
                       BLOCK_D=block_d, STORE_DQ=True)
    return bool(fits)


def _autotune(pool, footprint, fp32_shape, short_kv_block=False, accumulators=()):
    """accumulators: arguments the kernel adds into (atomics). The search runs the kernel many
    times on the real arguments, so Triton calls this hook before each of those runs and once
    more before the real run: each starts from zeros, not from the sum of the runs before."""
    prune = functools.partial(_prune, footprint=footprint, fp32_shape=fp32_shape, short_kv_block=short_kv_block)

    def zero_accumulators(kwargs, reset_only=False):
        for name in accumulators:
            if kwargs[name] is not None:
                kwargs[name].zero_()

    return triton.autotune(configs=_configs(pool + [fp32_shape]), key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune},
                           pre_hook=zero_accumulators if accumulators else None)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a (rows, cols) tile, zero-filling rows >= n_rows / cols >= n_cols where masked."""
    if MASK_ROWS:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif MASK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(ptrs, tile, rows, n_rows, cols, n_cols, MASK_COLS: tl.constexpr, ADD: tl.constexpr = False):
    """Store a (rows, cols) tile, or with ADD atomically add it (fp32); rows are always masked."""
    mask = rows[:, None] < n_rows
    if MASK_COLS:
        mask = mask & (cols[None, :] < n_cols)
    if ADD:
        # relaxed: a pure accumulation, nothing reads dQ before the kernel ends
        tl.atomic_add(ptrs, tile, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, tile, mask=mask)


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kl, stride_vl, start_n, Lk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr, MASK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One K/V block of the online softmax: rescale what was accumulated, add this block."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(k_ptrs + start_n * stride_kl, offs_n, Lk, offs_d, HEAD_DIM, MASK_N, MASK_D)
    v = _load_tile(v_ptrs + start_n * stride_vl, offs_n, Lk, offs_d, HEAD_DIM, MASK_N, MASK_D)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASK_N:
        qk = tl.where(offs_n[None, :] < Lk, qk, float("-inf"))
    # The raw scores' row maximum, scaled after (ck.attention takes positive scales only): each
    # score's exponent is then one FMA, not a multiply and a subtraction. At head dim 64 the
    # loop is bound by issuing instructions, and this saves 32 of 308 a thread per
    # 128x64 block on sm90 (SASS, triton 3.8).
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


def _key_blocks(Lk, block_n, one_block):
    """(MAIN_N, TAIL_N): the key blocks of a kernel whose keys are all one block_n-wide block
    (one_block) as a block of the largest power of two <= Lk keys (no mask) and a masked tail,
    the smallest block >= 16 (tl.dot's least) that holds the rest, where the two are narrower
    than block_n: 77 keys as 64 + 16 = 80 wide instead of 128, 37.5% less of the score tiles'
    matmuls and exp2 spent on padding. Else (block_n, 0): blocks of block_n, no tail (64 or
    100 keys, or keys in a loop)."""
    main = 1 << (Lk.bit_length() - 1)
    tail = max(16, next_power_of_2(Lk - main))
    split = one_block and Lk <= block_n and main >= 16 and Lk > main and main + tail < block_n
    return (main, tail) if split else (block_n, 0)


@_autotune(FWD_POOL, _fwd_footprint, FWD_FP32, short_kv_block=True)
@triton.heuristics({
    "EVEN_N": lambda a: a["Lk"] % a["BLOCK_N"] == 0,
    "SHORT_KV": lambda a: a["Lk"] <= a["BLOCK_N"],
    # head dims above 64 (padded to 128) keep one block: on sm80 the split spilled where one
    # block did not (python -m cckernels.inspect)
    "MAIN_N": lambda a: _key_blocks(a["Lk"], a["BLOCK_N"], a["SHORT_KV"] and a["BLOCK_D"] <= 64)[0],
    "TAIL_N": lambda a: _key_blocks(a["Lk"], a["BLOCK_N"], a["SHORT_KV"] and a["BLOCK_D"] <= 64)[1],
})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # (B, Lq, H, D), (B, Lk, H, D), (B, Lk, H, D); any strides, last dim contiguous
    O,  # (B, Lq, H, D) out, contiguous
    LSE,  # (B, H, Lq) fp32 out: log2(sum_k exp2(scaled score)), for the backward
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    H, Lq, Lk,
    qk_scale,  # scale * log2(e)
    q_bucket, k_bucket,  # power-of-two length buckets: autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, SHORT_KV: tl.constexpr,
    MAIN_N: tl.constexpr, TAIL_N: tl.constexpr,  # key blocks of MAIN_N, then TAIL_N more: _key_blocks
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, MAIN_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :]
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :]
    q = _load_tile(q_ptrs, offs_m, Lq, offs_d, HEAD_DIM, True, MASK_D)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if SHORT_KV:
        # Short-key path (cross-attention, Lk <= BLOCK_N): all of K/V on chip, loaded once, no
        # loop: one block, or a MAIN_N block of whole keys and a masked TAIL_N block after it.
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kl, stride_vl, 0, Lk, qk_scale,
            HEAD_DIM, MAIN_N, BLOCK_D, not EVEN_N and TAIL_N == 0, MASK_D, DOT_PRECISION,
        )
        if TAIL_N > 0:
            offs_t = tl.arange(0, TAIL_N)
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, K + b * stride_kb + h * stride_kh + offs_t[:, None] * stride_kl + offs_d[None, :],
                V + b * stride_vb + h * stride_vh + offs_t[:, None] * stride_vl + offs_d[None, :], stride_kl,
                stride_vl, MAIN_N, Lk, qk_scale, HEAD_DIM, TAIL_N, BLOCK_D, True, MASK_D, DOT_PRECISION,
            )
    else:
        for start_n in range(0, Lk, BLOCK_N):
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kl, stride_vl, start_n, Lk, qk_scale,
                HEAD_DIM, BLOCK_N, BLOCK_D, not EVEN_N, MASK_D, DOT_PRECISION,
            )

    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    _store_tile(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), offs_m, Lq, offs_d, HEAD_DIM, MASK_D)
    tl.store(LSE + bh * Lq + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < Lq)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO,  # (B, Lq, H, D): forward output and its gradient, any strides
    DELTA,  # (B, H, Lq) fp32 out: rowsum(dO * O)
    stride_ob, stride_ol, stride_oh,
    stride_dob, stride_dol, stride_doh,
    H, Lq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
                   offs_m, Lq, offs_d, HEAD_DIM, True, MASK_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :],
                    offs_m, Lq, offs_d, HEAD_DIM, True, MASK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=offs_m < Lq)


@_autotune(DKDV_POOL, _dkdv_footprint, DKDV_FP32, accumulators=("DQ",))
@triton.heuristics({
    # STORE_DQ needs every key in one block: the configs the GPU pool keeps have it already
    # (_prune); the interpreter's single config has to be widened here.
    "BLOCK_N": lambda a: _padded(a["Lk"]) if a["STORE_DQ"] else a["BLOCK_N"],
    "EVEN_M": lambda a: a["Lq"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["Lk"] % a["BLOCK_N"] == 0,
})
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # (B, Lq, H, D), (B, Lk, H, D) x2, (B, Lq, H, D); any strides
    O,  # STORE_DQ: (B, Lq, H, D) forward output, any strides (delta from it here); else None
    LSE, DELTA,  # (B, H, Lq) fp32; DELTA None with STORE_DQ
    DK, DV,  # (S, B, Lk, H, D) out: one slice per query split (S = 1: the gradients themselves)
    DQ,  # (B, Lq, H, D): ATOMIC_DQ fp32 in/out, zeroed, dQ / scale adds up here; STORE_DQ dQ
         # itself (out, q's dtype); else None
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_dob, stride_dol, stride_doh,
    stride_ob, stride_ol, stride_oh,  # O (unused without STORE_DQ)
    stride_dks, stride_dkb, stride_dkl, stride_dkh,  # shared by DK and DV
    stride_dqb, stride_dql, stride_dqh,  # DQ (unused without ATOMIC_DQ or STORE_DQ)
    H, Lq, Lk,
    q_rows_per_split,  # queries handled by one program (a multiple of 128, so of BLOCK_M)
    scale, qk_scale,
    q_bucket, k_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,  # also dQ, FlashAttention-2's single pass (5 matmuls instead of 4 + 3)
    # ATOMIC_DQ's tiles added by one TMA reduction each (sm90: UTMAREDG), not element by element
    TMA_DQ: tl.constexpr,
    # Also dQ, where all keys are one block (Lk <= BLOCK_N): each dQ row then has one writer, so
    # it is stored, no atomics, no buffer; and delta = rowsum(dO * O) is taken here too. The
    # whole backward of a short-key attention (cross-attention's 77 keys) in one kernel.
    STORE_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_n, bh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (bh // H).to(tl.int64), bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :],
                   offs_n, Lk, offs_d, HEAD_DIM, not EVEN_N, MASK_D)
    v = _load_tile(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :],
                   offs_n, Lk, offs_d, HEAD_DIM, not EVEN_N, MASK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    m_start = split * q_rows_per_split
    m_end = tl.minimum(Lq, m_start + q_rows_per_split)
    offs_m0 = tl.arange(0, BLOCK_M)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m0[:, None] * stride_ql + offs_d[None, :]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m0[:, None] * stride_dol + offs_d[None, :]
    if ATOMIC_DQ or STORE_DQ:
        dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m0[:, None] * stride_dql + offs_d[None, :]
    if TMA_DQ:  # DQ as (B * Lq, H * HEAD_DIM), contiguous
        dq_desc = tl.make_tensor_descriptor(DQ, shape=[tl.num_programs(1) // H * Lq, H * HEAD_DIM],
                                            strides=[H * HEAD_DIM, 1], block_shape=[BLOCK_M, BLOCK_D])
    if STORE_DQ:
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m0[:, None] * stride_ol + offs_d[None, :]
    for start_m in range(m_start, m_end, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_tile(q_ptrs + start_m * stride_ql, offs_m, Lq, offs_d, HEAD_DIM, not EVEN_M, MASK_D)
        do = _load_tile(do_ptrs + start_m * stride_dol, offs_m, Lq, offs_d, HEAD_DIM, not EVEN_M, MASK_D)
        if EVEN_M:
            lse = tl.load(LSE + bh * Lq + offs_m)
        else:
            # lse = +inf makes the probabilities of padded query rows exactly 0.
            lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
        if STORE_DQ:  # as _attn_bwd_delta_kernel (padded rows: 0)
            o = _load_tile(o_ptrs + start_m * stride_ol, offs_m, Lq, offs_d, HEAD_DIM, not EVEN_M, MASK_D)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        elif EVEN_M:
            delta = tl.load(DELTA + bh * Lq + offs_m)
        else:
            delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        # Transposed problem (keys x queries), so dK and dV accumulate without transposes.
        # Padded key rows (k = v = 0) only produce dK/dV rows that are never stored.
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        if (ATOMIC_DQ or STORE_DQ) and not EVEN_N:
            # but they reach dQ: they need probability 0 (exp2(0 - lse) can overflow to inf)
            qkT = tl.where(offs_n[:, None] < Lk, qkT, float("-inf"))
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            # Every key block adds its share to the same dQ rows: fp32 atomics, so the order
            # of the additions (and dQ's last bits) varies from run to run.
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=DOT_PRECISION)
            if TMA_DQ:
                # The tile's padded rows (queries past Lq: probability 0) and columns (head dims
                # past HEAD_DIM: k's are 0) are exact zeros, so where they reach the next batch's
                # rows or the next head's columns they add nothing; TMA clips at the end.
                dq_desc.atomic_add([(b * Lq + start_m).to(tl.int32), h * HEAD_DIM], dq)
            else:
                _store_tile(dq_ptrs + start_m * stride_dql, dq, offs_m, Lq, offs_d, HEAD_DIM, MASK_D, ADD=True)
        if STORE_DQ:
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=DOT_PRECISION)
            _store_tile(dq_ptrs + start_m * stride_dql, (dq * scale).to(DQ.dtype.element_ty), offs_m, Lq, offs_d,
                        HEAD_DIM, MASK_D)

    out = split * stride_dks + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkl + offs_d[None, :]
    _store_tile(DK + out, (dk * scale).to(DK.dtype.element_ty), offs_n, Lk, offs_d, HEAD_DIM, MASK_D)
    _store_tile(DV + out, dv.to(DV.dtype.element_ty), offs_n, Lk, offs_d, HEAD_DIM, MASK_D)


@_autotune(DQ_POOL, _dq_footprint, DQ_FP32)
@triton.heuristics({"EVEN_N": lambda a: a["Lk"] % a["BLOCK_N"] == 0})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # (B, Lq, H, D), (B, Lk, H, D) x2, (B, Lq, H, D); any strides
    LSE, DELTA,  # (B, H, Lq) fp32
    DQ,  # (B, Lq, H, D) out, contiguous
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_dob, stride_dol, stride_doh,
    stride_dqb, stride_dql, stride_dqh,
    H, Lq, Lk,
    scale, qk_scale,
    q_bucket, k_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                   offs_m, Lq, offs_d, HEAD_DIM, True, MASK_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :],
                    offs_m, Lq, offs_d, HEAD_DIM, True, MASK_D)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :]
    for start_n in range(0, Lk, BLOCK_N):
        k = _load_tile(k_ptrs + start_n * stride_kl, start_n + offs_n, Lk, offs_d, HEAD_DIM, not EVEN_N, MASK_D)
        v = _load_tile(v_ptrs + start_n * stride_vl, start_n + offs_n, Lk, offs_d, HEAD_DIM, not EVEN_N, MASK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if not EVEN_N:
            # Padded keys must get probability 0: exp2(0 - lse) can overflow to inf.
            qk = tl.where(start_n + offs_n[None, :] < Lk, qk, float("-inf"))
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dql + offs_d[None, :]
    _store_tile(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), offs_m, Lq, offs_d, HEAD_DIM, MASK_D)


@triton.jit
def _attn_bwd_dq_convert_kernel(
    DQ_ACC,  # (B, Lq, H, D) fp32, contiguous: dQ / scale, as the atomic dK/dV/dQ pass left it
    DQ,  # (B, Lq, H, D) out in q's dtype, contiguous (DQ_ACC itself when that is fp32)
    n_elements, scale,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    tl.store(DQ + offs, (tl.load(DQ_ACC + offs, mask=mask) * scale).to(DQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
# The autotuned kernels' launches, each signature's config remembered (launch.Tuned).
_fwd_launch, _dkdv_launch, _dq_launch = Tuned(_attn_fwd_kernel), Tuned(_attn_bwd_dkdv_kernel), Tuned(_attn_bwd_dq_kernel)


def _head_args(q):
    """Compile-time head-dim arguments shared by every kernel."""
    D = q.shape[-1]
    block_d = _padded(D)
    return {
        "HEAD_DIM": D,
        "BLOCK_D": block_d,
        "MASK_D": D != block_d,
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",  # fp32 keeps fp32 accuracy
    }


def _buckets(Lq, Lk):
    return next_power_of_2(Lq), next_power_of_2(Lk)


def _forward(q, k, v, scale):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    o = torch.empty((B, Lq, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    grid = lambda meta: (cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _fwd_launch[grid](
        q, k, v, o, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, Lq, Lk, scale * LOG2E, *_buckets(Lq, Lk), **_head_args(q),
    )
    return o, lse


def _split_waves():
    """CCKERNELS_ATTENTION_SPLIT_WAVES (default 1): programs per SM _dkdv_splits aims at."""
    env = os.environ.get("CCKERNELS_ATTENTION_SPLIT_WAVES", "1")
    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"CCKERNELS_ATTENTION_SPLIT_WAVES={env!r}: use a whole number >= 1 (waves of programs)")
    return int(env)


def _dkdv_splits(Lq, Lk, BH, device):
    """Query rows per dK/dV program: split the query loop when too few key blocks fill the GPU.

    Cross-attention with 77 keys has one key block per (batch, head); without a split a
    handful of programs would each walk all of Lq. Partial sums go to an fp32 buffer and are
    reduced in a fixed order, which keeps the backward deterministic. Splits stop at about one
    wave of programs (CCKERNELS_ATTENTION_SPLIT_WAVES waves: one program an SM each): each one
    adds a (B, Lk, H, D) fp32 partial per gradient to write and sum, little next to the query
    side's traffic when keys are few (2 * Lk / Lq of it per split), but one program an SM
    leaves most of an SM idle: bench_attention's "triton 4 waves" rows time 4 for short keys.
    """
    programs = cdiv(Lk, 128) * BH
    splits = max(1, min(cdiv(Lq, 128), cdiv(_split_waves() * sm_count(device, on_cpu=4), programs)))
    rows = cdiv(cdiv(Lq, splits), 128) * 128
    return rows, cdiv(Lq, rows)


def _tma_reductions(device, row_elements):
    """Whether the atomic dQ tiles go by TMA reductions: sm90 (the architecture inspect checks;
    Triton's interpreter has no descriptor reductions: tests/triton_interpreter.py adds them to run
    this path on the CPU), with dQ's fp32 rows of row_elements
    (H * D) a multiple of 16 bytes, as TMA needs. The descriptor is built in the kernel,
    in 128 bytes of global scratch a program that Triton allocates through triton.set_allocator:
    set here when no allocator is (a ContextVar: the autograd thread that runs this needs its own).
    CCKERNELS_ATTENTION_TMA_DQ=0 keeps the per-element atomics (benchmarks/gpu_smoke.py sets
    it where the TMA path fails on a GPU)."""
    if (device.type != "cuda" or _capability(device)[0] != 9 or row_elements % 4
            or not env_flag("CCKERNELS_ATTENTION_TMA_DQ", True)):
        return False
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    return True


def deterministic_backward():
    """Whether the backward must give bit-identical gradients run to run: when
    torch.use_deterministic_algorithms(True) is on, else as env CCKERNELS_DETERMINISTIC says
    (1 or 0), else DETERMINISTIC_BY_DEFAULT."""
    return torch.are_deterministic_algorithms_enabled() or env_flag("CCKERNELS_DETERMINISTIC", DETERMINISTIC_BY_DEFAULT)


def _packed_gradients(q, k, v, need_dq, need_dkdv):
    """(dq, dk, dv) buffers, None for each the kernels allocate themselves: when q, k, v (or k,
    v) are views of one packed projection, views of one packed gradient (cckernels.packing)."""
    if need_dkdv and need_dq and is_packed((q, k, v)):
        return packed_empty((q, k, v))
    if need_dkdv and is_packed((k, v)):
        return None, *packed_empty((k, v))
    return None, None, None


def _backward(do, q, k, v, o, lse, scale, need_dq, need_dkdv, deterministic, pack=False):
    """dq, dk, dv (None where not needed); with pack, views of one packed gradient where q, k,
    v (or k, v) are views of one packed tensor. All three wanted:
    - keys in one block (Lk <= MAX_ONE_BLOCK_KEYS), fp16/bf16, and a config that fits
      (_one_kernel_backward_fits: sm90, not head dims > 64 at 65-128 keys): one kernel gives all three
      and delta, no atomics (each dQ row has one writer); it reads q, dO and O once where the
      three kernels below read q and dO twice and O once, and dO a third time;
    - else with deterministic False, one atomic pass gives all three.
    Otherwise one kernel each, no atomics. (fp32 keeps its small blocks: see FWD_FP32.)"""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    head = _head_args(q)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    buckets = _buckets(Lq, Lk)
    store_dq = (need_dq and need_dkdv and q.dtype != torch.float32 and Lk <= MAX_ONE_BLOCK_KEYS
                and _one_kernel_backward_fits(q.device, q.dtype, head["BLOCK_D"], _padded(Lk)))
    atomic_dq = need_dq and need_dkdv and not deterministic and not store_dq

    delta = None
    if not store_dq:
        delta = torch.empty_like(lse)
        _attn_bwd_delta_kernel[(cdiv(Lq, 64), B * H)](
            o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Lq,
            head["HEAD_DIM"], head["BLOCK_D"], head["MASK_D"], BLOCK_M=64,
        )

    dq = dk = dv = None
    dq_buf, dk_buf, dv_buf = _packed_gradients(q, k, v, need_dq, need_dkdv) if pack else (None, None, None)
    if need_dkdv:
        rows, splits = _dkdv_splits(Lq, Lk, B * H, q.device)
        packed = dk_buf is not None  # dk, dv: views of one packed gradient, dv's row after dk's
        if not packed:  # separate tensors: a custom op's outputs may not alias
            dk_buf = torch.empty((B, Lk, H, D), device=q.device, dtype=q.dtype)
            dv_buf = torch.empty_like(dk_buf)
        if splits == 1:  # written in place: dk and dv share strides
            dk_s, dv_s = dk_buf[None], dv_buf[None]
        else:  # fp32 partials, one per split, laid out as the gradients (dk_s and dv_s share strides)
            partial = torch.empty((splits, B, Lk, 2, H, D) if packed else (splits, 2, B, Lk, H, D),
                                  device=q.device, dtype=torch.float32)
            dk_s, dv_s = (partial[:, :, :, 0], partial[:, :, :, 1]) if packed else partial.unbind(1)
        if atomic_dq:
            dq_out = torch.zeros((B, Lq, H, D), device=q.device, dtype=torch.float32)
        elif store_dq:
            dq_out = dq_buf if dq_buf is not None else torch.empty((B, Lq, H, D), device=q.device, dtype=q.dtype)
        else:
            dq_out = None
        grid = lambda meta: (cdiv(Lk, meta["BLOCK_N"]), B * H, splits)  # noqa: E731
        _dkdv_launch[grid](
            q, k, v, do, o if store_dq else None, lse, delta, dk_s, dv_s, dq_out, *strides,
            *(o.stride()[:3] if store_dq else (0, 0, 0)), *dk_s.stride()[:4],
            *(dq_out.stride()[:3] if dq_out is not None else (0, 0, 0)),
            H, Lq, Lk, rows, scale, scale * LOG2E, *buckets, **head, ATOMIC_DQ=atomic_dq,
            TMA_DQ=atomic_dq and _tma_reductions(q.device, H * D), STORE_DQ=store_dq,
        )
        if splits > 1:  # the splits' sum in a fixed order, cast, stored into dk and dv
            if packed:  # one launch: a row of the packed gradient per (b, key) is dk's row then dv's
                rows_kv = dk_buf.as_strided((B * Lk, 2 * H * D), (dk_buf.stride(1), 1))
                column_sum(partial.view(splits, B * Lk, 2 * H * D), rows_kv)
            else:
                for part, grad in ((dk_s, dk_buf), (dv_s, dv_buf)):
                    column_sum(part.view(splits, -1), grad.view(-1))
        dk, dv = dk_buf, dv_buf
        if store_dq:
            dq = dq_out
    if atomic_dq:
        dq = dq_out if q.dtype == torch.float32 else torch.empty_like(dq_out, dtype=q.dtype)
        _attn_bwd_dq_convert_kernel[(cdiv(dq.numel(), 1024),)](dq_out, dq, dq.numel(), scale, BLOCK=1024)
        if dq_buf is not None:  # the conversion writes contiguous
            dq = dq_buf.copy_(dq)
    elif need_dq and not store_dq:
        dq = dq_buf if dq_buf is not None else torch.empty((B, Lq, H, D), device=q.device, dtype=q.dtype)
        grid = lambda meta: (cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
        _dq_launch[grid](
            q, k, v, do, lse, delta, dq, *strides, *dq.stride()[:3],
            H, Lq, Lk, scale, scale * LOG2E, *buckets, **head,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------
# autograd.Function and public function
# ----------------------------------------------------------------------------------------
class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = _forward(q, k, v, scale)
        _save_for_backward(ctx, (q, k, v, scale), (o, lse))
        return o

    @staticmethod
    @first_order_only("ck.attention")
    def backward(ctx, do):
        # gradients packed like packed inputs: eagerly only (a custom op's outputs may not alias)
        return _input_grads(functools.partial(_backward, pack=True), ctx, do)


def _save_for_backward(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale = scale


def _input_grads(backward, ctx, do):
    """Gradients of (q, k, v, scale) by `backward` (_backward, or its custom op). Eagerly this
    runs at backward time; under torch.compile when the backward graph is traced, so the
    deterministic_backward() choice is fixed in the compiled graph."""
    q, k, v, o, lse = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    do = do if do.stride(-1) == 1 and _batch_extent(do) < 2**31 else do.contiguous()
    dq, dk, dv = backward(do, q, k, v, o, lse, ctx.scale, need_q, need_k or need_v, deterministic_backward())
    return dq if need_q else None, dk if need_k else None, dv if need_v else None, None


# The same forward and backward as torch.library custom ops, which torch.compile keeps in its
# graph; `attention` below emits them while cckernels/tracing.py traces an op.
@torch.library.custom_op("cckernels::triton_attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): the output (B, Lq, H, D) and the fp32 row logsumexp (B, H, Lq), in log2 units."""
    with _on_device(q.device):
        return _forward(q, k, v, scale)


@attention_op.register_fake
def _(q, k, v, scale):
    B, Lq, H, D = q.shape
    return q.new_empty((B, Lq, H, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("cckernels::triton_attention_backward", mutates_args=())
def attention_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    scale: float, need_dq: bool, need_dkdv: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) by _backward; a gradient not asked for is an empty tensor (ops return no None)."""
    with _on_device(q.device):
        grads = _backward(do, q, k, v, o, lse, scale, need_dq, need_dkdv, deterministic)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@attention_backward_op.register_fake
def _(do, q, k, v, o, lse, scale, need_dq, need_dkdv, deterministic):
    dk, dv = (k.new_empty(k.shape, dtype=q.dtype) if need_dkdv else q.new_empty(0) for _ in range(2))
    return q.new_empty(q.shape) if need_dq else q.new_empty(0), dk, dv


def _attention_op_backward(ctx, do, _dlse):
    return _input_grads(attention_backward_op, ctx, do)


attention_op.register_autograd(_attention_op_backward, setup_context=_save_for_backward)


def _batch_extent(t):
    """Largest element offset inside one batch entry of a BLHD tensor: the kernels index within
    a batch entry in int32 (only the batch offset is int64)."""
    return sum((n - 1) * s for n, s in zip(t.shape[1:], t.stride()[1:]))


@functools.cache
def _capability(device):
    """A GPU's compute capability: asked once per device, not on every call."""
    return torch.cuda.get_device_capability(device)


def _check_supported(q, k, v):
    B, Lq, H, _ = q.shape
    if B * H > 65535:  # grid dimension y
        raise Unsupported(f"batch x heads = {B * H} > 65535")
    if max(B * Lq, B * k.shape[1]) * H * q.shape[-1] >= 2**31:  # int32 offsets in the kernels
        raise Unsupported(f"q {tuple(q.shape)} or k {tuple(k.shape)} has 2^31 or more elements")
    for name, t in (("q", q), ("k", k), ("v", v)):  # views of wider projections reach further
        if _batch_extent(t) >= 2**31:
            raise Unsupported(f"{name}'s strides {t.stride()} reach 2^31 or more elements within a batch entry")
    if q.dtype not in DTYPES:
        raise Unsupported(f"dtype {q.dtype} (triton attention takes float16, bfloat16, float32)")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise Unsupported(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    if q.device.type == "cuda":
        if _capability(q.device) < (8, 0):
            raise Unsupported(f"{torch.cuda.get_device_name(q.device)} is older than sm80")
    elif q.device.type == "cpu" and triton_interpreting():
        if q.dtype == torch.bfloat16 and not INTERPRETER_BF16_DOT:
            raise Unsupported("bfloat16 tl.dot is wrong in Triton's interpreter (triton-lang/triton#11584)")
    else:
        raise Unsupported(f"device {q.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)")


def attention(q, k, v, scale):
    """softmax(q k^T * scale) v for BLHD q (B, Lq, H, D) and k, v (B, Lk, H, D).

    The "triton" backend of `cckernels.attention`, which validates the arguments first.
    Last dims contiguous, other strides free. fp16/bf16/fp32, head dim <= 128, fewer than 2^31
    elements a tensor (and within one batch entry of a strided view), batch x heads <= 65535;
    anything else raises `Unsupported` before touching memory. Saves tensors for backward only
    when a gradient is needed.
    """
    _check_supported(q, k, v)
    if scale * LOG2E < FP32_TINY:  # 0 in the kernels' fp32 scale: -inf * 0 on masked keys
        raise Unsupported(f"scale {scale!r} is below float32's normal range")
    if emitting_custom_ops():
        return attention_op(q, k, v, scale)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _Attention.apply(q, k, v, scale)
    return _forward(q, k, v, scale)[0]


# ----------------------------------------------------------------------------------------
# Ahead-of-time inspection (python -m cckernels.inspect): what to compile for sm80/sm90 and
# what the machine code must show. Head dims: SD2's 64, and 80 (padded to 128, masked).
# ----------------------------------------------------------------------------------------
def _inspect_args(head_dim, dq=None, short_keys=False):
    """dq: None, "atomic", "atomic-tma" (its tiles by TMA reductions) or "store": the dK/dV
    kernel's dQ mode; short_keys: the forward of 77 keys, all in one block, taken as 64 + 16
    (_key_blocks; head dims up to 64)."""
    atomic = dq in ("atomic", "atomic-tma")

    def args(dtype):
        q = torch.empty(1, 1, 1, head_dim, dtype=dtype, device="meta")
        # "DQ" is the dQ kernel's output; the dK/dV kernel's is fp32 in its atomic mode
        return {
            "Q": "*T", "K": "*T", "V": "*T", "O": "*T", "DO": "*T", "DQ": "*fp32" if atomic else "*T",
            "DK": "*T", "DV": "*T", "LSE": "*fp32", "DELTA": "*fp32", "ATOMIC_DQ": atomic, "TMA_DQ": dq == "atomic-tma",
            "STORE_DQ": dq == "store", "stride_*": "i32:16", "scale": "fp32", "qk_scale": "fp32",
            "EVEN_M": True, "EVEN_N": not short_keys, "SHORT_KV": short_keys,
            "MAIN_N": 64 if short_keys else lambda a: a["BLOCK_N"], "TAIL_N": 16 if short_keys else 0, **_head_args(q),
        }  # fmt: skip
    return args


def _inspect_configs(footprint, fp32_shape, Lk=4096, short_kv_block=False):
    """The configs _prune keeps for Lq = 4096 queries and Lk keys on an arch (80, 90). With
    short_kv_block (the forward's one-block path) _prune widens them to one block of keys and
    one stage; the pool's configs of the same BLOCK_M and warps stand for them (that path's
    code depends on nothing else: its key blocks are MAIN_N / TAIL_N, it has no loop)."""
    def keep(configs, arch, dtype, args):
        from cckernels.inspect import SMEM_LIMIT

        q = torch.empty(0, dtype=dtype, device="meta")
        kept = _prune(configs, {"Q": q, "Lq": 4096, "Lk": Lk}, footprint, fp32_shape, short_kv_block=short_kv_block,
                      target=(arch, SMEM_LIMIT[arch]), BLOCK_D=args["BLOCK_D"], ATOMIC_DQ=args["ATOMIC_DQ"],
                      TMA_DQ=args["TMA_DQ"], STORE_DQ=args["STORE_DQ"])  # fmt: skip
        if not short_kv_block:
            return kept
        shapes = {(c.kwargs["BLOCK_M"], c.num_warps) for c in kept}
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.num_warps) in shapes]
    return keep


_TENSOR_CORES = {"sm80": {"hmma": True}, "sm90": {"hgmma": True}}
_INSPECT = {"op": "attention", "dtypes": DTYPES, "variants": {"d64": _inspect_args(64), "d80": _inspect_args(80)},
            "expect": lambda dtype: {} if dtype == torch.float32 else _TENSOR_CORES}  # fmt: skip
INSPECT = [
    {**_INSPECT, "kernel": _attn_fwd_kernel, "configs": _inspect_configs(_fwd_footprint, FWD_FP32)},
    # the short-key forward (77 keys: 64 + 16; head dims up to 64); 16-bit only (fp32's 16-key blocks loop)
    {**_INSPECT, "kernel": _attn_fwd_kernel, "configs": _inspect_configs(_fwd_footprint, FWD_FP32, 77, True),
     "dtypes": (torch.float16, torch.bfloat16),
     "variants": {"d64-77-keys": _inspect_args(64, short_keys=True)}},
    {**_INSPECT, "kernel": _attn_bwd_dkdv_kernel, "configs": _inspect_configs(_dkdv_footprint, DKDV_FP32)},
    {**_INSPECT, "kernel": _attn_bwd_dkdv_kernel, "configs": _inspect_configs(_dkdv_footprint, DKDV_FP32),
     "variants": {"d64-atomic-dq": _inspect_args(64, "atomic"), "d80-atomic-dq": _inspect_args(80, "atomic")}},
    # on sm90 the atomic dQ tiles go by TMA reductions: one UTMAREDG a tile, not an atomic an element
    {**_INSPECT, "kernel": _attn_bwd_dkdv_kernel, "configs": _inspect_configs(_dkdv_footprint, DKDV_FP32),
     "archs": (90,), "variants": {"d64-atomic-dq-tma": _inspect_args(64, "atomic-tma"),
                                  "d80-atomic-dq-tma": _inspect_args(80, "atomic-tma")},
     "expect": lambda dtype: {"sm90": {"tma_reduce": True, **({} if dtype == torch.float32 else {"hgmma": True})}}},
    # the short-key backward (cross-attention's 77 keys: one 128-key block); 16-bit only
    {**_INSPECT, "kernel": _attn_bwd_dkdv_kernel, "configs": _inspect_configs(_dkdv_footprint, DKDV_FP32, Lk=77),
     "dtypes": (torch.float16, torch.bfloat16),
     "variants": {"d64-store-dq": _inspect_args(64, "store"), "d80-store-dq": _inspect_args(80, "store")}},
    {**_INSPECT, "kernel": _attn_bwd_dq_kernel, "configs": _inspect_configs(_dq_footprint, DQ_FP32)},
    {**_INSPECT, "kernel": _attn_bwd_delta_kernel, "args": {"BLOCK_M": 64}, "expect": {}},
    {"op": "attention", "kernel": _attn_bwd_dq_convert_kernel, "dtypes": DTYPES,
     "args": {"DQ_ACC": "*fp32", "DQ": "*T", "n_elements": "i32:16", "scale": "fp32", "BLOCK": 1024},
     "expect": {"ldg128": True, "stg128": True}},
]
