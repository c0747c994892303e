"""The CUDA backend: the compiled extension cckernels._C built from csrc/ by setup.py."""
import importlib.util

import torch

from cckernels.backend import Unsupported

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


def loaded():
    """The loaded kernel module, or None."""
    return _C


def build_info():
    if _C is None:
        return {"_C": False, "archs": [], "reason": _import_error}
    return {"_C": True, "archs": list(_C.archs()), "cuda_version": _C.cuda_version()}


def _same_dense_layout(a, b):
    """Both hold their elements in the same order with no gaps (what the kernel walks)."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(a.dim())
    return fmt is not None and a.is_contiguous(memory_format=fmt) and b.is_contiguous(memory_format=fmt)


def ema_update_(ema, params, decay):
    if params[0].dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Unsupported(f"params dtype {params[0].dtype}")
    if len({p.dtype for p in params}) != 1:
        raise Unsupported("params of mixed dtypes")
    for i, (e, p) in enumerate(zip(ema, params)):
        if not _same_dense_layout(e, p):
            raise Unsupported(f"ema[{i}] and params[{i}] are not both contiguous (or both channels_last)")
    _C.ema_update_(ema, params, decay)


def _channels_last(x):
    """(N, C, *spatial) with channels contiguous: what the CUDA GroupNorm kernels walk."""
    return x.permute(0, *range(2, x.dim()), 1).is_contiguous()


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, activation):
        # The kernels read fp32 parameters; (C,) casts are negligible next to x.
        w = None if weight is None else weight.float().contiguous()
        b = None if bias is None else bias.float().contiguous()
        y, mean, rstd = _C.group_norm_forward(x, num_groups, w, b, eps, activation == "silu")
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


def group_norm(x, num_groups, weight, bias, eps, activation):
    """Channels_last (NHWC, NDHWC, ...) GroupNorm + optional SiLU; NCHW is left to Triton."""
    if not hasattr(_C, "group_norm_forward"):
        raise Unsupported("this build of cckernels._C has no GroupNorm kernels")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Unsupported(f"dtype {x.dtype}")
    if not _channels_last(x):
        raise Unsupported(f"x with strides {x.stride()} is not channels_last")
    N, C = x.shape[:2]
    if x.numel() == 0 or N > 65535 or x[0].numel() >= 2**31:
        raise Unsupported(f"shape {tuple(x.shape)}")
    return _GroupNormNHWC.apply(x, num_groups, weight, bias, eps, activation)
