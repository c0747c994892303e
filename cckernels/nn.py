"""Drop-in modules built on the cckernels ops."""
import torch
import torch.nn.functional as F

import cckernels
from cckernels.packing import unpack


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm (same parameters and state_dict) with an optional fused SiLU."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, activation=None, device=None, dtype=None):
        if activation not in (None, "silu"):
            raise ValueError(f"activation must be None or 'silu', got {activation!r}")
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x, prenorm=False):
        """y, or (y, x) with prenorm: x for the block's skip connection (see cckernels.group_norm)."""
        return cckernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation,
                                    prenorm=prenorm)

    def _get_name(self):  # the repr's name: a printed model shows which GroupNorms are ours (patched ones too)
        return f"ck.{type(self).__name__}"

    def extra_repr(self):
        return super().extra_repr() + (f", activation={self.activation}" if self.activation else "")


class GroupNormSiLU(GroupNorm):
    """silu(group_norm(x)) in one fused kernel; state_dict-compatible with torch.nn.GroupNorm."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__(num_groups, num_channels, eps, affine, activation="silu", device=device, dtype=dtype)


class Attention(torch.nn.Module):
    """Multi-head attention over tokens (B, L, dim); keys and values from `context` (B, Lk,
    context_dim: cross-attention, e.g. the text) or x (self-attention). Parameters and
    state_dict as diffusers' Attention in SD-class UNets: to_q, to_k, to_v (no bias),
    to_out.0 (with bias); head dim = dim / heads.

    `attend(q, k, v)` on BLHD tensors is ck.attention; benchmarks may set another function of
    the same contract on an instance (a materializing baseline, PyTorch's SDPA).

    The projections that read the same tokens run as one GEMM on their weights concatenated at
    each call (the parameters keep diffusers' names): q, k and v of self-attention, k and v of
    the text. The attention then reads strided BLHD views of one (B, L, n * heads * head_dim)
    tensor (ck.unpack); x is read once, and the backward gives its gradient from one GEMM
    instead of three summed, from the one packed gradient ck.attention's kernels write (no
    stack of three). `fused = False` (benchmarks set it on an instance: the original
    latent-diffusion code) projects each separately."""

    fused = True

    def __init__(self, dim, heads, context_dim=None, dropout=0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_k = torch.nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = torch.nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.Dropout(dropout))

    def attend(self, q, k, v):
        return cckernels.attention(q, k, v)

    def project(self, tokens, *linears):
        """Each Linear of `linears` (no biases) applied to tokens (B, L, C), as BLHD views."""
        B, L, _ = tokens.shape
        if not self.fused or len(linears) == 1:
            return [linear(tokens).view(B, L, self.heads, -1) for linear in linears]
        weight = torch.cat([linear.weight for linear in linears])
        return unpack(F.linear(tokens, weight).view(B, L, len(linears), self.heads, -1))

    def forward(self, x, context=None):
        B, Lq, _ = x.shape
        if context is None:
            q, k, v = self.project(x, self.to_q, self.to_k, self.to_v)
        else:
            (q,), (k, v) = self.project(x, self.to_q), self.project(context, self.to_k, self.to_v)
        return self.to_out(self.attend(q, k, v).reshape(B, Lq, -1))


def patch_module(model):
    """Turn every torch.nn.GroupNorm in `model` (model itself included) into a GroupNorm, in
    place: the same module objects, so their parameters (and an optimizer's references to
    them), sharing between layers, hooks, requires_grad, dtype and training mode stay.
    Subclasses of torch.nn.GroupNorm, which may compute otherwise, are left. Returns how many."""
    replaced = 0
    for module in model.modules():  # each instance once, however often it is registered
        if type(module) is torch.nn.GroupNorm:
            module.__class__ = GroupNorm
            module.activation = None
            replaced += 1
    return replaced
