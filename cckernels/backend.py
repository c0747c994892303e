"""Backend discovery and selection shared by every op.

A backend implementation raises `Unsupported` *before touching any memory* when it cannot
take an input (dtype, head dim, device); the dispatcher then tries the next backend.
"""
import contextlib
import contextvars
import functools
import importlib
import logging
import numbers
import os
import warnings

import torch

log = logging.getLogger("cckernels")

BACKENDS = ("cuda", "triton", "torch")  # the valid names; each op has its own order below

# op -> backend -> "module:function", best first: dispatch tries an op's backends in this
# order. A module that is not installed (no compiled extension, no triton) makes that
# backend unavailable for the op. The order is measured, per op, on an H200 (torch 2.11,
# benchmarks/results/2026-11-26*-NVIDIA-H200): the Triton EMA beats the CUDA one (98-99% of
# copy bandwidth in 1 launch vs 77-83% in 37). GroupNorm stays CUDA first for what eager
# calls at small batches feel: its forward+backward took 0.14-0.35 ms against Triton's
# 0.46-0.75 ms on the SD2 channels_last shapes at batch 32, since Triton's 5-7 launches cost
# 450-880 us of host time per call (CUDA: 180-390 us) and eager steps at that batch are
# host-bound (GPU busy 50% of the step). Where host time does not count, Triton goes first
# (_first_choice below). GEGLU's order is by bytes moved, not yet timed: Triton's kernels
# move 3 tensors of the output's size forward and 5 backward, where torch's gelu and
# multiply move 5 and their backward about 13; LayerNorm's likewise (with the residual add
# fused: 8 tensors of its size against torch's 13), not yet timed.
IMPLEMENTATIONS = {
    "attention": {
        "triton": "cckernels.triton.attention:attention",
        "torch": "cckernels.reference:attention",
    },
    "group_norm": {
        "cuda": "cckernels.cuda:group_norm",
        "triton": "cckernels.triton.group_norm:group_norm",
        "torch": "cckernels.reference:group_norm",
    },
    "geglu": {
        "triton": "cckernels.triton.geglu:geglu",
        "torch": "cckernels.reference:geglu",
    },
    "layer_norm": {
        "triton": "cckernels.triton.layer_norm:layer_norm",
        "torch": "cckernels.reference:layer_norm",
    },
    "ema_update_": {
        "triton": "cckernels.triton.ema:ema_update_",
        "cuda": "cckernels.cuda:ema_update_",
        "torch": "cckernels.reference:ema_update_",
    },
}

# Fused optimizer steps (cckernels.optim): dispatched like the ops, but not public ops, so
# available_backends() leaves them out. Best first as above: FusedAdamWEMA on Triton is
# 1.27x (fp32) / 1.64x (bf16) as fast as AdamW(fused) + EMA, on CUDA 1.06x / 1.40x.
OPTIMIZER_STEPS = {
    "adamw_ema_": {
        "triton": "cckernels.triton.adamw_ema:adamw_ema_",
        "cuda": "cckernels.cuda:adamw_ema_",
        "torch": "cckernels.reference:adamw_ema_",
    },
}


# GroupNorm inputs of at least CCKERNELS_GROUP_NORM_TRITON_FROM elements take Triton before
# CUDA; unset, none do. It was 64M by default after the second H200 run, whose graph replays
# had Triton's forward+backward 1.2-1.7x faster than CUDA's at batch 32. The fourth run (same
# run, same device, current kernels) had CUDA's 1.48x and 1.59x faster at batch 256 on the
# 320-channel 32x32 and 640-channel 16x16 maps, the inputs that rule sent to Triton at the
# headline's batch 512, and the two about even over batch 32's shapes (Triton ahead on the
# 8x8 and 4x4 maps, CUDA on the larger). Kept for A/B runs of the whole step (docs/benchmarks.md).
_TRITON_FROM = os.environ.get("CCKERNELS_GROUP_NORM_TRITON_FROM")
if _TRITON_FROM and not _TRITON_FROM.isdigit():
    raise ValueError(f"CCKERNELS_GROUP_NORM_TRITON_FROM={_TRITON_FROM!r}: use a whole number of elements")
GROUP_NORM_TRITON_FIRST_ELEMENTS = int(_TRITON_FROM) if _TRITON_FROM else None
# GroupNorm's backend under prefer_gpu_time (CUDA-graph capture): Triton, from the second H200
# run's batch-32 graph replays (Triton 1.2-1.7x CUDA's forward+backward); the fifth run had the
# two about even there, the seventh CUDA 1.10x Triton's forward+backward at 256 px batch 32
# (geometric mean of graph times; 0.87-1.40x) and 1.08x at 512 px batch 8, not yet confirmed
# by the graphed training row. CCKERNELS_GROUP_NORM_GRAPH_BACKEND=cuda keeps the op's own order
# (CUDA first) under capture too: that row's A/B (docs/benchmarks.md).
GROUP_NORM_GRAPH_BACKENDS = ("triton", "cuda")
GROUP_NORM_GRAPH_BACKEND = os.environ.get("CCKERNELS_GROUP_NORM_GRAPH_BACKEND", "triton")
if GROUP_NORM_GRAPH_BACKEND not in GROUP_NORM_GRAPH_BACKENDS:
    raise ValueError(f"CCKERNELS_GROUP_NORM_GRAPH_BACKEND={GROUP_NORM_GRAPH_BACKEND!r}: "
                     f"expected one of {', '.join(GROUP_NORM_GRAPH_BACKENDS)}")
_prefer_gpu_time = contextvars.ContextVar("prefer_gpu_time", default=False)


def env_flag(name, default):
    """The on/off switch in environment variable `name`: 1 or 0, `default` when unset or empty;
    anything else raises, naming the variable and the values it takes."""
    value = os.environ.get(name)
    if value not in (None, "", "0", "1"):
        raise ValueError(f"{name}={value!r}: use 1 (on) or 0 (off)")
    return default if value in (None, "") else value == "1"


def check_number(name, value, low, high, *, low_open=False, high_open=False):
    """ValueError naming `name` unless value is a real number (numpy's too; not a bool) in the
    interval. NaN fails every interval; math.isfinite is not used, which dynamo cannot trace on
    a symbolic float (a scale passed into a compiled function)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (
        (low < value if low_open else low <= value) and (value < high if high_open else value <= high))
    if not ok:
        raise ValueError(f"{name} must be a number in {'(' if low_open else '['}{low}, {high}"
                         f"{')' if high_open else ']'}, got {value!r}")


@contextlib.contextmanager
def prefer_gpu_time():
    """Within the block (this thread), ops take the backend whose kernels take the least GPU
    time, whatever its host time: for CUDA graph capture and the warm-up before it (which must
    choose as the capture does: Triton loads a kernel at its first launch, which a stream under
    capture refuses), where the host's launch work is paid once, not at every replay."""
    token = _prefer_gpu_time.set(True)
    try:
        yield
    finally:
        _prefer_gpu_time.reset(token)


def gpu_time_preferred():
    """Whether this thread is inside prefer_gpu_time(): for a kernel's own plan (the Triton
    GroupNorm's forward path), as the dispatcher's choice of backend."""
    return _prefer_gpu_time.get()


def _group_norm_first(x, *args):
    if gpu_time_preferred():
        return GROUP_NORM_GRAPH_BACKEND
    large = GROUP_NORM_TRITON_FIRST_ELEMENTS is not None and x.numel() >= GROUP_NORM_TRITON_FIRST_ELEMENTS
    return "triton" if large else None


# op -> f(*the op's arguments) -> the backend to try first for them (None: the op's order).
_first_choice = {"group_norm": _group_norm_first}


class Unsupported(Exception):
    """Raised by a backend that cannot take an input; the dispatcher falls back."""


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the multi-tensor kernels read


# The multi-tensor checks below run on every optimizer step for the ~700 tensors of a UNet:
# they compare whole rows of attributes at once and loop in Python only to name a culprit.


def check_dtypes(name, ts):
    """Unsupported unless every tensor of the list `name` has one of KERNEL_DTYPES."""
    if not {t.dtype for t in ts} <= set(KERNEL_DTYPES):
        i, t = next((i, t) for i, t in enumerate(ts) if t.dtype not in KERNEL_DTYPES)
        raise Unsupported(f"{name}[{i}] dtype {t.dtype}")


def _dense(t):
    """Whether t's elements fill numel() consecutive slots from data_ptr() (any dense layout)."""
    return (
        t.is_contiguous()
        or t.is_contiguous(memory_format=torch.channels_last)
        or t.is_contiguous(memory_format=torch.channels_last_3d)
    )


def _layout(t):
    """t's shape and the strides of its dims longer than 1: the strides of length-1 dims place
    no element (a (64, 32, 1, 1) conv weight may have strides (32, 1, 1, 1) and its grad from a
    channels_last convolution (32, 1, 32, 32): the same memory order)."""
    return t.shape, tuple(s for n, s in zip(t.shape, t.stride()) if n != 1)


def check_same_layout(name, lists):
    """Unsupported unless, for each i, the i-th tensors of all `lists` (rows) are dense with one
    shape and one memory order (_layout): the multi-tensor kernels walk them as flat memory from
    data_ptr(), element k of one row with element k of the others."""
    shapes, strides = [t.shape for t in lists[0]], [t.stride() for t in lists[0]]
    same = all([t.shape for t in ts] == shapes and [t.stride() for t in ts] == strides for ts in lists[1:])
    if same and all(map(_dense, lists[0])):  # twins of a dense tensor are dense
        return
    for i, (first, *others) in enumerate(zip(*lists)):
        if not _dense(first) or any(t.shape != first.shape or (t.stride() != first.stride() and _layout(t) != _layout(first))
                                    for t in others):  # (_layout only where strides differ: host time)
            raise Unsupported(f"{name}: tensor {i} is not dense or its lists' shapes or memory orders differ")


_last_used = {}
_calls = {}  # op -> {backend: calls}
_reported = set()
# (op, device, TRITON_INTERPRET on CPU) -> [(backend, function)] usable there, best first.
# Whether a backend is usable only changes with that env var (triton on CPU), so dispatch
# looks the list up instead of importing and probing every backend on every call (tens of
# microseconds, which small host-bound calls feel). Tests that patch the probes replace it.
_usable_cache = {}


def _load(spec):
    module_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        log.debug("%s unavailable: %s", module_name, e)
        return None
    return getattr(module, fn_name, None)


def triton_interpreting():
    """Whether Triton runs kernels in its interpreter (on CPU tensors): TRITON_INTERPRET set to a
    value Triton reads as true (1, true, on, yes, y, any case)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


def triton_usable(device):
    if device.type == "cpu" and not triton_interpreting():
        return False
    if device.type not in ("cpu", "cuda"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_usable(device):
    if device.type != "cuda":
        return False
    from cckernels import cuda

    return cuda.loaded() is not None


def _table(op):
    return IMPLEMENTATIONS[op] if op in IMPLEMENTATIONS else OPTIMIZER_STEPS[op]


def _usable(op, backend, device):
    return _unusable_reason(op, backend, device) is None


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _usable_functions(op, device):
    key = (op, device, os.environ.get("TRITON_INTERPRET") if device.type == "cpu" else None)
    found = _usable_cache.get(key)
    if found is None:
        found = [(b, _load(spec)) for b, spec in _table(op).items() if _usable(op, b, device)]
        _usable_cache[key] = found
    return found


def available(op, device):
    """The backends usable for `op` on `device`, best first."""
    return [name for name, _ in _usable_functions(op, device)]


def _unusable_reason(op, backend, device):
    """Why `backend` cannot run `op` on `device`'s tensors, in words; None where it can."""
    if backend not in _table(op):
        return f"{op} has no {backend} backend"
    if device.type == "cuda" and backend != "torch" and not torch.cuda.is_available():  # a "cuda" without a GPU
        return "no CUDA GPU is available"
    if backend == "cuda" and not cuda_usable(device):
        if device.type != "cuda":
            return f"the cuda backend takes CUDA tensors, these are on {device.type}"
        from cckernels import cuda

        return cuda.build_info().get("reason") or "the CUDA kernels did not load"
    if backend == "triton" and not triton_usable(device):
        if device.type == "cpu" and not triton_interpreting():
            return "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing cckernels"
        return f"triton is not installed, or does not take {device.type} tensors"
    if _load(_table(op)[backend]) is None:
        return f"{_table(op)[backend]} could not be imported"
    return None


def _requested(backend):
    source = "" if backend else "CCKERNELS_BACKEND="
    backend = backend or os.environ.get("CCKERNELS_BACKEND") or None
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {source}{backend!r}; valid backends: {', '.join(BACKENDS)}")
    return backend


def dispatch(op, device, backend, *args):
    """Run `op` on the requested backend, else the best usable one, falling back in order."""
    requested = _requested(backend)
    order = _usable_functions(op, device)
    if requested is not None:
        names = [name for name, _ in order]
        if requested in names:
            order = order[names.index(requested):]
        else:
            why = _unusable_reason(op, requested, device)
            if backend:  # asked for in the call: said where it shows, once per reason
                if (op, requested, why) not in _reported:
                    warnings.warn(f"{op}: backend={requested!r} is not usable here ({why}); "
                                  f"running on {order[0][0]}", RuntimeWarning, stacklevel=3)
            _report(op, requested, why)
    elif op in _first_choice:
        first = _first_choice[op](*args)
        if first is not None and order[0][0] != first:
            order = sorted(order, key=lambda entry: entry[0] != first)  # stable: the rest keep their order
    for name, fn in order:
        try:
            with _on_device(device):
                out = fn(*args)
        except Unsupported as why:
            _report(op, name, str(why))
            continue
        _last_used[op] = name
        calls = _calls.setdefault(op, {})
        calls[name] = calls.get(name, 0) + 1
        return out
    raise RuntimeError(f"no backend could run {op}")  # unreachable: torch takes everything


_NO_DEVICE_SWITCH = contextlib.nullcontext()


def _on_device(device):
    """Triton launches on the current CUDA device, not the tensors': make it theirs."""
    return torch.cuda.device(device) if device.type == "cuda" else _NO_DEVICE_SWITCH


def first_order_only(op):
    """Decorates a kernel's autograd.Function.backward: the kernels' gradients are not
    differentiable, so a backward asked to build a graph (create_graph=True, as a gradient
    penalty does) raises. once_differentiable raised only when the incoming gradient itself
    required grad; otherwise the second-order terms through the saved inputs went missing."""

    def wrap(backward):
        @functools.wraps(backward)
        def first_order_backward(ctx, *grads):
            if torch.is_grad_enabled():  # autograd runs a backward with grad on only for create_graph=True
                raise RuntimeError(f"{op}: the fused kernels' gradients are not differentiable "
                                   f"(create_graph=True, e.g. a gradient penalty); use backend='torch' for that")
            return backward(ctx, *grads)

        return first_order_backward

    return wrap


def _report(op, backend, why):
    key = (op, backend, why)
    if key not in _reported:
        _reported.add(key)
        log.info("%s: backend %s skipped (%s), falling back", op, backend, why)


def last_used():
    return dict(_last_used)


def calls():
    """{op: {backend: calls}} since the process started (or since reset_calls())."""
    return {op: dict(counts) for op, counts in _calls.items()}


def reset_calls():
    _calls.clear()
