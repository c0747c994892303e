"""Autograd glue shared by GroupNorm's triton and cuda backends, eager and under torch.compile.

Both backends have launchers with the same contract:
    forward(x, num_groups, weight, bias, eps, activation) -> (y, mean (N, G) fp32, rstd (N, G) fp32)
    backward(dy, x, weight, bias, mean, rstd, activation, need_dx, need_affine, dx_addend)
        -> (dx (+ dx_addend where given) or None, dweight fp32 or None, dbias fp32 or None)
Each is wrapped twice: `GroupNormFunction` for eager calls (no custom-op dispatch cost) and
torch.library custom ops that torch.compile keeps in its graph (`custom_ops` below; the
backend emits them while cckernels/tracing.py traces an op). Both wrappers save the same
tensors and turn the same results into gradients, with the functions here. This module
imports neither triton nor the compiled extension, so either backend works without the other.

With prenorm, the eager Function returns x too, for the block's skip connection: autograd then
hands x's gradient from the skip to its backward (dx_addend), which the launcher adds to dx
instead of autograd adding the two in a pass of its own. A custom op cannot return its input,
so under torch.compile x is returned beside the op and autograd adds (inductor fuses that).
"""
import torch

from cckernels.backend import _on_device, first_order_only


def save_for_backward(ctx, inputs, output):
    """What the backward needs of (x, num_groups, weight, bias, eps, activation) -> (y, mean, rstd);
    also the custom op's setup_context."""
    x, _, weight, bias, _, activation = inputs
    ctx.save_for_backward(x, weight, bias, *output[1:])
    ctx.activation = activation


def input_grads(backward, ctx, dy, dx_addend=None):
    """Gradients of (x, num_groups, weight, bias, eps, activation) by `backward`: a launcher, or
    its custom op (which gives empty tensors where the launcher gives None)."""
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need_dx, _, need_w, need_b = ctx.needs_input_grad[:4]
    dx, dw, db = backward(dy, x, weight, bias, mean, rstd, ctx.activation, need_dx, need_w or need_b, dx_addend)
    return (dx if need_dx else None, None, dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None, None, None)


class GroupNormFunction(torch.autograd.Function):
    """A backend's launchers (forward, backward) for eager calls: y, or (y, x) with prenorm."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, activation, prenorm, launchers):
        forward, ctx.backward = launchers
        y, mean, rstd = forward(x, num_groups, weight, bias, eps, activation)
        save_for_backward(ctx, (x, num_groups, weight, bias, eps, activation), (y, mean, rstd))
        return (y, x) if prenorm else y

    @staticmethod
    @first_order_only("ck.group_norm")
    def backward(ctx, dy, dx_addend=None):
        return *input_grads(ctx.backward, ctx, dy, dx_addend), None, None


def _wanted(weight, bias, need_dx, need_affine):
    """Which of (dx, dweight, dbias) the backward op returns."""
    return need_dx, need_affine and weight is not None, need_affine and bias is not None


def custom_ops(name, forward, backward, device_types=None):
    """Register cckernels::{name} (forward: y, mean, rstd) and cckernels::{name}_backward around
    a backend's launchers, with fake (shape-only) versions and autograd; returns the forward op."""

    @torch.library.custom_op(f"cckernels::{name}", mutates_args=(), device_types=device_types)
    def op(
        x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
        activation: str | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with _on_device(x.device):
            return tuple(forward(x, num_groups, weight, bias, eps, activation))

    @op.register_fake
    def _(x, num_groups, weight, bias, eps, activation):
        mean = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
        return torch.empty_like(x), mean, torch.empty_like(mean)  # y keeps x's strides

    @torch.library.custom_op(f"cckernels::{name}_backward", mutates_args=(), device_types=device_types)
    def backward_op(
        dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
        mean: torch.Tensor, rstd: torch.Tensor, activation: str | None, need_dx: bool, need_affine: bool,
        dx_addend: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with _on_device(x.device):
            grads = backward(dy, x, weight, bias, mean, rstd, activation, need_dx, need_affine, dx_addend)
        # An op returns no None: an empty tensor for each gradient not wanted (the launchers
        # may compute a dweight without weight; nothing reads it).
        wanted = _wanted(weight, bias, need_dx, need_affine)
        return tuple(g if want else x.new_empty(0) for g, want in zip(grads, wanted))

    @backward_op.register_fake
    def _(dy, x, weight, bias, mean, rstd, activation, need_dx, need_affine, dx_addend):
        want_dx, want_dw, want_db = _wanted(weight, bias, need_dx, need_affine)
        dw, db = (x.new_empty((x.shape[1],), dtype=torch.float32) if want else x.new_empty(0) for want in (want_dw, want_db))
        return torch.empty_like(x) if want_dx else x.new_empty(0), dw, db  # placeholders as the real op's

    op.register_autograd(lambda ctx, dy, _dmean, _drstd: input_grads(backward_op, ctx, dy),
                         setup_context=save_for_backward)
    return op
