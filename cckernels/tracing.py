"""How cckernels' ops enter torch.compile graphs: as torch.library custom ops, no graph break.

Under torch.compile, `ck.attention`, `ck.group_norm`, `ck.geglu` and `ck.layer_norm` validate their arguments
as in eager (dynamo traces that code) and then call `dispatch_traced`, which runs the eager
`dispatch` itself, natively in Python, on the fake tensors of the trace. So the backend is chosen by the
eager rules (backend= argument, env CCKERNELS_BACKEND, best usable; a backend's `Unsupported`
checks read only metadata, so they work on fake tensors and fall back the same way) once, when
the graph is traced, and `used_backends()` reports that choice. What lands in the graph:

  triton   torch.ops.cckernels.triton_attention / triton_group_norm / triton_geglu / triton_layer_norm
           (+ backward ops)
  cuda     torch.ops.cckernels.cuda_group_norm (+ backward)
  torch    the plain torch ops of cckernels.reference, which inductor fuses like any others

While `dispatch_traced` runs, `emitting_custom_ops()` is true: each backend's entry function
then returns its custom op instead of calling its autograd.Function. The custom ops live next
to those Functions (cckernels/triton/attention.py; GroupNorm's triton and cuda backends share
theirs, cckernels/group_norm_autograd.py) because both wrap the same launchers and save the
same tensors: a reader compares them in one screen. Eager calls keep their autograd.Function
(custom-op dispatch costs tens of microseconds a call): they pay one
`torch.compiler.is_compiling()` test, and each backend one `emitting_custom_ops()` read.

Decided at trace time, not per call, without a guard (torch._dynamo.reset() or a new process
re-decides): which backends are installed and usable, the `Unsupported` fallbacks, the triton
attention's deterministic backward as CCKERNELS_DETERMINISTIC says. Guarded, so a change
recompiles: CCKERNELS_BACKEND (dynamo traces its read in `dispatch_traced`) and
torch.use_deterministic_algorithms (part of dynamo's global state). Graphs keep our custom
ops opaque: inductor fuses the elementwise ops around them, and mode="reduce-overhead" replays
them inside its CUDA graphs (every launch is on the current stream, no host sync).

Mechanics: `_traced` is marked torch._dynamo.allow_in_graph, so dynamo puts one call to it
into its graph without looking inside (its op, backend, None and str arguments stay constants
of that node, a symbolic number stays a graph input), and runs it on fake tensors. AOTAutograd
then traces into it, natively in Python: there the eager dispatch runs and our custom ops (or
the reference's torch ops) are what the graph records. With backend="eager" nothing traces into
it: the graph calls `_traced` on real tensors at every run, so the backend is chosen again per
call (through the custom ops), not once at trace time. An exception raised inside comes out as
an obscure dynamo error, so the ValueError checks (arguments, backend name) run before it,
where dynamo traces them.

Not torch._dynamo.nonstrict_trace, which did the same until torch's DistributedDataParallel
met it: nonstrict_trace keeps its input TreeSpec in a get_attr node, and when DDPOptimizer
(dynamo splitting a graph at gradient-bucket boundaries, on whenever a compiled model sits in
torch DDP) hands that node to a piece, torch.fx's split_module fails on it ("cannot extract
sympy expressions from TreeSpec", torch 2.11 and 2.14). tests/test_compile.py trains through
such a split graph on 2 gloo ranks.
"""
import contextlib
import logging

import torch

from cckernels.backend import _requested, dispatch, last_used

log = logging.getLogger("cckernels")

_emitting = False
_logged = set()


def emitting_custom_ops():
    """True while an op is traced for torch.compile: backends emit their custom op."""
    return _emitting


@contextlib.contextmanager
def _custom_ops():
    global _emitting
    _emitting = True
    try:
        yield
    finally:
        _emitting = False


def dispatch_traced(op, backend, *args):
    """`dispatch(op, device, backend, *args)` for a graph torch.compile is tracing."""
    _requested(backend)  # a bad backend name (argument or env) raises here, visibly
    return _traced(op, backend, *args)


@torch._dynamo.allow_in_graph
def _traced(op, backend, *args):
    # A symbolic number (the default attention scale under dynamic shapes) is fixed here with a
    # guard: the kernels take plain ones.
    args = [float(a) if isinstance(a, torch.SymFloat) else int(a) if isinstance(a, torch.SymInt) else a
            for a in args]
    device = args[0].device
    with _custom_ops():
        out = dispatch(op, device, backend, *args)
    key = (op, last_used()[op], device.type, args[0].dtype)
    if key not in _logged:
        _logged.add(key)
        log.info("torch.compile: %s on %s %s traced with backend %s", op, device.type,
                 str(key[3]).removeprefix("torch."), key[1])
    return out
