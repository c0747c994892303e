"""Drop-in modules built on the cckernels ops."""
import torch

import cckernels


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

    def extra_repr(self):
        return super().extra_repr() + (f", activation={self.activation}" if self.activation else "")


class GroupNormSiLU(GroupNorm):
    """silu(group_norm(x)) in one fused kernel; state_dict-compatible with torch.nn.GroupNorm."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__(num_groups, num_channels, eps, affine, activation="silu", device=device, dtype=dtype)


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
