"""The CUDA backend: the compiled extension cckernels._C built from csrc/ by setup.py."""
import torch

from cckernels.backend import Unsupported

try:
    from cckernels import _C
except ImportError as e:  # built without CUDA, or not built at all
    _C = None
    _import_error = str(e)
else:
    _import_error = None


def loaded():
    """The loaded kernel module, or None."""
    return _C


def build_info():
    if _C is None:
        return {"_C": False, "archs": [], "reason": _import_error}
    return {"_C": True, "archs": list(_C.archs()), "cuda_version": _C.cuda_version()}


def ema_update_(ema, params, decay):
    if params[0].dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Unsupported(f"params dtype {params[0].dtype}")
    if len({p.dtype for p in params}) != 1:
        raise Unsupported("params of mixed dtypes")
    _C.ema_update_(ema, params, decay)


def group_norm(x, num_groups, weight, bias, eps, activation):
    raise Unsupported("no CUDA GroupNorm kernel in this build")
