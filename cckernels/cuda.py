"""The CUDA backend: the compiled extension cckernels._C built from csrc/ by setup.py, else
the same csrc/ kernels compiled at run time with NVRTC through CuPy (cckernels.cupy_kernels),
so users without nvcc still get them. Both offer ema_update_ and adamw_ema_; the GroupNorm
kernels only come with _C (without it, group_norm falls back to Triton)."""
import functools
import importlib.util

import torch

from cckernels.backend import Unsupported, check_dtypes, check_same_layout, env_flag
from cckernels.group_norm_autograd import GroupNormFunction, custom_ops
from cckernels.reference import channels_last
from cckernels.tracing import emitting_custom_ops

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


def ema_update_(ema, params, decay):
    """Params may mix dtypes: the kernels run one multi-tensor pass per dtype."""
    check_dtypes("params", params)
    check_same_layout("ema_update_", [params, ema])
    loaded().ema_update_(ema, params, decay)


def adamw_ema_(params, grads, exp_avgs, exp_avg_sqs, masters, emas, scalars):
    """FusedAdamWEMA's step (see cckernels.reference.adamw_ema_); masters, emas: lists or None."""
    check_dtypes("params", params)
    if len({p.dtype for p in params} | {g.dtype for g in grads}) != 1:  # FusedAdamWEMA steps one dtype at a time
        raise Unsupported("params and grads of mixed dtypes")
    check_same_layout("adamw_ema_", [params, grads, exp_avgs, exp_avg_sqs, *(row for row in (masters, emas) if row)])
    loaded().adamw_ema_(params, grads, exp_avgs, exp_avg_sqs, masters or [], emas or [], list(scalars))


# False: GroupNorm always runs the split forward and backward (bench_group_norm compares them
# with the single passes; CCKERNELS_GROUP_NORM_CUDA_SINGLE_PASS=0 sets it, as
# benchmarks/gpu_smoke.py does where the single passes fail on a GPU).
SINGLE_PASS = env_flag("CCKERNELS_GROUP_NORM_CUDA_SINGLE_PASS", True)


def _group_norm_forward(x, num_groups, weight, bias, eps, activation):
    """(y, mean, rstd); weight and bias fp32."""
    return tuple(_C.group_norm_forward(x, num_groups, weight, bias, eps, activation == "silu", SINGLE_PASS))


def _group_norm_backward(dy, x, weight, bias, mean, rstd, activation, need_dx, need_affine, dx_addend):
    """(dx (+ dx_addend), dweight, dbias), None where not needed; weight and bias fp32."""
    if dy.stride() != x.stride() or dy.dtype != x.dtype:  # the kernels walk dy as they walk x
        dy = torch.empty_like(x).copy_(dy)
    # The kernel adds dx_addend where it walks as x does (its 16-byte packs aligned as x's, or
    # both scalar); other layouts take a pass of their own, as autograd's add would.
    fused = (dx_addend is not None and need_dx and dx_addend.stride() == x.stride() and dx_addend.dtype == x.dtype
             and dx_addend.data_ptr() % 16 == x.data_ptr() % 16)
    dx, dw, db = _C.group_norm_backward(dy, x, weight, bias, mean, rstd, activation == "silu", need_dx,
                                        need_affine and weight is not None, need_affine and bias is not None,
                                        dx_addend if fused else None, SINGLE_PASS)
    if dx is not None and dx_addend is not None and not fused:
        dx.add_(dx_addend)
    return dx, dw, db


# cckernels::cuda_group_norm(_backward): the same launchers as custom ops, for torch.compile.
_group_norm_op = custom_ops("cuda_group_norm", _group_norm_forward, _group_norm_backward, device_types="cuda")


def _group_norm_path(x, num_groups, backward):
    channels, cluster = _C.group_norm_single_pass_plan(x, num_groups, backward) if SINGLE_PASS else (0, 0)
    return "split" if not channels else "single-pass" if cluster == 1 else f"cluster-{cluster}"


def group_norm_forward_path(x, num_groups):
    """Which forward runs for x (CUDA, channels_last): "single-pass" (a block stages whole groups
    in shared memory, so x is read once), "cluster-K" (the same with each group's positions
    staged by a cluster of K blocks, sm90) or "split" (three passes), as in csrc/group_norm.cuh."""
    return _group_norm_path(x, num_groups, False)


def group_norm_backward_path(x, num_groups):
    """Which backward computes x's gradient: as group_norm_forward_path, with x and dy staged
    together ("split": x and dy read twice each)."""
    return _group_norm_path(x, num_groups, True)


def group_norm(x, num_groups, weight, bias, eps, activation, prenorm):
    """Channels_last (NHWC, NDHWC, ...) GroupNorm + optional SiLU; NCHW is left to Triton."""
    if not hasattr(_C, "group_norm_forward"):
        raise Unsupported("this build of cckernels._C has no GroupNorm kernels")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Unsupported(f"dtype {x.dtype}")
    if not channels_last(x):  # what the CUDA GroupNorm kernels walk
        raise Unsupported(f"x with strides {x.stride()} is not channels_last")
    if x.numel() == 0 or x.shape[0] > 65535 or x.numel() // x.shape[0] >= 2**31:  # per sample, without a view x[0]
        raise Unsupported(f"shape {tuple(x.shape)}")
    # The kernels read fp32 parameters; (C,) casts are negligible next to x, and autograd
    # casts their gradients back.
    weight, bias = (None if t is None else t.float().contiguous() for t in (weight, bias))
    if emitting_custom_ops():
        y = _group_norm_op(x, num_groups, weight, bias, eps, activation)[0]
        return (y, x) if prenorm else y
    return GroupNormFunction.apply(x, num_groups, weight, bias, eps, activation, prenorm,
                                   (_group_norm_forward, _group_norm_backward))


# Ahead-of-time inspection of csrc (python -m cckernels.inspect): per .cu file, what the SASS
# of its kernels (regex on the demangled name) must show. The vectorized instantiations
# (16-byte packs: 4 floats or 8 halves) must load 16 bytes at a time on sm90.
INSPECT = [
    {"op": "ema_update_", "source": "csrc/ema.cu", "expect": {r"EmaFunctor": {"sm90": {"ldg128": True}}}},
    {"op": "adamw_ema_", "source": "csrc/adamw_ema.cu", "expect": {r"AdamWEmaFunctor": {"sm90": {"ldg128": True}}}},
    {"op": "group_norm", "source": "csrc/group_norm.cu", "expect": {
        r"(channel_stats|normalize|backward_partials|backward_dx)_kernel<[\w ]+, (4|8)\b": {"sm90": {"ldg128": True}},
        # and the single passes stage their tiles with cp.async, never through registers (the
        # backward's 16-byte loads: the skip gradient it adds to dx)
        r"\bsingle_pass_kernel<[\w ]+, (4|8)\b": {arch: {"ldgsts": True, "ldg128": False} for arch in ("sm80", "sm90")},
        r"backward_single_pass_kernel<[\w ]+, (4|8)\b": {arch: {"ldgsts": True} for arch in ("sm80", "sm90")},
    }},
]  # fmt: skip
