"""The CUDA backend: the compiled extension cckernels._C built from csrc/ by setup.py, else
the same csrc/ kernels compiled at run time with NVRTC through CuPy (cckernels.cupy_kernels),
so users without nvcc still get them. Both offer ema_update_ and adamw_ema_; the GroupNorm
kernels only come with _C (without it, group_norm falls back to Triton)."""
import functools
import importlib.util

import torch

from cckernels.backend import Unsupported
from cckernels.reference import channels_last

try:
    from cckernels import _C
except ImportError as e:  # built without CUDA, or not built at all
    _C = None
    _import_error = (
        f"cckernels._C failed to load: {e}"
        if importlib.util.find_spec("cckernels._C") is not None
        else "cckernels._C was not built (setup.py needs a CUDA build of torch and nvcc; see docs/building.md)"
    )
else:
    _import_error = None


@functools.cache
def _cupy_kernels():
    """The CuPy-compiled kernels, or the reason there are none (a str). Loaded on first use:
    importing CuPy and compiling takes seconds, and only matters without _C."""
    from cckernels import cupy_kernels

    return cupy_kernels.load()


def loaded():
    """The kernel module: cckernels._C, else the CuPy-compiled kernels, else None."""
    if _C is not None:
        return _C
    kernels = _cupy_kernels()
    return None if isinstance(kernels, str) else kernels


def build_info():
    if _C is not None:
        return {"_C": True, "cupy": False, "archs": list(_C.archs()), "cuda_version": _C.cuda_version()}
    kernels = _cupy_kernels()
    if isinstance(kernels, str):
        return {"_C": False, "cupy": False, "archs": [], "reason": f"{_import_error}; no CuPy fallback: {kernels}"}
    return {"_C": False, "cupy": True, "archs": kernels.archs(), "cuda_version": kernels.cuda_version(), "reason": _import_error}


def _same_dense_layout(a, b):
    """Both hold their elements in the same order with no gaps (what the kernel walks)."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(a.dim())
    return fmt is not None and a.is_contiguous(memory_format=fmt) and b.is_contiguous(memory_format=fmt)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtypes(params):
    for i, p in enumerate(params):
        if p.dtype not in KERNEL_DTYPES:
            raise Unsupported(f"params[{i}] dtype {p.dtype}")


def _check_layouts(name, params, *lists):
    for other in lists:
        for i, (t, p) in enumerate(zip(other, params)):
            if not _same_dense_layout(t, p):
                raise Unsupported(f"{name}: tensor {i} is not laid out as params[{i}] (both contiguous or channels_last)")


def ema_update_(ema, params, decay):
    """Params may mix dtypes: the kernels run one multi-tensor pass per dtype."""
    _check_dtypes(params)
    _check_layouts("ema_update_", params, ema)
    loaded().ema_update_(ema, params, decay)


def adamw_ema_(params, grads, exp_avgs, exp_avg_sqs, masters, emas, scalars):
    """FusedAdamWEMA's step (see cckernels.reference.adamw_ema_); masters, emas: lists or None."""
    _check_dtypes(params)
    if len({p.dtype for p in params}) != 1:  # FusedAdamWEMA steps one dtype at a time
        raise Unsupported("params of mixed dtypes")
    if any(g.dtype != params[0].dtype for g in grads):
        raise Unsupported("grads and params of different dtypes")
    _check_layouts("adamw_ema_", params, grads, exp_avgs, exp_avg_sqs, masters or [], emas or [])
    loaded().adamw_ema_(params, grads, exp_avgs, exp_avg_sqs, masters or [], emas or [], list(scalars))


# False: GroupNorm always runs the split forward (bench_group_norm compares it with the single pass).
SINGLE_PASS = True


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, activation):
        # The kernels read fp32 parameters; (C,) casts are negligible next to x.
        w = None if weight is None else weight.float().contiguous()
        b = None if bias is None else bias.float().contiguous()
        y, mean, rstd = _C.group_norm_forward(x, num_groups, w, b, eps, activation == "silu", SINGLE_PASS)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.silu = activation == "silu"
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b, mean, rstd = ctx.saved_tensors
        if dy.stride() != x.stride() or dy.dtype != x.dtype:
            dy = torch.empty_like(x).copy_(dy)
        need_dx, _, need_w, need_b = ctx.needs_input_grad[:4]
        dx, dw, db = _C.group_norm_backward(dy, x, w, b, mean, rstd, ctx.silu, need_dx, need_w, need_b)
        w_dtype, b_dtype = ctx.param_dtypes
        return dx, None, None if dw is None else dw.to(w_dtype), None if db is None else db.to(b_dtype), None, None


def group_norm_forward_path(x, num_groups):
    """Which forward runs for x (CUDA, channels_last): "single-pass" (a block stages whole groups
    in shared memory, so x is read once), "cluster-K" (the same with each group's positions
    staged by a cluster of K blocks, sm90) or "split" (three passes), as in csrc/group_norm.cuh."""
    channels, cluster = _C.group_norm_single_pass_plan(x, num_groups) if SINGLE_PASS else (0, 0)
    return "split" if not channels else "single-pass" if cluster == 1 else f"cluster-{cluster}"


def group_norm(x, num_groups, weight, bias, eps, activation):
    """Channels_last (NHWC, NDHWC, ...) GroupNorm + optional SiLU; NCHW is left to Triton."""
    if not hasattr(_C, "group_norm_forward"):
        raise Unsupported("this build of cckernels._C has no GroupNorm kernels")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Unsupported(f"dtype {x.dtype}")
    if not channels_last(x):  # what the CUDA GroupNorm kernels walk
        raise Unsupported(f"x with strides {x.stride()} is not channels_last")
    if x.numel() == 0 or x.shape[0] > 65535 or x.numel() // x.shape[0] >= 2**31:  # per sample, without a view x[0]
        raise Unsupported(f"shape {tuple(x.shape)}")
    return _GroupNormNHWC.apply(x, num_groups, weight, bias, eps, activation)


# Ahead-of-time inspection of csrc (python -m cckernels.inspect): per .cu file, what the SASS
# of its kernels (regex on the demangled name) must show. The vectorized instantiations
# (16-byte packs: 4 floats or 8 halves) must load 16 bytes at a time on sm90.
INSPECT = [
    {"op": "ema_update_", "source": "csrc/ema.cu", "expect": {r"EmaFunctor": {"sm90": {"ldg128": True}}}},
    {"op": "adamw_ema_", "source": "csrc/adamw_ema.cu", "expect": {r"AdamWEmaFunctor": {"sm90": {"ldg128": True}}}},
    {"op": "group_norm", "source": "csrc/group_norm.cu", "expect": {
        r"(channel_stats|normalize|single_pass|backward_partials|backward_dx)_kernel<[\w ]+, (4|8)\b": {"sm90": {"ldg128": True}},
    }},
]  # fmt: skip
