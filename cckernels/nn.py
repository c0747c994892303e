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
    """Swap every torch.nn.GroupNorm in `model` for GroupNorm in place; returns how many."""
    replaced = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is torch.nn.GroupNorm:
                like = {"device": child.weight.device, "dtype": child.weight.dtype} if child.affine else {}
                new = GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine, **like)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new)
                replaced += 1
    return replaced
