"""Packed projections: q, k and v (or k and v) as the views of one (B, L, n, H, D) tensor.

A model that projects q, k and v with one GEMM (weights concatenated) gets one (B, L, n*H*D)
output; `unpack` gives ck.attention its n BLHD views, no copy. Backward, torch's unbind would
stack the n gradients into a new packed tensor (a copy of all of them); here, when they are
the views of one packed tensor already, that tensor is the gradient. The Triton attention's
backward writes its gradients that way when its inputs are packed views (as flash-attn's
qkvpacked functions return one packed gradient), so the copy goes away.
"""
import torch


def is_packed(views):
    """Whether the BLHD views are the n = len(views) slices, in order, of one contiguous
    (B, L, n, H, D) tensor."""
    first = views[0]
    B, L, H, D = first.shape
    n, hd = len(views), H * D
    strides = (L * n * hd, n * hd, D, 1)
    storage = first.untyped_storage().data_ptr()
    return all(
        t.shape == first.shape and t.dtype == first.dtype and t.stride() == strides
        and t.untyped_storage().data_ptr() == storage and t.storage_offset() == first.storage_offset() + i * hd
        for i, t in enumerate(views)
    )


def packed_empty(like):
    """n uninitialized BLHD tensors shaped like like[0], the views of one packed tensor."""
    B, L, H, D = like[0].shape
    return torch.empty((B, L, len(like), H, D), device=like[0].device, dtype=like[0].dtype).unbind(2)


class _Unpack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed):
        ctx.packed = packed.shape, packed.stride(), packed.dtype, packed.device
        return packed.unbind(2)

    @staticmethod
    def backward(ctx, *grads):
        shape, stride, dtype, device = ctx.packed
        if all(g is not None for g in grads) and is_packed(grads):
            return grads[0].as_strided(shape, stride, grads[0].storage_offset())
        view = (*shape[:2], *shape[3:])  # what unbind's backward does: zeros for a view without one
        return torch.stack([torch.zeros(view, dtype=dtype, device=device) if g is None else g for g in grads], dim=2)


def unpack(packed):
    """The n BLHD views (B, L, H, D) of a packed (B, L, n, H, D) projection, for ck.attention.
    Differentiable; see the module docstring for why not packed.unbind(2)."""
    if packed.dim() != 5:
        raise ValueError(f"packed must be 5-D (B, L, n, H, D), got shape {tuple(packed.shape)}")
    if torch.compiler.is_compiling() or not packed.is_contiguous():
        return packed.unbind(2)  # the compiled graph plans its own copies
    return _Unpack.apply(packed)
