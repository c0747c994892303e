"""Fused AdamW step + EMA update in Triton, over whole tensor lists (FusedAdamWEMA's kernel).

Per element, in fp32, one read and one write of each buffer (w is the fp32 master weight
when the parameter is bf16/fp16, else the parameter itself):
    w  <- w * (1 - lr * weight_decay)                          decoupled weight decay
    m  <- lerp(m, g, 1 - beta1);  v <- v * beta2 + (1 - beta2) * g * g
    w  <- w - step_size * m / (sqrt(v) / bc2_sqrt + eps)        step_size = lr / (1 - beta1^t)
    ema <- lerp(ema, w, 1 - ema_decay)                          only when the EMA is on
    param <- w rounded to the parameter dtype                  only with master weights
The same operations in the same order as torch.optim.AdamW, so results agree to fp32 rounding.
Bytes per element: fp32 param 4*(1+1+2+2) + grad 4 (+ema 8) = 28 (36); bf16 param with
master: 2+2 (param, grad) + 4*(2+2+2) (master, m, v) (+8 ema) = 28 (36).
"""
import torch
import triton
import triton.language as tl

from cckernels.backend import KERNEL_DTYPES, Unsupported, check_dtypes, check_same_layout
from cckernels.triton.multi_tensor import (
    lerp, load, program_chunk, store, tables, tensor_ptr,
)  # fmt: skip

BLOCK = 1024
ITERS = 4
CHUNK = BLOCK * ITERS  # elements per program
# 8 warps: with 4, each thread holds 8 elements of 6 buffers and ptxas for sm90 spills at 255
# registers (sm80: 105); with 8 it needs about 60 (python -m cckernels.inspect --op adamw_ema_).
NUM_WARPS = 8


@triton.jit
def _adamw_ema_block(
    param, grad, exp_avg, exp_avg_sq, master, ema, offs, n,
    decay_factor, beta1_w, beta2, beta2_w, step_size, bc2_sqrt, eps, ema_w,
    HAS_MASTER: tl.constexpr, HAS_EMA: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    g = load(grad, offs, n, EVEN)
    w = load(master, offs, n, EVEN) * decay_factor
    m = lerp(load(exp_avg, offs, n, EVEN), g, beta1_w)
    v = load(exp_avg_sq, offs, n, EVEN) * beta2 + beta2_w * g * g
    if HAS_EMA:  # loaded with the others: after the stores below (which may alias it, for all the
        e = load(ema, offs, n, EVEN)  # compiler knows) it would cost a second memory round trip
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), bc2_sqrt) + eps  # IEEE sqrt/div, as torch
    w = w + (-step_size) * tl.math.div_rn(m, denom)
    store(exp_avg, offs, m, n, EVEN)
    store(exp_avg_sq, offs, v, n, EVEN)
    store(master, offs, w, n, EVEN)
    if HAS_MASTER:
        store(param, offs, w, n, EVEN)
    if HAS_EMA:
        store(ema, offs, lerp(e, w, ema_w), n, EVEN)


@triton.jit
def _adamw_ema_kernel(
    # Tensor t of each list is at base + offsets[row, t]; rows: param, grad (fp32/fp16/bf16),
    # exp_avg, exp_avg_sq, master, ema (fp32; master is param when not HAS_MASTER).
    param_base, grad_base, exp_avg_base, exp_avg_sq_base, master_base, ema_base,
    offsets,  # (6, T) int64, in elements
    T,  # number of tensors
    sizes,  # (T,) int64 numel of each tensor
    tensors,  # (programs,) int64 tensor index of each program
    chunks,  # (programs,) int64 chunk index of each program inside its tensor
    decay_factor,  # 1 - lr * weight_decay
    beta1_w,  # 1 - beta1
    beta2,
    beta2_w,  # 1 - beta2
    step_size,  # lr / (1 - beta1^step)
    bc2_sqrt,  # sqrt(1 - beta2^step)
    eps,
    ema_w,  # 1 - ema_decay
    HAS_MASTER: tl.constexpr,  # fp32 master weights separate from the params
    HAS_EMA: tl.constexpr,  # update the EMA tensors
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    t, start, n = program_chunk(tensors, chunks, sizes, BLOCK * ITERS)
    param = tensor_ptr(param_base, offsets, t, ALIGNED)
    grad = tensor_ptr(grad_base, offsets + T, t, ALIGNED)
    exp_avg = tensor_ptr(exp_avg_base, offsets + 2 * T, t, ALIGNED)
    exp_avg_sq = tensor_ptr(exp_avg_sq_base, offsets + 3 * T, t, ALIGNED)
    master = tensor_ptr(master_base, offsets + 4 * T, t, ALIGNED)
    ema = tensor_ptr(ema_base, offsets + 5 * T, t, ALIGNED)
    # tl.range, not unrolled: 60-62 registers, not 79-90 (triton 3.6), so 4 programs an SM, not 2-3.
    if start + BLOCK * ITERS <= n:
        for i in tl.range(ITERS):
            _adamw_ema_block(
                param, grad, exp_avg, exp_avg_sq, master, ema, start + i * BLOCK + tl.arange(0, BLOCK), n,
                decay_factor, beta1_w, beta2, beta2_w, step_size, bc2_sqrt, eps, ema_w, HAS_MASTER, HAS_EMA, True,
            )  # fmt: skip
    else:
        for i in tl.range(ITERS):
            _adamw_ema_block(
                param, grad, exp_avg, exp_avg_sq, master, ema, start + i * BLOCK + tl.arange(0, BLOCK), n,
                decay_factor, beta1_w, beta2, beta2_w, step_size, bc2_sqrt, eps, ema_w, HAS_MASTER, HAS_EMA, False,
            )  # fmt: skip


def adamw_ema_(params, grads, exp_avgs, exp_avg_sqs, masters, emas, scalars):
    """One launch for the lists (params/grads one dtype; masters, emas: fp32 lists or None).

    scalars: (decay_factor, beta1_w, beta2, beta2_w, step_size, bc2_sqrt, eps, ema_w).
    """
    assert masters is not None or params[0].dtype == torch.float32, "non-fp32 params need fp32 masters"
    check_dtypes("params", params)
    if len({p.dtype for p in params} | {g.dtype for g in grads}) != 1:
        raise Unsupported("params and grads of mixed dtypes")
    rows = [params, grads, exp_avgs, exp_avg_sqs, masters or params, emas or params]
    check_same_layout("adamw_ema_", rows)
    keep = [i for i, p in enumerate(params) if p.numel()]
    if not keep:
        return
    bases, offsets, sizes, tensors, chunks, aligned = tables([[row[i] for i in keep] for row in rows], CHUNK)
    _adamw_ema_kernel[(len(tensors),)](
        *bases, offsets, len(keep), sizes, tensors, chunks, *scalars,
        HAS_MASTER=masters is not None, HAS_EMA=emas is not None, ALIGNED=aligned, BLOCK=BLOCK, ITERS=ITERS,
        num_warps=NUM_WARPS,
    )  # fmt: skip


# Ahead-of-time inspection (python -m cckernels.inspect): fp16/bf16 params carry fp32 masters;
# the aligned full-chunk path must move 16 bytes per load on sm90.
def _inspect_args(dtype):
    return {
        "param_base": "*T", "grad_base": "*T", "*_base": "*fp32", "offsets": "*i64", "sizes": "*i64",
        "tensors": "*i64", "chunks": "*i64", "decay_factor": "fp32", "beta*": "fp32", "step_size": "fp32",
        "bc2_sqrt": "fp32", "eps": "fp32", "ema_w": "fp32",
        "HAS_MASTER": dtype != torch.float32, "HAS_EMA": True, "ALIGNED": True, "BLOCK": BLOCK, "ITERS": ITERS,
    }  # fmt: skip


INSPECT = [{
    "op": "adamw_ema_", "kernel": _adamw_ema_kernel, "dtypes": KERNEL_DTYPES,
    "args": _inspect_args, "options": {"num_warps": NUM_WARPS}, "expect": {"sm90": {"ldg128": True}},
}]  # fmt: skip
