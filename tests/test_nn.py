import numpy as np
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
    assert repr(model).count("ck.GroupNorm(") == repr(model).count("GroupNorm(") == 2  # a printed model says which
    torch.testing.assert_close(model(x), want)
    assert ck.nn.patch_module(model) == 0  # already patched


def test_patch_module_keeps_the_modules_and_what_they_hold():
    # Patched in place: sharing, frozen and fp64 parameters, an optimizer's references, hooks
    # and eval mode stay; a root GroupNorm is patched; a subclass is left.
    class Subclass(torch.nn.GroupNorm):
        pass

    shared, frozen = torch.nn.GroupNorm(2, 4), torch.nn.GroupNorm(2, 4).double()
    frozen.weight.requires_grad_(False)
    model = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Sequential(shared, Subclass(2, 4)), "c": frozen}).eval()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    params = list(model.parameters())
    calls = []
    shared.register_forward_hook(lambda *args: calls.append(1))
    assert ck.nn.patch_module(model) == 2
    assert type(shared) is ck.nn.GroupNorm and model["a"] is model["b"][0] is shared and type(model["b"][1]) is Subclass
    assert list(model.parameters()) == params and opt.param_groups[0]["params"][0] is shared.weight
    assert not frozen.weight.requires_grad and frozen.weight.dtype == torch.float64 and not model.training
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(shared(x), torch.nn.functional.group_norm(x, 2, shared.weight, shared.bias))
    assert calls == [1] and shared.activation is None
    root = torch.nn.GroupNorm(2, 4)
    assert ck.nn.patch_module(root) == 1 and type(root) is ck.nn.GroupNorm


@pytest.mark.parametrize("context_dim", [None, 24])
def test_attention_module_matches_diffusers_attention(context_dim):
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    ours = ck.nn.Attention(64, 2, context_dim).eval()
    theirs = DiffusersAttention(64, cross_attention_dim=context_dim, heads=2, dim_head=32).eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 64)
    context = None if context_dim is None else torch.randn(3, 5, context_dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, context), theirs(x, encoder_hidden_states=context), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dim 64 is not divisible by heads 3"):
        ck.nn.Attention(64, 3)


def test_group_norm_with_eps_zero_as_torch():
    # torch.nn.GroupNorm takes eps=0: a patched model must keep working with it.
    model = torch.nn.Sequential(torch.nn.GroupNorm(2, 6, eps=0.0)).double()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    want = model(x)
    assert ck.nn.patch_module(model) == 1
    torch.testing.assert_close(model(x), want)
    torch.testing.assert_close(ck.group_norm(x, np.int64(2), eps=0.0), want)  # numpy's ints are ints
    torch.testing.assert_close(ck.layer_norm(x, eps=0.0), torch.nn.functional.layer_norm(x, (5,), eps=0.0))
