"""Multi-tensor EMA update in Triton: ema[i] <- lerp(ema[i], params[i], 1 - decay).

One launch per parameter dtype walks every tensor of the list through the device tables
of cckernels.triton.multi_tensor (one program per CHUNK elements of one tensor). Bytes
moved: 4 (read ema) + 4 (write ema) + itemsize(param) per element.
"""
import torch
import triton
import triton.language as tl

from cckernels.backend import Unsupported
from cckernels.triton.multi_tensor import check_same_layout, lerp, load, store, tables, tensor_address

BLOCK = 1024
ITERS = 8
CHUNK = BLOCK * ITERS  # elements per program
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _ema_block(ema, param, offs, n, w, EVEN: tl.constexpr):
    store(ema, offs, lerp(load(ema, offs, n, EVEN), load(param, offs, n, EVEN), w), n, EVEN)


@triton.jit
def _ema_kernel(
    ema_ptrs,  # (T,) int64 addresses of the fp32 EMA tensors
    param_ptrs,  # (T,) int64 addresses of the PARAM_DTYPE parameters
    sizes,  # (T,) int64 numel of each tensor
    tensors,  # (programs,) int64 tensor index of each program
    chunks,  # (programs,) int64 chunk index of each program inside its tensor
    w,  # 1 - decay
    PARAM_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(tensors + pid)
    start = tl.load(chunks + pid) * (BLOCK * ITERS)
    n = tl.load(sizes + t)
    ema = tensor_address(ema_ptrs, t, ALIGNED).to(tl.pointer_type(tl.float32))
    param = tensor_address(param_ptrs, t, ALIGNED).to(tl.pointer_type(PARAM_DTYPE))
    if start + BLOCK * ITERS <= n:
        for i in tl.static_range(ITERS):
            _ema_block(ema, param, start + i * BLOCK + tl.arange(0, BLOCK), n, w, True)
    else:
        for i in tl.static_range(ITERS):
            _ema_block(ema, param, start + i * BLOCK + tl.arange(0, BLOCK), n, w, False)


def check_dtypes(name, ts):
    for i, t in enumerate(ts):
        if t.dtype not in TL_DTYPES:
            raise Unsupported(f"{name}[{i}] dtype {t.dtype}")


def ema_update_(ema, params, decay):
    """One launch per parameter dtype; ema fp32, params fp32/fp16/bf16, dense, same strides."""
    check_dtypes("params", params)
    check_same_layout("ema_update_", [ema, params])
    groups = {}
    for e, p in zip(ema, params):
        if p.numel():
            es, ps = groups.setdefault(p.dtype, ([], []))
            es.append(e)
            ps.append(p)
    for dtype, (es, ps) in groups.items():
        ptrs, sizes, tensors, chunks, aligned = tables([es, ps], CHUNK)
        _ema_kernel[(len(tensors),)](
            ptrs[0], ptrs[1], sizes, tensors, chunks, 1.0 - decay,
            PARAM_DTYPE=TL_DTYPES[dtype], ALIGNED=aligned, BLOCK=BLOCK, ITERS=ITERS,
        )  # fmt: skip
