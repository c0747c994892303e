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


def group_norm(x, num_groups, weight, bias, eps, activation):
    raise Unsupported("no CUDA GroupNorm kernel in this build")


# Ahead-of-time inspection of csrc (python -m cckernels.inspect): per .cu file, what the SASS
# of its kernels (regex on the demangled name) must show. The vectorized instantiations
# (16-byte packs: 4 floats or 8 halves) must load 16 bytes at a time on sm90.
INSPECT = [
    {"op": "ema_update_", "source": "csrc/ema.cu", "expect": {r"EmaFunctor": {"sm90": {"ldg128": True}}}},
    {"op": "adamw_ema_", "source": "csrc/adamw_ema.cu", "expect": {r"AdamWEmaFunctor": {"sm90": {"ldg128": True}}}},
    {"op": "group_norm", "source": "csrc/group_norm.cu", "expect": {
        r"(channel_stats|normalize|backward_partials|backward_dx)_kernel<[\w ]+, (4|8)\b": {"sm90": {"ldg128": True}},
    }},
]  # fmt: skip
