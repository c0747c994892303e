"""cckernels: fused kernels for training Stable-Diffusion-2-class UNets.

    import cckernels as ck
    out = ck.attention(q, k, v)                       # BLHD, non-causal
    y = ck.group_norm(x, 32, w, b, activation="silu")  # fp32 statistics, keeps memory format
    y = ck.geglu(x, bias)                              # h * gelu(gate), h, gate = (x + bias).chunk(2, -1)
    y, s = ck.layer_norm(x, w, b, residual=r, prenorm=True)  # LayerNorm(x + r) and x + r, one pass
    q, k, v = ck.unpack(qkv)                           # BLHD views of a packed (B, L, 3, H, D) projection
    ck.ema_update_(ema, params, 0.9999)                # multi-tensor, in place

Every op has backends "cuda" (compiled csrc), "triton" and "torch" (cckernels.reference),
in its own best-first order (cckernels.backend.IMPLEMENTATIONS). The backend is the
`backend=` argument, else env CCKERNELS_BACKEND, else the best usable one for the tensors'
device; one that cannot take an input falls back to the next in that op's order.

Under torch.compile, attention, group_norm, geglu and layer_norm are traced into the graph (no graph break,
fullgraph=True works): the backend is chosen by the same rules when the graph is traced, the
"cuda" and "triton" kernels enter it as torch.library custom ops (torch.ops.cckernels.*), the
"torch" backend as its plain torch ops (cckernels/tracing.py). ema_update_ stays a graph break
that runs eagerly (it updates tensors in place outside any model's graph).
"""
import math
import numbers

import torch

from cckernels import nn  # noqa: F401  (ck.nn.GroupNorm)
from cckernels import tracing
from cckernels.backend import (BACKENDS, IMPLEMENTATIONS, Unsupported, available, calls, check_number, default_device, dispatch,
                               last_used, prefer_gpu_time)
from cckernels.optim import FusedAdamWEMA, clip_grad_norm_
from cckernels.packing import unpack

__all__ = [
    "attention",
    "group_norm",
    "geglu",
    "layer_norm",
    "unpack",
    "ema_update_",
    "FusedAdamWEMA",
    "clip_grad_norm_",
    "available_backends",
    "used_backends",
    "backend_calls",
    "prefer_gpu_time",
    "build_info",
    "Unsupported",
    "BACKENDS",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_float(name, t, index=None):
    """ValueError unless t is a float tensor, naming it `name` or `name[index]` (that string is
    only built to raise: ema_update_ checks every tensor of a model on every call)."""
    if isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES:
        return
    if index is not None:
        name = f"{name}[{index}]"
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of float32, float16, bfloat16, float64")


def _check_vector(name, t, n, x, which=""):
    """ValueError unless t (None passes) is a float (n,) tensor on x's device; `which` says what
    n is, in the message."""
    if t is None:
        return
    _check_float(name, t)
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},){which}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def attention(q, k, v, *, scale=None, backend=None):
    """Non-causal scaled dot-product attention softmax(q k^T * scale) v.

    q: (B, Lq, H, D); k, v: (B, Lk, H, D) ("BLHD", as flash-attn). Any strides with the last
    dim contiguous (a view of a (B, L, H*D) projection needs no copy; other tensors are
    copied). Lq, Lk >= 1 (an empty batch gives an empty output). scale defaults to 1/sqrt(D).
    fp32/fp16/bf16 in, same dtype out; under autocast fp32 inputs are cast to its dtype first, as
    autocast does for torch's scaled_dot_product_attention. Differentiable in q, k, v. Returns a
    (B, Lq, H, D) tensor.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, L, H, D), got shape {tuple(t.shape)}")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    (B, Lq, H, D), (Bk, Lk, Hk, Dk) = q.shape, k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if (Bk, Hk, Dk) != (B, H, D):
        raise ValueError(
            f"q (B={B}, H={H}, D={D}) and k (B={Bk}, H={Hk}, D={Dk}) disagree in batch, heads or head dim"
        )
    if min(Lq, Lk, H, D) < 1:
        raise ValueError(f"empty dimension in q {tuple(q.shape)} or k {tuple(k.shape)}")
    if B == 0:  # nothing for a kernel to launch (a loader's empty tail)
        backend = "torch"
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        check_number("scale", scale, 0, math.inf, low_open=True, high_open=True)
    device_type = q.device.type
    if q.dtype == torch.float32 and device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        q, k, v = (t.to(torch.get_autocast_dtype(device_type)) for t in (q, k, v))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if torch.compiler.is_compiling():
        return tracing.dispatch_traced("attention", backend, q, k, v, float(scale))
    return dispatch("attention", q.device, backend, q, k, v, float(scale))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None, prenorm=False, backend=None):
    """GroupNorm over (N, C, *spatial), optionally fused with SiLU.

    x contiguous or channels_last; the output keeps x's memory format and dtype.
    Statistics are fp32 whatever x's dtype. C must be divisible by num_groups.
    weight, bias: (C,) or None. Differentiable in x, weight, bias.

    prenorm=True returns (y, x), x for the block's skip connection (a pre-norm residual block:
    ResNet's, the spatial transformer's): backward, x's gradient from the skip is added to the
    GroupNorm's dx inside its kernel (Triton) instead of by autograd's add, as
    ck.layer_norm(prenorm=True) does.
    """
    _check_float("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if not isinstance(num_groups, numbers.Integral) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    num_groups = int(num_groups)  # numpy's too
    if C % num_groups:
        raise ValueError(f"num_channels {C} is not divisible by num_groups {num_groups}")
    _check_vector("weight", weight, C, x)
    _check_vector("bias", bias, C, x)
    check_number("eps", eps, 0, math.inf, high_open=True)  # 0 as torch allows
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if torch.compiler.is_compiling():
        return tracing.dispatch_traced("group_norm", backend, x, num_groups, weight, bias, float(eps), activation,
                                       bool(prenorm))
    return dispatch("group_norm", x.device, backend, x, num_groups, weight, bias, float(eps), activation, bool(prenorm))


def geglu(x, bias=None, *, backend=None):
    """GEGLU: h * gelu(gate) with (h, gate) = (x + bias).chunk(2, dim=-1) and the exact (erf)
    GELU, the feed-forward activation of SD2's transformer blocks. x: (..., 2F), any float
    dtype; bias: None or (2F,), the projection's bias, which the kernels add and whose gradient
    they return from their own pass over x (a Linear with its bias would sum the whole gradient
    of x again). Returns (..., F) in x's dtype. Differentiable in x and bias.
    """
    _check_float("x", x)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x's last dim must be even (h and gate halves), got shape {tuple(x.shape)}")
    _check_vector("bias", bias, x.shape[-1], x, " (x's last dim)")
    if torch.compiler.is_compiling():
        return tracing.dispatch_traced("geglu", backend, x, bias)
    return dispatch("geglu", x.device, backend, x, bias)


def layer_norm(x, weight=None, bias=None, eps=1e-5, *, residual=None, prenorm=False, backend=None):
    """LayerNorm over the last dim, statistics in fp32 whatever x's dtype; output in x's dtype.
    x: (..., C); weight, bias: None or (C,), any float dtype (an fp32 model's parameters under
    a bf16 x: their gradients come back fp32, summed in fp32).

    `residual` (x's shape and dtype) fuses the pre-norm transformer's residual add in: it
    normalizes s = x + residual, rounded to x's dtype as torch's add would. `prenorm=True`
    returns (LayerNorm(s), s), s the residual stream for the block's next add (x itself without
    a residual), as flash-attn's layer_norm_fn. Backward, the gradient arriving at s is added
    to x's and the residual's inside the kernel: one pass over x and residual each way instead
    of an add, a LayerNorm and autograd's add of their gradients. Differentiable in x,
    residual, weight, bias.
    """
    _check_float("x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last dim (normalized), got shape {tuple(x.shape)}")
    C = x.shape[-1]
    _check_vector("weight", weight, C, x, " (x's last dim)")
    _check_vector("bias", bias, C, x, " (x's last dim)")
    if residual is not None:
        _check_float("residual", residual)
        if (residual.shape, residual.dtype, residual.device) != (x.shape, x.dtype, x.device):
            raise ValueError(f"residual must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), got "
                             f"shape {tuple(residual.shape)}, {residual.dtype}, {residual.device}")
    check_number("eps", eps, 0, math.inf, high_open=True)  # 0 as torch allows
    if torch.compiler.is_compiling():
        return tracing.dispatch_traced("layer_norm", backend, x, weight, bias, float(eps), residual, bool(prenorm))
    return dispatch("layer_norm", x.device, backend, x, weight, bias, float(eps), residual, bool(prenorm))


def _float_twins_on_one_device(ema, params):
    """ema_update_'s checks on whole lists at once (it runs each step over a UNet's ~700
    tensors): fp32 ema, float params of the same shapes, one device. False sends the caller to
    its per-tensor loop, which names the first culprit."""
    try:
        return (
            {e.dtype for e in ema} == {torch.float32}
            and {p.dtype for p in params} <= set(FLOAT_DTYPES)
            and [e.shape for e in ema] == [p.shape for p in params]
            and len({t.device for t in ema} | {t.device for t in params}) == 1
        )
    except AttributeError:  # not tensors
        return False


@torch.compiler.disable
def ema_update_(ema, params, decay, *, backend=None):
    """ema[i] <- decay * ema[i] + (1 - decay) * params[i], in place, in few launches.

    ema: fp32 tensors; params: same-shape tensors of any float dtype, same device.
    """
    ema, params = list(ema), list(params)
    if len(ema) != len(params):
        raise ValueError(f"ema has {len(ema)} tensors but params has {len(params)}")
    check_number("decay", decay, 0, 1)
    if not ema:
        return
    if not _float_twins_on_one_device(ema, params):  # the per-tensor checks name the first culprit
        for i, (e, p) in enumerate(zip(ema, params)):
            _check_float("params", p, i)
            _check_float("ema", e, i)
            if e.dtype != torch.float32:
                raise ValueError(f"ema[{i}] has dtype {e.dtype}; the EMA shadow must be float32")
            if e.shape != p.shape:
                raise ValueError(f"ema[{i}] shape {tuple(e.shape)} != params[{i}] shape {tuple(p.shape)}")
            if not (e.device == p.device == ema[0].device):
                raise ValueError(f"ema[{i}] ({e.device}) and params[{i}] ({p.device}) must be on ema[0]'s device "
                                 f"({ema[0].device})")
    with torch.no_grad():
        dispatch("ema_update_", ema[0].device, backend, ema, params, float(decay))


def available_backends(device=None):
    """{op: [backends usable on `device`, best first in that op's order]} (default device:
    cuda if present)."""
    try:
        device = torch.device(device) if device is not None else default_device()
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e})") from None
    return {op: available(op, device) for op in IMPLEMENTATIONS}


def used_backends():
    """{op: backend} that ran each op's most recent call in this process; for a call inside a
    torch.compile graph, the backend chosen when that graph was traced."""
    return last_used()


def backend_calls():
    """{op: {backend: calls}} over this process: which backends ran each op, how often (an op
    can run on several, e.g. GroupNorm on CUDA for small inputs and on Triton for large ones)."""
    return calls()


def build_info():
    """Whether the compiled extension cckernels._C is present, and for which architectures."""
    from cckernels import cuda

    return cuda.build_info()
