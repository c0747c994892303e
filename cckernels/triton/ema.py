"""Multi-tensor EMA update in Triton: ema[i] <- lerp(ema[i], params[i], 1 - decay).

One launch per parameter dtype walks every tensor of the list through the device tables
of cckernels.triton.multi_tensor (one program per CHUNK elements of one tensor). Bytes
moved: 4 (read ema) + 4 (write ema) + itemsize(param) per element.
"""
import triton
import triton.language as tl

from cckernels.backend import KERNEL_DTYPES, check_dtypes, check_same_layout
from cckernels.reference import ema_pairs_by_dtype
from cckernels.triton.multi_tensor import (
    lerp, load, program_chunk, store, tables, tensor_ptr,
)  # fmt: skip

BLOCK = 1024
ITERS = 8
CHUNK = BLOCK * ITERS  # elements per program


@triton.jit
def _ema_block(ema, param, offs, n, w, EVEN: tl.constexpr):
    store(ema, offs, lerp(load(ema, offs, n, EVEN), load(param, offs, n, EVEN), w), n, EVEN)


@triton.jit
def _ema_kernel(
    ema_base,  # fp32 EMA tensors at ema_base + ema_offsets[t]
    param_base,  # params (fp32/fp16/bf16) at param_base + param_offsets[t]
    ema_offsets,  # (T,) int64
    param_offsets,  # (T,) int64
    sizes,  # (T,) int64 numel of each tensor
    tensors,  # (programs,) int64 tensor index of each program
    chunks,  # (programs,) int64 chunk index of each program inside its tensor
    w,  # 1 - decay
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    t, start, n = program_chunk(tensors, chunks, sizes, BLOCK * ITERS)
    ema = tensor_ptr(ema_base, ema_offsets, t, ALIGNED)
    param = tensor_ptr(param_base, param_offsets, t, ALIGNED)
    if start + BLOCK * ITERS <= n:
        for i in tl.static_range(ITERS):
            _ema_block(ema, param, start + i * BLOCK + tl.arange(0, BLOCK), n, w, True)
    else:
        for i in tl.static_range(ITERS):
            _ema_block(ema, param, start + i * BLOCK + tl.arange(0, BLOCK), n, w, False)


def ema_update_(ema, params, decay):
    """One launch per parameter dtype; ema fp32, params fp32/fp16/bf16, dense, same strides."""
    check_dtypes("params", params)
    check_same_layout("ema_update_", [ema, params])
    groups = ema_pairs_by_dtype(ema, params)
    # Every table first: `tables` may raise Unsupported, which must come before any launch
    # (the fallback backend then updates every tensor, this dtype's included).
    for bases, offsets, sizes, tensors, chunks, aligned in [tables([es, ps], CHUNK) for es, ps in groups.values()]:
        _ema_kernel[(len(tensors),)](
            *bases, offsets[0], offsets[1], sizes, tensors, chunks, 1.0 - decay,
            ALIGNED=aligned, BLOCK=BLOCK, ITERS=ITERS,
        )  # fmt: skip


# Ahead-of-time inspection (python -m cckernels.inspect): the aligned full-chunk path must
# move 16 bytes per load on sm90.
INSPECT = [{
    "op": "ema_update_", "kernel": _ema_kernel, "dtypes": KERNEL_DTYPES,
    "args": {"ema_base": "*fp32", "param_base": "*T", "*s": "*i64", "w": "fp32",
             "ALIGNED": True, "BLOCK": BLOCK, "ITERS": ITERS},
    "expect": {"sm90": {"ldg128": True}},
}]  # fmt: skip
