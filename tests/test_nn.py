import pytest
import torch

import cckernels as ck


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_module_state_dict_compatible(affine):
    ref = torch.nn.GroupNorm(4, 12, eps=1e-6, affine=affine)
    if affine:
        torch.nn.init.normal_(ref.weight)
        torch.nn.init.normal_(ref.bias)
    ours = ck.nn.GroupNorm(4, 12, eps=1e-6, affine=affine)
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 12, 5, 5)
    torch.testing.assert_close(ours(x), ref(x))
    ref.load_state_dict(ours.state_dict())


def test_group_norm_module_silu():
    m = ck.nn.GroupNorm(2, 6, activation="silu")
    x = torch.randn(3, 6, 4)
    torch.testing.assert_close(m(x), torch.nn.functional.silu(torch.nn.functional.group_norm(x, 2, m.weight, m.bias)))
    with pytest.raises(ValueError, match="activation"):
        ck.nn.GroupNorm(2, 6, activation="relu")


def test_patch_module_replaces_every_group_norm():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
        torch.nn.Sequential(torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 2, 1)),
    )
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.normal_(m.weight)
    x = torch.randn(2, 3, 9, 9)
    want = model(x)
    assert ck.nn.patch_module(model) == 2
    assert sum(isinstance(m, ck.nn.GroupNorm) for m in model.modules()) == 2
    torch.testing.assert_close(model(x), want)
    assert ck.nn.patch_module(model) == 0  # already patched
