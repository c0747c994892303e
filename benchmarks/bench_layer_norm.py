"""The pre-norm transformer's residual add and LayerNorm, s = x + residual then LayerNorm(s),
on SD2 training shapes: ck.layer_norm (both fused in one pass each way) against the ways
PyTorch runs them, eager under autocast, eager in bf16 and torch.compile'd.

    python benchmarks/bench_layer_norm.py [--out DIR] [--tiny] [--budget-s S]

Inputs as the UNet's transformer blocks have them: x and the residual (tokens, C) bf16, C =
320, 640, 1280 (the block's width), tokens = batch x latent positions (256 px at batch 32,
512 px at batch 8), weight and bias fp32 (an fp32 model under bf16 autocast). Each
implementation returns (LayerNorm(s), s); forward + backward gives the gradients of x, the
residual, the weight and the bias from dy (at the LayerNorm's output) and ds (arriving at the
sum, from the block's next residual add). Bytes moved, the minimum: forward reads x and the
residual and writes s and y, 4 * tokens * C * 2 bytes; forward + backward adds reading dy, s
and ds and writing dx (also the residual's gradient), 8 * tokens * C * 2 in all (the weights'
bytes are negligible). GB/s and "of copy" (of the device-to-device copy bandwidth measured
here) come from the CUDA-graph time; the eager and host times are there too
(benchmarks/timers.py says what each one is). "x torch-autocast" is the speed-up over plain
PyTorch's UNet code on the same shape and mode (in the graph time where both have one).
--tiny (automatic without a GPU) runs one small shape on the CPU, wall-clock, as a smoke test.
"""
import torch
import torch.nn.functional as F

import cckernels as ck
import token_ops
from token_ops import TOKENS, WIDTHS, Bench, time_modes

EPS = 1e-5  # nn.LayerNorm's default, which SD2's transformer blocks keep


def add_then_norm_bf16(x, residual, weight, bias):
    """torch-bf16: the fp32 parameters cast to x's bf16 (torch keeps fp32 statistics)."""
    s = x + residual
    return F.layer_norm(s, s.shape[-1:], weight.bfloat16(), bias.bfloat16(), EPS), s


def implementations(device, tiny):
    """name -> fn(x, residual, weight, bias) -> (LayerNorm(x + residual), x + residual)."""

    def ck_fused(x, residual, weight, bias):
        return ck.layer_norm(x, weight, bias, EPS, residual=residual, prenorm=True)

    def autocast(x, residual, weight, bias):  # plain PyTorch's UNet: layer_norm in fp32, fp32 out
        with torch.autocast(device.type, torch.bfloat16):  # on the CPU (--tiny) autocast keeps it bf16
            s = x + residual
            return F.layer_norm(s, s.shape[-1:], weight, bias, EPS), s

    impls = {"ck": ck_fused, "torch-autocast": autocast, "torch-bf16": add_then_norm_bf16}
    if not tiny:  # dynamic shapes: one compile per mode for all six shapes
        impls["torch-compile"] = torch.compile(add_then_norm_bf16, dynamic=True)
    return impls


def measure(name, fn, label, tokens, C, device, on_gpu):
    x, residual = (torch.randn(tokens, C, device=device, dtype=torch.bfloat16) for _ in range(2))
    weight = 1 + 0.1 * torch.randn(C, device=device)
    bias = 0.1 * torch.randn(C, device=device)
    inputs = (x, residual, weight, bias)
    leaves = tuple(t.clone().requires_grad_() for t in inputs)
    # dy in the output's dtype: fp32 for autocast's, whose next layer's cast sends it back in fp32.
    # Without grad: a graph kept alive here holds the leaves' AccumulateGrad nodes, made on the
    # default stream, and the backward captured on timers.capture's side stream then syncs with
    # that stream, which invalidates the capture (and leaves torch's CUDA generator in capture
    # mode: the next torch.randn raised, the first H200 run of this benchmark died so)
    with torch.no_grad():
        y, s = fn(*inputs)
    dy, ds = torch.randn_like(y), torch.randn_like(s)

    def forward_backward():  # autograd.grad: no .grad accumulation to time
        return torch.autograd.grad(fn(*leaves), leaves, (dy, ds))

    runs = [("fwd", lambda: fn(*inputs), 4 * tokens * C * 2), ("fwd+bwd", forward_backward, 8 * tokens * C * 2)]
    return time_modes(BENCH, name, label, tokens, C, runs, on_gpu)


BENCH = Bench(op="layer_norm", title="residual add + LayerNorm", width="C", baseline="torch-autocast",
              shapes=[(label, tokens, width) for (label, tokens), width in zip(TOKENS, WIDTHS)],
              tiny_shapes=[("tiny", 64, 96)], implementations=implementations, measure=measure)


def main(argv=None):
    return token_ops.main(BENCH, __doc__, argv)


if __name__ == "__main__":
    main()
