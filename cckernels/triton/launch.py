"""Host-side launch helpers: what the launchers call on every kernel launch, kept cheap. A
training step launches hundreds of kernels, and at small batches the host is the bottleneck.

triton.cdiv and triton.next_power_of_2 are constexpr functions (triton >= 3.4): each host call
unwraps its arguments and costs 4-7 us; these cost 0.1 us."""
import torch
from triton.runtime.autotuner import Heuristics


def cdiv(a, b):
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of 2 >= n (0 for 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def sm_count(device, on_cpu):
    """The SMs of a CUDA device; on the CPU (Triton's interpreter) the stand-in on_cpu, small, so
    that small test shapes take the paths a GPU takes when work is short of SMs."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else on_cpu


def row_view(t):
    """t as (rows, t.shape[-1]) with a row stride, for kernels that walk rows: a view when t's
    leading dims flatten into one stride, else a copy."""
    if t.dim() == 1:
        return t.view(1, t.shape[-1])
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:  # leading dims that do not flatten into one stride
        return t.contiguous().view(-1, t.shape[-1])


class Tuned:
    """Launches a @triton.autotune(@triton.heuristics(@triton.jit)) kernel with Triton's choice
    of meta-parameters remembered per call signature. Triton's Autotuner.run and
    Heuristics.run rebuild dicts of every argument on each launch (tens of us of host time for
    our 30-40 arguments); here the first launch of a signature goes through them (the search,
    the first time Triton sees its key), and later ones straight to the JIT function with the
    recorded config and heuristic values. The signature is every scalar argument and every
    tensor's dtype: all that Triton's autotuner key and our heuristics read."""

    def __init__(self, kernel):
        self.kernel = kernel
        inner = kernel.fn
        self.jit, self.rules = (inner.fn, inner.values) if isinstance(inner, Heuristics) else (inner, {})
        self.meta = {}  # signature -> meta-parameters
        self.last = None  # the meta-parameters of the latest launch (bench_attention reports them)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        signature = (tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args), *kwargs.items())
        meta = self.last = self.meta.get(signature)
        if meta is not None:
            return self.jit[grid](*args, **kwargs, **meta)
        out = self.kernel[grid](*args, **kwargs)
        meta = self.kernel.best_config.all_kwargs()
        named = dict(zip(self.jit.arg_names, args)) | kwargs | meta
        for name, rule in self.rules.items():  # in order, each seeing the ones before: as Heuristics.run
            named[name] = meta[name] = rule(named)
        self.meta[signature] = self.last = meta
        return out
