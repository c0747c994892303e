"""The Stable-Diffusion-2 UNet on cckernels ops, weight-compatible with diffusers.

    unet = UNet.from_config(cfg)            # cfg: diffusers UNet2DConditionModel config keys
    eps = unet(x, timesteps, text_emb)      # (B, out_channels, h, w)
    unet = UNet.from_diffusers("sd2-base")  # a pipeline folder, its unet/ folder, or a .safetensors
    unet.save_diffusers("out/unet")         # UNet2DConditionModel.from_pretrained("out/unet") loads it

Weight layout: every module and parameter has the name diffusers gives it
(`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight`, ...), so a diffusers
state dict maps to ours by the identity. The only difference is where diffusers has a GroupNorm
followed by a parameter-free SiLU: ours is one fused GroupNorm(activation="silu") module under
the GroupNorm's name, with the same weight and bias.

Kernels: every GroupNorm runs `ck.group_norm` (fused with SiLU where the model applies one;
with prenorm=True where its input also feeds the block's skip connection, so the backward
kernel adds the skip's gradient to its own), every attention `ck.attention` on (B, L, heads,
head_dim) views of its fused q/k/v projection, every feed-forward activation `ck.geglu` (with
its projection's bias) and every LayerNorm `ck.layer_norm`, in the autocast dtype instead of
autocast's fp32 and with the residual add before it fused in (`LayerNorm`), so the backend is
whatever cckernels picks (the `CCKERNELS_BACKEND` variable included).

channels_last: after `unet.to(memory_format=torch.channels_last)` every 4-D activation stays
channels_last, and the attention blocks turn (B, C, H, W) into (B, H*W, C) tokens and back as views.

Config keys mean what diffusers makes them mean, quirks included: `attention_head_dim` is the
number of heads per block (SD2: [5, 10, 20, 20], i.e. 64-dim heads), and `num_attention_heads`
must be None. Options that SD-class UNets do not use raise ValueError naming the supported values.
Attention always keeps its softmax statistics in fp32, so `upcast_attention` needs no extra work.
"""
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import cckernels as ck
from cckernels.nn import Attention
from cckernels import reference

DIFFUSERS_CLASS = "UNet2DConditionModel"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"

# Every UNet2DConditionModel config key with diffusers' default value (diffusers 0.42).
DIFFUSERS_DEFAULTS = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

# Keys for which only these values are implemented (the SD1/SD2 family uses nothing else).
# Other keys take any value diffusers accepts.
ONLY = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "act_fn": ("silu", "swish"),  # one function under two names in diffusers
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),  # diffusers itself rejects any other value
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


# Options diffusers takes as one value for every block or a list with one per block (per_block).
PER_BLOCK_KEYS = ("layers_per_block", "attention_head_dim", "cross_attention_dim", "transformer_layers_per_block")


def parse_config(cfg):
    """Check a diffusers UNet2DConditionModel config; returns it with every key filled in.

    Keys starting with "_" (diffusers' `_class_name`, `_diffusers_version`) are dropped.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"the UNet config (model.unet) must be a dict of diffusers config keys, got {cfg!r}")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    unknown = sorted(set(cfg) - set(DIFFUSERS_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown UNet config key(s) {', '.join(unknown)}; "
            f"valid keys (diffusers UNet2DConditionModel): {', '.join(DIFFUSERS_DEFAULTS)}"
        )
    full = {**DIFFUSERS_DEFAULTS, **cfg}
    for key, allowed in ONLY.items():
        if full[key] not in allowed:
            raise ValueError(
                f"UNet config {key}={full[key]!r} is not supported; supported: {', '.join(map(repr, allowed))}"
            )
    channels = full["block_out_channels"]
    if not (isinstance(channels, (list, tuple)) and channels and all(isinstance(c, int) and c >= 1 for c in channels)):
        raise ValueError(f"block_out_channels must be a list of positive ints, one per block, got {channels!r}")
    n = len(channels)
    for key, valid in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        if not isinstance(full[key], (list, tuple)):
            raise ValueError(f"{key} must be a list of block names, one per block, got {full[key]!r}")
        if len(full[key]) != n:
            raise ValueError(f"{key} has {len(full[key])} entries but block_out_channels has {n}")
        for name in full[key]:
            if name not in valid:
                raise ValueError(f"{key} entry {name!r} is not supported; supported: {', '.join(valid)}")
    for key in PER_BLOCK_KEYS:
        value = full[key]
        values = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise ValueError(f"{key} has {len(value)} entries but block_out_channels has {n}")
        if not all(isinstance(v, int) and v >= 1 for v in values):
            raise ValueError(f"{key} must be a positive int or a list of {n} of them, got {value!r}")
    groups = full["norm_num_groups"]
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"norm_num_groups must be a positive int (None is not supported), got {groups!r}")
    heads = per_block(full["attention_head_dim"], n)
    for ch, h in zip(full["block_out_channels"], heads):
        if ch % groups:
            raise ValueError(f"block_out_channels entry {ch} is not divisible by norm_num_groups {groups}")
        if ch % h:
            raise ValueError(f"block_out_channels entry {ch} is not divisible by its head count {h} (attention_head_dim)")
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if full[key] % 2 != 1:
            raise ValueError(f"{key} must be odd (same-size padding), got {full[key]!r}")
    return full


def config_differences(config, other):
    """[(key, other's value, config's)] where `other` (a UNet config as written: a run's
    model.unet or a diffusers config.json) sets the network otherwise than `config` (parsed)
    does; sample_size, only a default resolution, aside. Same shapes may hide these (another
    head count, another GroupNorm grouping), so loading weights does not find them."""
    try:
        other = parse_config({k: v for k, v in other.items() if k in DIFFUSERS_DEFAULTS})
    except ValueError:
        return []  # a UNet this code cannot build: loading its weights says what does not fit
    n = len(config["block_out_channels"])
    norm = lambda key, v: per_block(v, n) if key in PER_BLOCK_KEYS else v  # noqa: E731
    return [(k, other[k], config[k]) for k in config
            if k != "sample_size" and norm(k, other[k]) != norm(k, config[k])]


def per_block(value, n):
    """diffusers' per-block options: one value for every block, or a list with one per block."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def timestep_embedding(t, dim, flip_sin_to_cos, freq_shift, max_period=10000):
    """Sinusoidal (N,) -> (N, dim) fp32 embedding, diffusers' `get_timestep_embedding`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, dim % 2))


def run(layer, *args):
    """layer(*args); a layer with `checkpointing` set recomputes its activations in backward."""
    if layer.checkpointing and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm+SiLU -> conv -> + time -> GroupNorm+SiLU -> dropout -> conv, plus the skip."""

    checkpointing = False

    def __init__(self, in_ch, out_ch, temb_dim, groups, eps, dropout, output_scale_factor=1.0):
        super().__init__()
        self.norm1 = ck.nn.GroupNorm(groups, in_ch, eps, activation="silu")
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = ck.nn.GroupNorm(groups, out_ch, eps, activation="silu")
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x, temb_act):
        """temb_act: SiLU of the time embedding. Diffusers applies it in each resnet, to the same
        embedding: the UNet does it once (22 kernels fewer each way in SD2)."""
        h, x = self.norm1(x, prenorm=True)  # x again: the skip's gradient joins norm1's dx in its kernel
        # conv1's bias joins the time embedding's (N, C) add: cuDNN adds a conv's bias in a pass
        # of its own and sums its gradient over (N, H, W) in another, here the (N, C) sum serves.
        h = F.conv2d(h, self.conv1.weight, None, padding=self.conv1.padding)
        shift = self.time_emb_proj(temb_act) + self.conv1.bias
        h = h + shift.to(h.dtype)[:, :, None, None]  # autocast: the bf16 conv output stays bf16
        h = self.dropout(self.norm2(h))
        if self.conv_shortcut is None:
            out = x + self.conv2(h)  # x first: the sum takes x's memory format
        else:  # conv2's bias joins the shortcut's: one bias pass each way, not two
            skip = F.conv2d(x, self.conv_shortcut.weight, self.conv_shortcut.bias + self.conv2.bias)
            out = skip + F.conv2d(h, self.conv2.weight, None, padding=self.conv2.padding)
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class GEGLU(nn.Module):
    """h * gelu(gate) of one projection's two halves, fused: the projection's GEMM leaves out
    its bias, which ck.geglu adds and differentiates in its own kernels (torch's Linear would
    sum the whole gradient of the projection again for it). With `fused = False` (benchmarks
    set it on an instance) it runs the plain PyTorch code: the Linear with its bias, then
    cckernels.reference.geglu."""

    fused = True

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        if self.fused:
            return ck.geglu(F.linear(x, self.proj.weight), self.proj.bias)
        return reference.geglu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim, dropout, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


def autocast_dtype(device):
    """The autocast dtype on this device type, or None where autocast is off (always on meta,
    which has no autocast: FLOP counts)."""
    if device == "meta" or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state_dict) for a pre-norm block: `norm(x, residual)`
    returns (LayerNorm(s), s) with s = x + residual (x itself without one), the normalized
    tokens and the residual stream for the block's next add.

    It runs ck.layer_norm in the autocast dtype (CommonCanvas's low-precision LayerNorm; torch's
    autocast runs layer_norm in fp32: a copy of the bf16 input in fp32, the fp32 output cast back
    once per Linear that reads it, then the same for the gradients), with fp32 statistics, the
    parameters as they are (fp32 ones get fp32 gradients, summed in fp32), the residual add fused
    in, and the gradient of s added to x's in its backward kernel. `fused = False` (benchmarks
    set it on an instance) runs the plain PyTorch code: the add, then nn.LayerNorm, which
    autocast runs in fp32."""

    fused = True

    def forward(self, x, residual=None):
        if not self.fused:
            s = x if residual is None else x + residual
            return super().forward(s), s
        dtype = autocast_dtype(x.device.type)
        if dtype is not None:
            x, residual = x.to(dtype), None if residual is None else residual.to(dtype)
        return ck.layer_norm(x, self.weight, self.bias, self.eps, residual=residual, prenorm=True)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the text, GEGLU feed-forward; each
    residual add that a LayerNorm reads is fused into that LayerNorm."""

    def __init__(self, dim, heads, context_dim, dropout):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim, dropout)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, dropout)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def forward(self, x, context):
        h, x = self.norm1(x)
        h, x = self.norm2(self.attn1(h), x)  # x <- x + attn1(h), h <- norm2(x)
        h, x = self.norm3(self.attn2(h, context), x)
        return x + self.ff(h)


def to_tokens(x):
    """(B, C, H, W) -> (B, H*W, C); a view (no copy) when x is channels_last."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C)


def to_image(t, H, W):
    """(B, H*W, C) -> (B, C, H, W), a channels_last view of contiguous tokens."""
    B, _, C = t.shape
    return t.view(B, H, W, C).permute(0, 3, 1, 2)


class Transformer2D(nn.Module):
    """GroupNorm -> project in -> transformer blocks on H*W tokens -> project out, plus the input.

    Projections are Linear on tokens (use_linear_projection, SD2) or 1x1 convs on the image (SD1).
    """

    checkpointing = False

    def __init__(self, channels, heads, context_dim, groups, num_layers, linear_projection, dropout):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = ck.nn.GroupNorm(groups, channels, eps=1e-6)  # diffusers fixes eps here
        proj = nn.Linear if linear_projection else lambda i, o: nn.Conv2d(i, o, 1)
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, context_dim, dropout) for _ in range(num_layers)
        )
        self.proj_out = proj(channels, channels)

    def forward(self, x, context):
        H, W = x.shape[-2:]
        h, x = self.norm(x, prenorm=True)  # x again, for the final add: its gradient joins the norm's dx
        if self.linear_projection:
            h = self.proj_in(to_tokens(h))
        else:
            h = to_tokens(self.proj_in(h))
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_projection:
            h = to_image(self.proj_out(h), H, W)
        else:
            h = self.proj_out(to_image(h, H, W))
        return x + h  # x first: the sum takes x's memory format


class Downsample(nn.Module):
    def __init__(self, channels, padding):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:  # diffusers pads right and bottom only in this case
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def _attentions(attn, channels, n):
    """n Transformer2D layers of width `channels`, or None for a block without attention."""
    if attn is None:
        return None
    return nn.ModuleList(Transformer2D(channels, **attn) for _ in range(n))


class DownBlock(nn.Module):
    """diffusers' CrossAttnDownBlock2D (attn given) or DownBlock2D (attn None): resnets, each
    followed by its Transformer2D, then an optional stride-2 conv. Returns every output as a skip."""

    def __init__(self, in_ch, out_ch, num_layers, resnet, attn, downsample_padding, add_downsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, **resnet) for i in range(num_layers))
        self.attentions = _attentions(attn, out_ch, num_layers)
        self.downsamplers = nn.ModuleList([Downsample(out_ch, downsample_padding)]) if add_downsample else None

    def forward(self, h, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = run(resnet, h, temb)
            if self.attentions is not None:
                h = run(self.attentions[i], h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2DCrossAttn: resnet, Transformer2D, resnet."""

    def __init__(self, channels, resnet, attn):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, **resnet) for _ in range(2))
        self.attentions = _attentions(attn, channels, 1)

    def forward(self, h, temb, context):
        h = run(self.resnets[0], h, temb)
        h = run(self.attentions[0], h, context)
        return run(self.resnets[1], h, temb)


class UpBlock(nn.Module):
    """diffusers' CrossAttnUpBlock2D (attn given) or UpBlock2D (attn None): each resnet takes the
    running features concatenated with the newest skip; then an optional 2x nearest upsample+conv."""

    def __init__(self, in_ch, prev_ch, out_ch, num_layers, resnet, attn, add_upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock((prev_ch if i == 0 else out_ch) + (in_ch if i == num_layers - 1 else out_ch), out_ch, **resnet)
            for i in range(num_layers)
        )
        self.attentions = _attentions(attn, out_ch, num_layers)
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if add_upsample else None

    def forward(self, h, skips, temb, context):
        """Pops this block's skips off the end of `skips`."""
        for i, resnet in enumerate(self.resnets):
            h = run(resnet, torch.cat([h, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                h = run(self.attentions[i], h, context)
        if self.upsamplers is not None:
            # Upsample to the next skip's size: 2x, or one less where an odd size was halved.
            h = self.upsamplers[0](h, skips[-1].shape[-2:])
        return h


class UNet(nn.Module):
    """diffusers' UNet2DConditionModel for SD1/SD2-class configs, on cckernels ops."""

    def __init__(self, config, *, gradient_checkpointing=False):
        super().__init__()
        self.config = cfg = parse_config(config)
        n = len(cfg["block_out_channels"])
        channels = list(cfg["block_out_channels"])
        layers = per_block(cfg["layers_per_block"], n)
        heads = per_block(cfg["attention_head_dim"], n)  # the quirk: "head dim" is the head count
        context_dims = per_block(cfg["cross_attention_dim"], n)
        depths = per_block(cfg["transformer_layers_per_block"], n)
        groups, eps, dropout = cfg["norm_num_groups"], cfg["norm_eps"], cfg["dropout"]
        temb_dim = cfg["time_embedding_dim"] or 4 * channels[0]

        def resnet(scale=1.0):
            return dict(temb_dim=temb_dim, groups=groups, eps=eps, dropout=dropout, output_scale_factor=scale)

        def attn(block_type, i):
            if not block_type.startswith("CrossAttn"):
                return None
            return dict(
                heads=heads[i],
                context_dim=context_dims[i],
                groups=groups,
                num_layers=depths[i],
                linear_projection=cfg["use_linear_projection"],
                dropout=dropout,
            )

        self.sample_size = cfg["sample_size"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], cfg["conv_in_kernel"], padding=cfg["conv_in_kernel"] // 2)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg["down_block_types"]):
            self.down_blocks.append(
                DownBlock(
                    in_ch=channels[max(i - 1, 0)],
                    out_ch=channels[i],
                    num_layers=layers[i],
                    resnet=resnet(),
                    attn=attn(kind, i),
                    downsample_padding=cfg["downsample_padding"],
                    add_downsample=i < n - 1,
                )
            )
        self.mid_block = MidBlock(channels[-1], resnet(cfg["mid_block_scale_factor"]), attn("CrossAttn", n - 1))
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg["up_block_types"]):
            j = n - 1 - i  # the down block at this resolution, whose options this block takes
            self.up_blocks.append(
                UpBlock(
                    in_ch=channels[max(j - 1, 0)],  # width of the last skip it takes
                    prev_ch=channels[min(j + 1, n - 1)],  # width of the features coming up
                    out_ch=channels[j],
                    num_layers=layers[j] + 1,  # one more than down: it also takes the downsample's skip
                    resnet=resnet(),
                    attn=attn(kind, j),
                    add_upsample=i < n - 1,
                )
            )
        self.conv_norm_out = ck.nn.GroupNorm(groups, channels[0], eps, activation="silu")
        self.conv_out = nn.Conv2d(channels[0], cfg["out_channels"], cfg["conv_out_kernel"], padding=cfg["conv_out_kernel"] // 2)
        self.enable_gradient_checkpointing(gradient_checkpointing)

    @classmethod
    def from_config(cls, cfg, *, gradient_checkpointing=False):
        return cls(cfg, gradient_checkpointing=gradient_checkpointing)

    def enable_gradient_checkpointing(self, enabled=True):
        """Recompute each resnet's and each attention block's activations in backward."""
        for m in self.modules():
            if isinstance(m, (ResnetBlock, Transformer2D)):
                m.checkpointing = bool(enabled)

    def forward(self, x, timesteps, encoder_hidden_states):
        """x: (B, in_channels, h, w); timesteps: (B,), a scalar tensor or a number;
        encoder_hidden_states: (B, L, cross_attention_dim). Returns (B, out_channels, h, w)."""
        if x.dim() != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"x must be (B, {self.config['in_channels']}, h, w), got shape {tuple(x.shape)}")
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != x.shape[0]:
            raise ValueError(
                f"encoder_hidden_states must be (B={x.shape[0]}, L, dim), got shape {tuple(encoder_hidden_states.shape)}"
            )
        if self.config["center_input_sample"]:
            x = 2 * x - 1.0
        dtype = autocast_dtype(x.device.type)
        if dtype is not None:  # once, not at each cross-attention's k and v projection (32 in SD2)
            encoder_hidden_states = encoder_hidden_states.to(dtype)
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        if t.numel() not in (1, x.shape[0]):
            raise ValueError(f"timesteps must be a number or hold 1 or B={x.shape[0]} values, got {t.numel()}")
        t = t.expand(x.shape[0])
        t_emb = timestep_embedding(t, self.conv_in.out_channels, self.config["flip_sin_to_cos"], self.config["freq_shift"])
        temb = F.silu(self.time_embedding(t_emb.to(x.dtype)))  # as every resnet takes it
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, encoder_hidden_states)
            skips += block_skips
        h = self.mid_block(h, temb, encoder_hidden_states)
        for block in self.up_blocks:
            h = block(h, skips, temb, encoder_hidden_states)
        return self.conv_out(self.conv_norm_out(h))

    # diffusers compatibility: the names are the same, so the mapping is the identity.

    def diffusers_state_dict(self):
        """A state dict that UNet2DConditionModel(**config).load_state_dict(sd) takes strictly."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def _check_keys(self, sd):
        """This UNet's state_dict, after a ValueError unless `sd` has exactly its keys."""
        ours = self.state_dict()
        missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
        if missing or unexpected:
            raise ValueError(
                f"state dict does not match this UNet's config: {len(missing)} missing "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        return ours

    def load_diffusers_state_dict(self, sd):
        """Load a UNet2DConditionModel state dict; every key must match and nothing may be left."""
        ours = self._check_keys(sd)
        wrong = [f"{k}: {tuple(sd[k].shape)} vs ours {tuple(v.shape)}" for k, v in ours.items() if sd[k].shape != v.shape]
        if wrong:
            raise ValueError(f"{len(wrong)} tensors have the wrong shape for this config, e.g. {wrong[:3]}")
        self.load_state_dict(sd, strict=True)

    @classmethod
    def from_diffusers(cls, path, *, gradient_checkpointing=False):
        """Build from a diffusers folder's config.json and load its weights (see diffusers_files)."""
        weights, config = diffusers_files(path)
        if config is None:
            raise ValueError(f"no {CONFIG_NAME} next to {weights}; build the UNet from a config and use load_diffusers")
        unet = cls(json.loads(config.read_text()), gradient_checkpointing=gradient_checkpointing)
        unet.load_diffusers(weights)
        return unet

    def load_diffusers(self, path):
        """Load weights from a diffusers .safetensors file or folder (see diffusers_files)."""
        from safetensors.torch import load_file

        weights, _ = diffusers_files(path)
        self.load_diffusers_state_dict(load_file(str(weights)))

    def bf16_weight_params(self):
        """What train.precision=bf16-weights stores in bf16: every parameter but the GroupNorms'
        weights and biases, which the CUDA GroupNorm reads in fp32 (bf16 ones would cost two
        casts forward and two back per call, ~240 small kernels a step for SD2)."""
        norms = {id(p) for m in self.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in norms]

    def diffusers_config(self):
        """The config.json dict of UNet2DConditionModel.from_pretrained."""
        return {"_class_name": DIFFUSERS_CLASS, **self.config}

    def save_diffusers(self, folder, state_dict=None):
        """Write config.json + diffusion_pytorch_model.safetensors for UNet2DConditionModel.from_pretrained.
        state_dict: the weights to write (e.g. fp32 EMA ones) instead of the module's own."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_diffusers_config(folder, self.diffusers_config())
        weights = self.state_dict() if state_dict is None else state_dict
        self._check_keys(weights)
        save_safetensors({k: v.detach().contiguous() for k, v in weights.items()}, folder / WEIGHTS_NAME)


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def save_safetensors(tensors, path):
    """safetensors' save_file, with the permissions of any other file this process writes:
    save_file leaves it readable by its owner only (0600), a checkpoint a teammate cannot load."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_UMASK)


def write_diffusers_config(folder, config):
    """folder/config.json of UNet2DConditionModel.from_pretrained (config: UNet.diffusers_config())."""
    (Path(folder) / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def diffusers_files(path):
    """(weights file, config.json or None) for a .safetensors file, a diffusers UNet folder, or a
    pipeline folder holding unet/ (e.g. an SD2 or CommonCanvas download)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors file (only safetensors weights are supported)")
        config = path.parent / CONFIG_NAME
        return path, config if config.is_file() else None
    for folder in (path, path / "unet"):
        if (folder / WEIGHTS_NAME).is_file():
            config = folder / CONFIG_NAME
            return folder / WEIGHTS_NAME, config if config.is_file() else None
    raise ValueError(f"no UNet weights at {path}: looked for {path / WEIGHTS_NAME} and {path / 'unet' / WEIGHTS_NAME}")
