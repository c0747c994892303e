"""The UNet: shapes, memory formats, backends, diffusers equivalence and weight round trips."""
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

import cckernels as ck
from trainer.unet import LayerNorm, UNet, to_image, to_tokens

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# The tests comparing backends pick them themselves.
pytestmark = pytest.mark.usefixtures("torch_kernels")


def unet_config(name):
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]["unet"]


TINY = unet_config("tiny")
# Other diffusers options on small widths: SD1-style conv projections, per-block lists, two
# transformer layers, asymmetric downsample padding, centred input, sin/cos order and shift.
VARIANT = dict(
    TINY,
    block_out_channels=[16, 32, 48],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=[1, 2, 1],
    attention_head_dim=[1, 2, 4],
    cross_attention_dim=[24, 24, 24],
    transformer_layers_per_block=[2, 1, 1],
    use_linear_projection=False,
    downsample_padding=0,
    center_input_sample=True,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    mid_block_scale_factor=2.0,
    time_embedding_dim=40,
)


def inputs(cfg, batch=2, size=(8, 8), tokens=5, dtype=torch.float32, device="cpu"):
    cross = cfg["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, list) else cross
    x = torch.randn(batch, cfg["in_channels"], *size, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    context = torch.randn(batch, tokens, cross, device=device, dtype=dtype)
    return x, t, context


def randomize_(model):
    """Move every parameter off its init (GroupNorm/LayerNorm weights are ones, biases zeros) so a
    swapped or mis-mapped tensor shows up in the outputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_shapes_and_dtypes():
    unet = UNet.from_config(TINY)
    for size in [(8, 8), (5, 7)]:  # odd sides: the upsample matches the skip's size
        x, t, context = inputs(TINY, size=size)
        out = unet(x, t, context)
        assert out.shape == x.shape and out.dtype == torch.float32
    # timesteps as a number or a scalar tensor apply to the whole batch
    x, t, context = inputs(TINY, batch=3)
    torch.testing.assert_close(unet(x, 500, context), unet(x, torch.full((3,), 500), context))
    torch.testing.assert_close(unet(x, torch.tensor(500), context), unet(x, torch.full((3,), 500), context))
    bf16 = UNet.from_config(TINY).to(torch.bfloat16)
    out = bf16(*inputs(TINY, batch=1, dtype=torch.bfloat16))
    assert out.shape == (1, 4, 8, 8) and out.dtype == torch.bfloat16 and out.isfinite().all()


def test_channels_last_matches_contiguous():
    unet = randomize_(UNet.from_config(TINY))
    x, t, context = inputs(TINY, size=(6, 10))
    ref = unet(x, t, context)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad()

    unet.to(memory_format=torch.channels_last)
    not_channels_last = []

    def check(module, args, out):
        if torch.is_tensor(out) and out.dim() == 4 and not out.is_contiguous(memory_format=torch.channels_last):
            not_channels_last.append(type(module).__name__)

    hooks = [m.register_forward_hook(check) for m in unet.modules()]
    out = unet(x.contiguous(memory_format=torch.channels_last), t, context)
    for h in hooks:
        h.remove()
    assert not not_channels_last, f"activations fell out of channels_last in {not_channels_last}"
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    for p, g in zip(unet.parameters(), ref_grads):
        assert rel_err(p.grad, g) < 1e-4


def test_token_reshapes_are_views():
    x = torch.randn(2, 8, 3, 5).contiguous(memory_format=torch.channels_last)
    tokens = to_tokens(x)
    assert tokens.shape == (2, 15, 8) and tokens.data_ptr() == x.data_ptr() and tokens.is_contiguous()
    image = to_image(tokens, 3, 5)
    assert image.data_ptr() == x.data_ptr() and image.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(image, x, rtol=0, atol=0)


def test_fused_projections_match_separate_ones():
    from cckernels.nn import Attention

    unet = randomize_(UNet.from_config(TINY))
    x, t, context = inputs(TINY)
    attentions = [m for m in unet.modules() if isinstance(m, Attention)]
    seen = []  # (q, k, v) of each attention call: self-attention's are views of one projection
    for m in attentions:
        m.attend = lambda q, k, v: (seen.append((q, k, v)), ck.attention(q, k, v))[1]
    out = unet(x, t, context)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in unet.parameters()]
    assert len({q.untyped_storage().data_ptr() for q, k, v in seen[0::2] for q in (q, k, v)}) == len(seen) // 2
    assert all(k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr() for _, k, v in seen[1::2])
    unet.zero_grad()
    for m in attentions:
        m.fused = False
    torch.testing.assert_close(unet(x, t, context), out, rtol=1e-5, atol=1e-5)
    unet(x, t, context).square().sum().backward()
    for p, g in zip(unet.parameters(), grads):
        assert rel_err(p.grad, g) < 1e-5


def layer_norm_case(dtype=torch.bfloat16, rows=231, dim=40, device="cpu"):
    norm = randomize_(LayerNorm(dim)).to(device)
    x = torch.randn(rows, dim, dtype=dtype, device=device).requires_grad_()
    return norm, x


def test_layer_norm_is_torch_outside_autocast():
    norm, x = layer_norm_case(torch.float32)
    ref = torch.nn.LayerNorm(40)
    ref.load_state_dict(norm.state_dict())
    assert norm.state_dict().keys() == ref.state_dict().keys()
    y, s = norm(x)
    assert torch.equal(s, x)
    torch.testing.assert_close(y, ref(x))
    residual = torch.randn_like(x)
    y, s = norm(x, residual)
    torch.testing.assert_close(s, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(y, ref(x + residual))
    norm.fused = False  # the plain PyTorch code: the add, then torch's LayerNorm
    torch.testing.assert_close(norm(x, residual), (ref(x + residual), x + residual), rtol=0, atol=0)
    torch.testing.assert_close(norm(x), (ref(x), x), rtol=0, atol=0)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_layer_norm_runs_in_the_autocast_dtype(x_dtype):
    """Under autocast ck.layer_norm gets x and the residual in the autocast dtype and the fp32
    parameters as they are: bf16 out, fp32 parameter gradients, the same bits as a call on bf16
    inputs outside autocast."""
    norm, x = layer_norm_case(x_dtype)
    residual = torch.randn_like(x).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        y, s = norm(x, residual)
    assert y.dtype == s.dtype == torch.bfloat16
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    torch.autograd.backward((y, s), (dy, ds))
    assert norm.weight.grad.dtype == norm.bias.grad.dtype == torch.float32
    assert x.grad.dtype == residual.grad.dtype == x_dtype

    x16, r16 = (t.detach().bfloat16().requires_grad_() for t in (x, residual))
    w, b = (p.detach().clone().requires_grad_() for p in (norm.weight, norm.bias))
    y16, s16 = ck.layer_norm(x16, w, b, norm.eps, residual=r16, prenorm=True)
    torch.autograd.backward((y16, s16), (dy, ds))
    assert torch.equal(y, y16) and torch.equal(s, s16)
    assert torch.equal(x.grad, x16.grad.to(x_dtype)) and torch.equal(residual.grad, r16.grad.to(x_dtype))
    assert torch.equal(norm.weight.grad, w.grad) and torch.equal(norm.bias.grad, b.grad)


def test_layer_norm_compiles_without_graph_breaks_under_autocast():
    norm, x = layer_norm_case()
    compiled = torch.compile(norm, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", torch.bfloat16):
        torch.testing.assert_close(compiled(x), norm(x), rtol=0, atol=0)


@pytest.mark.gpu
def test_layer_norm_stays_bf16_under_cuda_autocast():
    """SD2's largest LayerNorm at 256 px: bf16 out, fp32 statistics and parameter-gradient sums
    inside ck.layer_norm's kernels, so output and gradients within bf16 rounding of fp64."""
    norm, x = layer_norm_case(rows=4 * 1024, dim=320, device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        assert torch.nn.LayerNorm(320).cuda()(x).dtype == torch.float32  # autocast's own policy
        out, _ = norm(x)
    assert out.dtype == torch.bfloat16
    dy = torch.randn_like(out)
    out.backward(dy)
    ref = torch.nn.LayerNorm(320, dtype=torch.float64, device="cuda")
    ref.load_state_dict(norm.state_dict())
    x64 = x.detach().double().requires_grad_()
    ref(x64).backward(dy.double())
    assert rel_err(out, ref(x64)) < 2**-7
    for got, want in ((x.grad, x64.grad), (norm.weight.grad, ref.weight.grad), (norm.bias.grad, ref.bias.grad)):
        assert rel_err(got, want) < 2**-6  # bf16 sums over the 4096 rows would be ~6% off


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_norms_take_the_skip_gradients_without_autograd_adds(backend, monkeypatch):
    """The mid block (resnet, transformer, resnet) backward on Triton's kernels: no add of
    activation-sized gradients (the GroupNorms' and LayerNorms' prenorm fuse them); the torch
    backend, as plain PyTorch, adds at every GroupNorm and LayerNorm input that a residual shares."""
    monkeypatch.setenv("CCKERNELS_BACKEND", backend)
    block = randomize_(UNet.from_config(TINY).mid_block)
    C = TINY["block_out_channels"][-1]
    h = torch.randn(2, C, 3, 3, requires_grad=True)
    out = block(h, torch.randn(2, 4 * TINY["block_out_channels"][0]), torch.randn(2, 5, TINY["cross_attention_dim"]))
    adds = []

    class ActivationAdds(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.add.Tensor and result.numel() >= h.numel():
                adds.append(tuple(result.shape))
            return result

    with ActivationAdds():
        out.square().mean().backward()
    # torch: at 2 resnets' norm1 and the transformer's GroupNorm inputs, and at the block's 3 LayerNorms'
    assert len(adds) == (0 if backend == "triton" else 6), adds


def test_gradient_checkpointing_gives_the_same_gradients():
    unet = randomize_(UNet.from_config(TINY))
    x, t, context = inputs(TINY)
    x.requires_grad_(True)
    calls, block = [], unet.mid_block.attentions[0]
    forward = block.forward
    block.forward = lambda *args: calls.append(1) or forward(*args)  # counts recomputations too
    grads = []
    for checkpointing in (False, True):
        unet.enable_gradient_checkpointing(checkpointing)
        unet.zero_grad()
        x.grad = None
        calls.clear()
        unet(x, t, context).square().mean().backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward
        grads.append([x.grad.clone()] + [p.grad.clone() for p in unet.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert UNet.from_config(TINY, gradient_checkpointing=True).mid_block.resnets[0].checkpointing


def _triton_ready():
    backends = ck.available_backends("cpu")
    return "triton" in backends["attention"] and "triton" in backends["group_norm"]


@pytest.mark.skipif(not _triton_ready(), reason="the Triton attention/group_norm kernels are not available")
def test_triton_backend_matches_torch(monkeypatch):
    unet = randomize_(UNet.from_config(TINY))
    x, t, context = inputs(TINY, size=(5, 7))
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("CCKERNELS_BACKEND", backend)
        unet.zero_grad()
        xb, cb = x.clone().requires_grad_(True), context.clone().requires_grad_(True)
        out = unet(xb, t, cb)
        out.square().mean().backward()
        used = ck.used_backends()
        assert (used["attention"], used["group_norm"]) == (backend, backend)
        results[backend] = [out, xb.grad, cb.grad] + [p.grad for p in unet.parameters()]
    for a, b in zip(results["triton"], results["torch"]):
        assert rel_err(a, b) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_kernels_match_torch_backend(dtype, monkeypatch):
    """SD2 widths (64-dim heads, 77 tokens of 1024) under autocast, channels_last: the best GPU
    backends are no further from an fp32 run than the torch backend in the same precision."""
    cfg = dict(unet_config("sd2-base"), block_out_channels=[128, 256], attention_head_dim=[2, 4], layers_per_block=1)
    cfg.update(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    unet = randomize_(UNet.from_config(cfg)).cuda().to(memory_format=torch.channels_last)
    x, t, context = inputs(cfg, size=(32, 32), tokens=77, device="cuda")

    def run(backend, precision):
        if backend:
            monkeypatch.setenv("CCKERNELS_BACKEND", backend)
        else:
            monkeypatch.delenv("CCKERNELS_BACKEND", raising=False)
        unet.zero_grad()
        with torch.autocast("cuda", dtype=precision, enabled=precision != torch.float32):
            out = unet(x, t, context)
        out.float().square().mean().backward()
        return [out.float()] + [p.grad.clone() for p in unet.parameters()]

    exact, torch_lp, kernels_lp = run("torch", torch.float32), run("torch", dtype), run(None, dtype)
    for i, (ref, a, b) in enumerate(zip(exact, torch_lp, kernels_lp)):
        slack = 2 if i == 0 else 3  # outputs 2x, gradients 3x the torch backend's error
        assert rel_err(b, ref) <= slack * rel_err(a, ref) + 1e-3


# --- diffusers compatibility (diffusers is a test-only dependency) ---


def diffusers_pair(cfg):
    diffusers = pytest.importorskip("diffusers")
    ref = randomize_(diffusers.UNet2DConditionModel(**cfg)).eval()
    ours = UNet.from_config(cfg).eval()
    ours.load_diffusers_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("cfg", [TINY, VARIANT], ids=["tiny", "variant"])
def test_matches_diffusers(cfg):
    ref, ours = diffusers_pair(cfg)
    for size in [(8, 8), (7, 9)]:
        x, t, context = inputs(cfg, size=size, tokens=7)
        with torch.no_grad():
            expected = ref(x, t, context).sample
            torch.testing.assert_close(ours(x, t, context), expected, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trips_through_diffusers():
    ref, ours = diffusers_pair(TINY)
    fresh = randomize_(UNet.from_config(TINY))
    ref.load_state_dict(fresh.diffusers_state_dict(), strict=True)
    x, t, context = inputs(TINY)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, context), ref(x, t, context).sample, rtol=1e-4, atol=1e-5)
    # a channels_last model exports the same tensors
    sd = fresh.diffusers_state_dict()
    exported = fresh.to(memory_format=torch.channels_last).diffusers_state_dict()
    assert all(torch.equal(sd[k], v) and v.is_contiguous() for k, v in exported.items())


def test_export_then_import_is_exact(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    unet = randomize_(UNet.from_config(VARIANT))
    unet.save_diffusers(tmp_path / "unet")
    back = UNet.from_diffusers(tmp_path / "unet")
    assert back.config == unet.config
    sd, sd_back = unet.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys() and all(torch.equal(sd[k], sd_back[k]) for k in sd)

    ref = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    x, t, context = inputs(VARIANT)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context), ref(x, t, context).sample, rtol=1e-4, atol=1e-5)


def test_save_diffusers_writes_given_weights_and_checks_their_names(tmp_path):
    # The trainer exports fp32 EMA weights / masters of a UNet that may hold bf16 ones.
    unet = UNet.from_config(TINY)
    weights = {k: torch.randn_like(v) for k, v in unet.state_dict().items()}
    unet.save_diffusers(tmp_path / "unet", weights)
    back = UNet.from_diffusers(tmp_path / "unet").state_dict()
    assert all(torch.equal(back[k], weights[k]) for k in weights)
    with pytest.raises(ValueError, match=r"1 missing \(e.g. \['conv_in.bias'\]\)"):
        unet.save_diffusers(tmp_path / "bad", {k: v for k, v in weights.items() if k != "conv_in.bias"})


def test_the_text_context_is_cast_to_the_autocast_dtype_once():
    """Autocast would cast the fp32 context at every cross-attention's k and v projection (32
    casts in SD2, 12 here); the UNet casts it once. Same outputs."""
    unet = UNet.from_config(TINY)
    x, t, context = inputs(TINY)
    casts = []

    class CastsOfContext(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0] is context:
                casts.append(kwargs.get("dtype"))
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", torch.bfloat16), CastsOfContext():
        out = unet(x, t, context)
    assert casts == [torch.bfloat16]
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(out, unet(x, t, context.bfloat16()))


@pytest.mark.parametrize("down_block", [0, 1], ids=["identity-skip", "conv-shortcut"])
def test_resnet_conv_biases_join_other_adds(down_block):
    """conv1's bias rides on the time embedding's (N, C) add, conv2's on the shortcut conv's
    bias: the same outputs and gradients as diffusers' order, and under autocast no
    activation in fp32."""
    block = randomize_(UNet.from_config(TINY).down_blocks[down_block].resnets[0])
    x = torch.randn(2, block.conv1.in_channels, 8, 8, requires_grad=True)
    temb = torch.randn(2, block.time_emb_proj.in_features)

    def plain(x):  # diffusers' order
        h = block.conv1(block.norm1(x)) + block.time_emb_proj(temb)[:, :, None, None]
        skip = x if block.conv_shortcut is None else block.conv_shortcut(x)
        return skip + block.conv2(block.norm2(h))

    ours = block(x, temb)
    grads = torch.autograd.grad(ours.square().sum(), [x, *block.parameters()])
    ref = plain(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *block.parameters()])
    assert rel_err(ours, ref) < 1e-6
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))
    dtypes = set()

    class ActivationDtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.convolution.default, torch.ops.aten.add.Tensor) and out.dim() == 4:
                dtypes.add(out.dtype)  # (the norms' torch reference computes in fp32: not ours to check)
            return out

    with torch.autocast("cpu", torch.bfloat16), ActivationDtypes():
        assert block(x.bfloat16(), temb).dtype == torch.bfloat16
    assert dtypes == {torch.bfloat16}


def test_bf16_weight_params_are_all_but_the_group_norms():
    unet = UNet.from_config(TINY)
    norms = {id(p) for m in unet.modules() if isinstance(m, torch.nn.GroupNorm) for p in m.parameters()}
    chosen = {id(p) for p in unet.bf16_weight_params()}
    assert norms and not norms & chosen
    assert norms | chosen == {id(p) for p in unet.parameters()}


def test_loads_diffusers_pipeline_folder_and_file(tmp_path):
    """A diffusers save (a pipeline's unet/ folder) loads by folder, pipeline folder or file."""
    ref, _ = diffusers_pair(TINY)
    ref.save_pretrained(tmp_path / "pipe" / "unet", safe_serialization=True)
    x, t, context = inputs(TINY)
    with torch.no_grad():
        expected = ref(x, t, context).sample
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "unet"):
        with torch.no_grad():
            torch.testing.assert_close(UNet.from_diffusers(path)(x, t, context), expected, rtol=1e-4, atol=1e-5)
    unet = UNet.from_config(TINY)
    unet.load_diffusers(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no UNet weights"):
        UNet.from_diffusers(tmp_path)


def test_strict_loading_names_the_mismatch():
    unet = UNet.from_config(TINY)
    sd = unet.diffusers_state_dict()
    with pytest.raises(ValueError, match="1 missing"):
        unet.load_diffusers_state_dict({k: v for k, v in sd.items() if k != "conv_in.weight"})
    with pytest.raises(ValueError, match="1 unexpected"):
        unet.load_diffusers_state_dict({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="wrong shape"):
        UNet.from_config(dict(TINY, cross_attention_dim=48)).load_diffusers_state_dict(sd)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"]), "CrossAttnDownBlock2D, DownBlock2D"),
        (dict(up_block_types=["UpBlock2D", "AttnUpBlock2D"]), "CrossAttnUpBlock2D, UpBlock2D"),
        (dict(up_block_types=["UpBlock2D"]), "up_block_types has 1 entries"),
        (dict(mid_block_type="UNetMidBlock2D"), "mid_block_type='UNetMidBlock2D' is not supported"),
        (dict(num_attention_heads=8), "num_attention_heads=8"),
        (dict(resnet_time_scale_shift="scale_shift"), "supported: 'default'"),
        (dict(act_fn="gelu"), "act_fn='gelu'"),
        (dict(attention_head_dim=[1, 3]), "64 is not divisible by its head count 3"),
        (dict(norm_num_groups=12), "32 is not divisible by norm_num_groups 12"),
        (dict(norm_num_groups=None), "norm_num_groups must be a positive int"),
        (dict(layers_per_block=[1, 2, 3]), "layers_per_block has 3 entries"),
        (dict(sample_sise=8), "unknown UNet config key"),
        (dict(block_out_channels=32), "block_out_channels must be a list of positive ints, one per block, got 32"),
        (dict(down_block_types="CrossAttnDownBlock2D"), "down_block_types must be a list of block names"),
    ],
)
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        UNet.from_config(dict(TINY, **change))
    with pytest.raises(ValueError, match=r"the UNet config \(model.unet\) must be a dict of diffusers config keys, got None"):
        UNet.from_config(None)


def test_input_errors():
    unet = UNet.from_config(TINY)
    x, t, context = inputs(TINY)
    with pytest.raises(ValueError, match="x must be"):
        unet(x[:, :3], t, context)
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        unet(x, t, context[:1])
    with pytest.raises(ValueError, match="timesteps must be"):
        unet(x, torch.arange(3), context)


def test_parameter_counts():
    diffusers = pytest.importorskip("diffusers")
    counts = {}
    for name in ("sd2-base", "tiny"):
        cfg = unet_config(name)
        with torch.device("meta"):
            ours = sum(p.numel() for p in UNet.from_config(cfg).parameters())
            theirs = sum(p.numel() for p in diffusers.UNet2DConditionModel(**cfg).parameters())
        assert ours == theirs
        counts[name] = ours
    assert counts == {"sd2-base": 865_910_724, "tiny": 1_106_212}  # as the YAML comments say


def test_tiny_overfits_one_batch():
    """Epsilon-MSE on one fixed batch with fixed noise falls at least 5x."""
    unet = UNet.from_config(TINY)
    x0, t, context = inputs(TINY)
    noise = torch.randn_like(x0)
    alpha_bar = torch.tensor([0.9, 0.3]).view(2, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        loss = (unet(x_t, t, context) - noise).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] * 5 <= losses[0], f"loss went from {losses[0]:.4f} to {losses[-1]:.4f}"
