"""train.cuda_graphs: the UNet's forward and backward replayed as CUDA graphs.

An eager SD2 UNet step launches some 4,000 kernels; at micro-batch 32 on an H200 the host took
longer to launch them than the GPU to run them (GPU busy 32-65% in bench_train's third H200
run). torch.cuda.make_graphed_callables captures the module's forward and its backward once
and replays each with one launch: the rest of the step (noise, loss, the DDP all-reduces, the
optimizer) stays eager around it. Gradients arrive through the graph's one autograd node, so
parameter hooks (our DDP's) and AccumulateGrad work as before, but all at once when the
replayed backward ends: with several GPUs the all-reduces no longer overlap the backward.

What a graph fixes at capture, the caller must keep: the shapes and dtypes of the inputs (the
first training call's), the autocast state (with its weight cache off: make_graphed_callables
requires cache_enabled=False), the parameters' storage (in-place updates are fine: optimizers,
EMA swaps by copy, load_state_dict). The grads it hands out share memory with the graph's
static buffers, which the next backward overwrites: no gradient accumulation across micro-batches.
Gradient checkpointing (recomputation inside the captured backward) and torch.compile (whose
own CUDA-graph modes would nest) are untried: the trainer refuses them with graphs.

The warm-up and the capture run under ck.prefer_gpu_time(): each op takes the backend whose
kernels take the least GPU time (GroupNorm: Triton rather than CUDA, unless
CCKERNELS_GROUP_NORM_GRAPH_BACKEND=cuda), since a replay pays no host time per kernel.
"""
import contextlib
import inspect

import torch

import cckernels as ck


@contextlib.contextmanager
def _thread_local_capture():
    """Captures that only fail on this thread's unsafe CUDA calls, not on other threads' (the
    latents prefetch thread or DataLoader's pin thread allocating pinned memory mid-capture):
    make_graphed_callables takes capture_error_mode only in newer torch (2.14 has it, the GPU
    image's 2.11 not), so there torch.cuda.graph's default is swapped for the call."""
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
        yield {"capture_error_mode": "thread_local"}
        return
    default = torch.cuda.graph

    class ThreadLocalGraph(default):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{"capture_error_mode": "thread_local", **kwargs})

    torch.cuda.graph = ThreadLocalGraph
    try:
        yield {}
    finally:
        torch.cuda.graph = default


def graph_on_first_call(module):
    """Make `module` capture itself (torch.cuda.make_graphed_callables) on its first call that
    trains (training mode, grad enabled), with that call's arguments as the samples that fix
    shapes and dtypes; later training calls replay the graphs. Other calls (sampling under
    no_grad, eval mode) run the module eagerly."""
    eager = type(module).forward.__get__(module)
    graphed, signature = None, None

    def forward(*args):
        nonlocal graphed, signature
        if not (module.training and torch.is_grad_enabled()):
            return eager(*args)
        if graphed is None:
            signature = [(a.shape, a.dtype) for a in args]
            del module.forward  # the class's forward, for the warm-up and capture
            samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
            stream = torch.cuda.current_stream() if samples[0].is_cuda else None
            try:
                # host time is paid once: kernels by their GPU time (the warm-up chooses as the capture)
                with _thread_local_capture() as mode, ck.prefer_gpu_time():
                    torch.cuda.make_graphed_callables(module, samples, allow_unused_input=True, **mode)
            finally:
                if stream is not None:  # a failed capture can leave its side stream current
                    torch.cuda.set_stream(stream)
            graphed, module.forward = module.forward, forward
        if [(a.shape, a.dtype) for a in args] != signature:
            raise ValueError(f"the UNet's CUDA graphs were captured for inputs {signature}, "
                             f"got {[(a.shape, a.dtype) for a in args]}")
        return graphed(*args)

    module.forward = forward
    return module
