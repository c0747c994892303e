"""How cckernels' ops enter torch.compile graphs: as torch.library custom ops, no graph break.

Under torch.compile, `ck.attention` and `ck.group_norm` validate their arguments as in eager
(dynamo traces that code) and then call `dispatch_traced`, which runs the eager `dispatch`
itself, natively in Python, on the fake tensors of the trace. So the backend is chosen by the
eager rules (backend= argument, env CCKERNELS_BACKEND, best usable; a backend's `Unsupported`
checks read only metadata, so they work on fake tensors and fall back the same way) once, when
the graph is traced, and `used_backends()` reports that choice. What lands in the graph:

  triton   torch.ops.cckernels.triton_attention / triton_group_norm (+ their backward ops)
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

Limit: compiled inside torch's DistributedDataParallel, dynamo's DDPOptimizer (which splits
the graph at gradient-bucket boundaries) fails on these ops ("cannot extract sympy expressions
from TreeSpec", torch 2.14, CPU gloo): set torch._dynamo.config.optimize_ddp = False, or wrap
the model in trainer.ddp's DistributedDataParallel, as the trainer does.

Mechanics: torch._dynamo.nonstrict_trace (torch 2.11 has it there only) runs `_traced` as plain
Python on fake tensors, both when dynamo builds its graph and when AOTAutograd traces it. Its
inputs may only be tensors, numbers or pytree containers of them, so None and str arguments
travel in the pytree context of `_Static`. An exception raised inside comes out as an obscure
dynamo error, so the ValueError checks (arguments, backend name) run before it, where dynamo
traces them.
"""
import contextlib
import logging

import torch
import torch.utils._pytree as pytree

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


class _Static:
    """The constants of an op call (op, backend, the None and str arguments, where the others
    go), held in the pytree context: nonstrict_trace refuses None and str leaves."""

    def __init__(self, values):
        self.values = values


pytree.register_pytree_node(_Static, lambda s: ([], s.values), lambda _, values: _Static(values))


_LEAVES = (torch.Tensor, int, float, torch.SymInt, torch.SymFloat)


def dispatch_traced(op, backend, *args):
    """`dispatch(op, device, backend, *args)` for a graph torch.compile is tracing."""
    _requested(backend)  # a bad backend name (argument or env) raises here, visibly
    # Tensors and numbers are pytree leaves (a number may be symbolic: the default attention
    # scale under dynamic shapes); None and str go into the context.
    where = tuple(i for i, a in enumerate(args) if isinstance(a, _LEAVES))
    others = tuple(None if i in where else a for i, a in enumerate(args))
    return _traced(tuple(args[i] for i in where), _Static((op, backend, others, where)))


@torch._dynamo.nonstrict_trace
def _traced(leaves, static):
    op, backend, others, where = static.values
    args = list(others)
    for i, a in zip(where, leaves):
        # A symbolic number is fixed here (a guard): the kernels take plain ones.
        args[i] = float(a) if isinstance(a, torch.SymFloat) else int(a) if isinstance(a, torch.SymInt) else a
    device = leaves[0].device
    with _custom_ops():
        out = dispatch(op, device, backend, *args)
    key = (op, last_used()[op], device.type, leaves[0].dtype)
    if key not in _logged:
        _logged.add(key)
        log.info("torch.compile: %s on %s %s traced with backend %s", op, device.type,
                 str(key[3]).removeprefix("torch."), key[1])
    return out
