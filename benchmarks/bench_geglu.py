"""GEGLU (h * gelu(gate), the feed-forward activation of SD2's transformer blocks) on SD2
training shapes: ck.geglu against PyTorch's gelu-then-multiply, eager and torch.compile'd.

    python benchmarks/bench_geglu.py [--out DIR] [--tiny] [--budget-s S]

Inputs are the (tokens, 2F) bf16 outputs of the feed-forward's projection: F = 4 x the block's
width, tokens = batch x latent positions (256 px at batch 32, 512 px at batch 8), and the
projection's bias, as the UNet runs them: ck.geglu adds the bias and returns its gradient;
PyTorch's code gets x with the bias already added (in the projection's GEMM) and its backward
ends with the sum of dx that torch's Linear computes for the bias gradient. Bytes moved, the
minimum: forward reads x and writes y, 3 * tokens * F * 2 bytes; forward + backward adds
reading dy and x and writing dx, 8 * tokens * F * 2 in all. GB/s and "of copy"
(of the device-to-device copy bandwidth measured here) come from the CUDA-graph time; the
eager and host times are there too (benchmarks/timers.py says what each one is).
--tiny (automatic without a GPU) runs one small shape on the CPU, wall-clock, as a smoke test.
"""
import torch

import cckernels as ck
from cckernels import reference
from cckernels.triton import geglu as triton_geglu
import token_ops
from token_ops import TOKENS, WIDTHS, Bench, time_modes


# ck's backward tilings, (TILE_ROWS, warps), each timed on its own: ck picks one by the number
# of programs (cckernels/triton/geglu.py, WIDE_TILE), from these rows of the fifth H200 run.
BACKWARD_TILINGS = [triton_geglu.WIDE_TILE, triton_geglu.NARROW_TILE]


def tiled_backward(tiling):
    """ck.geglu's Triton kernels with the backward's tiling fixed (x, bias -> y)."""

    class Tiled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, bias):
            ctx.save_for_backward(x, bias)
            return triton_geglu._forward(x, bias)

        @staticmethod
        def backward(ctx, dy):
            return triton_geglu._backward(dy, *ctx.saved_tensors, tiling)

    return Tiled.apply


def implementations(device, tiny):
    """name -> (fn(x, bias), whether fn takes the bias); PyTorch's takes x with the bias added."""
    impls = {"ck": (ck.geglu, True), "torch": (reference.geglu, False)}
    if not tiny:  # dynamic shapes: one compile per mode for all six shapes
        impls["torch-compile"] = (torch.compile(reference.geglu, dynamic=True), False)
        impls |= {f"ck bwd {t}/w{w}": (tiled_backward((t, w)), True) for t, w in BACKWARD_TILINGS}
    return impls


def measure(name, impl, label, tokens, F, device, on_gpu):
    fn, takes_bias = impl
    x = torch.randn(tokens, 2 * F, device=device, dtype=torch.bfloat16)
    bias = torch.randn(2 * F, device=device, dtype=torch.bfloat16)
    xg, bias_g = x.clone().requires_grad_(), bias.clone().requires_grad_()
    dy = torch.randn(tokens, F, device=device, dtype=torch.bfloat16)

    def forward():
        return fn(x, bias) if takes_bias else fn(x)

    def forward_backward():  # the gradients of x and of the bias
        if takes_bias:
            return torch.autograd.grad(fn(xg, bias_g), (xg, bias_g), dy)
        dx = torch.autograd.grad(fn(xg), xg, dy)[0]
        return dx, dx.sum(0)  # torch's Linear: the bias gradient from the whole dx

    runs = [("fwd", forward, 3 * tokens * F * 2), ("fwd+bwd", forward_backward, 8 * tokens * F * 2)]
    return time_modes(BENCH, name, label, tokens, F, runs, on_gpu)


# F = 4 x the block's width
BENCH = Bench(op="geglu", title="GEGLU", width="F", baseline="torch",
              shapes=[(label, tokens, 4 * width) for (label, tokens), width in zip(TOKENS, WIDTHS)],
              tiny_shapes=[("tiny", 64, 96)], implementations=implementations, measure=measure)


def main(argv=None):
    return token_ops.main(BENCH, __doc__, argv)


if __name__ == "__main__":
    main()
