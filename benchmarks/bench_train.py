"""End-to-end training throughput of the SD2-base UNet: the plain-PyTorch baseline recipe, our
optimizations switched on one after another (cumulative, as CommonCanvas's ablation), and the
strongest plain-PyTorch recipe a user could pick instead.

    python benchmarks/bench_train.py [--out DIR] [--resolution 256|512] [--batch 32] [--steps 10]
    torchrun --standalone --nproc_per_node=8 benchmarks/bench_train.py     # a world of 8 GPUs
    python benchmarks/bench_train.py --count-flops    # recount the UNet's FLOPs per image and exit
    python benchmarks/bench_train.py --tiny           # tiny config on the CPU in seconds (smoke test)

Every row is a full training step as trainer/train.py runs it: data -> (VAE + text encoder when
online) -> caption dropout -> UNet forward/backward under bf16 autocast (fp32 weights until the
"+ bf16 weights" row) through a DDP wrapper -> gradient clipping -> optimizer -> EMA.
Rows (cumulative unless said otherwise):
  baseline       attention materializing the softmax (ck.attention's "torch" reference: scores
                 and probabilities stored, as the original latent-diffusion code), torch.nn.GroupNorm
                 (autocast runs it in fp32) then a separate SiLU, torch.optim.AdamW with its
                 defaults (foreach, not fused), a per-tensor EMA every step, JPEGs decoded by the
                 PIL DataLoader and encoded online by the VAE and text encoder (random SD2-size
                 encoders, configs/encoders/sd2.yaml, unless --vae/--text-encoder give local
                 folders), torch's DistributedDataParallel
  + our attention / + our GroupNorm+SiLU    the best cckernels backend (triton or cuda); our
                 attention reads strided views of one fused q/k/v projection (trainer.unet's
                 Attention.fused: one GEMM on the weights concatenated, as diffusers'
                 fuse_qkv_projections; the baseline projects each separately, as the
                 latent-diffusion code); our GroupNorm adds the skip connection's gradient to
                 its own in its backward kernel (ck.group_norm's prenorm, Triton)
  + our LayerNorm   the transformer blocks' LayerNorms in the autocast dtype (torch's autocast
                 runs them in fp32: an fp32 copy of the input, and the output cast back per
                 Linear that reads it), CommonCanvas's low-precision LayerNorm, in ck.layer_norm's
                 kernels with the residual add before each fused in (trainer.unet.LayerNorm)
  + our GEGLU    the feed-forward's h * gelu(gate) in one kernel each way (ck.geglu, which also
                 adds the projection's bias and returns its gradient) instead of gelu, a
                 multiply, four kernels back and the Linear's sum for its bias gradient
  + channels_last
  + fused AdamW+EMA, scheduled EMA   cckernels.FusedAdamWEMA + trainer.ema.ScheduledEMA. The EMA
                 only runs in the last --ema-fraction of training (CommonCanvas: 3.5%), so the
                 step time is (1 - f) * t(no EMA) + f * t(fused EMA), both measured; the peak
                 memory includes the EMA shadow
  + bf16 weights   the UNet's weights in bf16 (GroupNorms' aside), FusedAdamWEMA's fp32 masters
                 (train.precision=bf16-weights): autocast has no weight to cast (about 1,100
                 copy kernels a step for SD2, forward and gradient casts) and grads are bf16
  + DALI decoding   (before precomputed latents, which remove decoding from the loop: after
                 them DALI would change nothing)
  + precomputed latents   data.format=latents written by trainer.precompute, no encoders
  + our DDP      trainer.ddp.DistributedDataParallel
  + larger micro-batch   the largest multiple of 8 whose estimated peak (the previous row's
                 peak + its measured memory per image, from forward+backward peaks at one and
                 two batches) fits 90% of the GPU; halved steps back on out-of-memory
  + torch.compile   the UNet compiled with cckernels' ops inside its graph (custom ops, no
                 graph break); last, as the one step of the ladder a user may leave out
  + our DDP, CUDA graphs (not cumulative): the "+ our DDP" recipe at the base micro-batch with
                 the UNet's forward and backward replayed as CUDA graphs (train.cuda_graphs,
                 trainer/graphs.py): the host's kernel launches out of the step
  plain PyTorch best (not cumulative): SDPA (PyTorch's own backend choice) on the fused q/k/v
                 projection, torch.compile, AdamW(fused=True), torch._foreach_lerp_ EMA (on our EMA's schedule: the
                 last --ema-fraction of steps), precomputed latents, channels_last, torch DDP,
                 at the baseline micro-batch
  plain PyTorch best, larger micro-batch   the same at the largest micro-batch its own memory
                 allows (same rule as ours): a user of plain PyTorch raises the batch too
  plain PyTorch best, contiguous   the base-batch row without channels_last, which plain
                 PyTorch's GroupNorm undoes (a copy each way) while its convolutions gain
"x plain" compares with the fastest of the three plain-PyTorch rows: the strongest recipe a user
could pick instead.
A row whose pieces are missing (DALI not installed, no triton/cuda backend for an op) is
reported as skipped with the reason, and later rows go on without that piece. A world of 1
still wraps the model in DDP (an initialized one-process group), so the code path runs.
The baseline, "+ our DDP", "+ larger micro-batch" and the plain rows are measured first, so a
run that --budget-s cuts short keeps the headline comparisons; then "+ precomputed latents" and
the row above it (the same UNet encoding online: issue #9's comparison), then "+ our DDP, CUDA
graphs" (no target depends on it), then the rest. The table keeps ladder order.

Timing: --steps steps run back to back after --warmup steps (compilation, autotuning, optimizer
state allocation), as in training: no sync between them, so the host may enqueue a step while
the GPU runs the one before. Each step's time is between CUDA events recorded after each step
(wall time on a CPU); median with 20/80 quantiles. (The H200 runs of 2026-11-26 synchronized
after every step, which added each step's host lead-in to GPU-bound rows.) Not
triton.testing.do_bench: a step consumes the data pipeline, whose host time must count.
images/s = world * micro-batch / median step time.
"host ms": median time a step took to enqueue. Well below the step time, the host has time to
spare (the GPU is the bottleneck: CUDA graphs, large micro-batches). Close to it, either the host
is the bottleneck or it was held up by a full launch queue behind a busy GPU: the busy column
of --profile tells which.
Model FLOPs per image per training step (forward + backward of the UNet, no recomputation,
encoders not counted), counted with torch.utils.flop_counter.FlopCounterMode on the meta
device (--count-flops prints them): SD2 UNet 539 GFLOP at 256 px, 2,409 at 512 px.
MFU = FLOPs per image * images/s / peak, against the bf16 dense matmul peak measured here
(an 8192^3 bf16 matmul, do_bench) and against the nominal 989 TFLOP/s of an H100 SXM.
Writes bench_train.json and bench_train.png to --out (default benchmarks/results/local) after
every row, so a run cut short (run_gpu.sh's time limit) keeps what it measured.
--profile runs more steps per row under torch.profiler for the "busy" column: the time per step
in which some kernel runs (overlapping kernels, as NCCL's or DALI's beside the UNet's, counted
once) / median step time; well below 100% the GPU waits for the host (Python, launches), and
kernel speed-ups cannot show in that row, a larger micro-batch or CUDA graphs can. Every row
profiles 1 step, its kernels only; rows named in --rows (or --op-tables) profile 2 steps with
their ops too, whose tables (rank 0's: top 30 by GPU time; by host time, self, which shows
the CUDA runtime's launches, syncs and allocations, and total) go to
--out/bench_train-profile/<row>.txt (op tables took 5-14 s a row on the H200 runs).
"""

import argparse
import dataclasses
import gc
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # trainer, cckernels and bench_data from a checkout

import cckernels as ck  # noqa: E402
from bench_data import make_dataset  # noqa: E402
from cckernels.nn import Attention  # noqa: E402
from run_info import at_least, output_dir, run_meta, save_plot  # noqa: E402
from trainer import diffusion, encoders  # noqa: E402
from trainer.config import CHOICES, load as load_config  # noqa: E402
from trainer.data import cache_root  # noqa: E402
from trainer.graphs import graph_on_first_call  # noqa: E402
from trainer.unet import GEGLU, LayerNorm, UNet  # noqa: E402

SD2_GFLOP_PER_IMAGE = {256: 539.0, 512: 2409.0}  # counted by --count-flops (torch 2.14)
H100_SXM_BF16_TFLOPS = 989.0  # nominal dense bf16 peak
EMA_DECAY = 0.9999
PROFILE_STEPS = 2


@dataclasses.dataclass(frozen=True)
class Recipe:
    attention: str = "materialized"  # materialized | ours | sdpa
    qkv: str = "separate"  # separate (a GEMM each) | fused (one GEMM: cckernels.nn.Attention.fused)
    group_norm: str = "torch"  # torch (nn.GroupNorm + SiLU) | ours (ck.group_norm, fused SiLU)
    layer_norm: str = "torch"  # torch (an add, then nn.LayerNorm: fp32 under autocast) | ours (ck.layer_norm)
    geglu: str = "torch"  # torch (gelu, then a multiply) | ours (ck.geglu)
    channels_last: bool = False
    optimizer: str = "adamw"  # adamw (defaults) | adamw_fused | fused_ema (ck.FusedAdamWEMA)
    weights: str = "fp32"  # fp32 (autocast casts them each step) | bf16 (fused_ema keeps fp32 masters)
    ema: str = "per_tensor"  # per_tensor | foreach_lerp | scheduled
    data: str = "online"  # online (decode + VAE + text encoder every step) | latents
    decoder: str = "pil"  # pil | dali (online data only)
    ddp: str = "torch"  # torch | ours
    batch: str = "base"  # base | max
    compile: bool = False
    graphs: bool = False  # the UNet's forward and backward as CUDA graphs (trainer/graphs.py)


LADDER = [
    ("baseline", {}),
    ("+ our attention", {"attention": "ours", "qkv": "fused"}),
    ("+ our GroupNorm+SiLU", {"group_norm": "ours"}),
    ("+ our LayerNorm", {"layer_norm": "ours"}),
    ("+ our GEGLU", {"geglu": "ours"}),
    ("+ channels_last", {"channels_last": True}),
    ("+ fused AdamW+EMA, scheduled EMA", {"optimizer": "fused_ema", "ema": "scheduled"}),
    ("+ bf16 weights", {"weights": "bf16"}),
    ("+ DALI decoding", {"decoder": "dali"}),
    ("+ precomputed latents", {"data": "latents"}),
    ("+ our DDP", {"ddp": "ours"}),
    ("+ larger micro-batch", {"batch": "max"}),
    ("+ torch.compile", {"compile": True}),
]
PLAIN = ("plain PyTorch best", Recipe(attention="sdpa", qkv="fused", channels_last=True, optimizer="adamw_fused",
                                      ema="foreach_lerp", data="latents", compile=True))
PLAIN_MAX = ("plain PyTorch best, larger micro-batch", dataclasses.replace(PLAIN[1], batch="max"))
# channels_last is assumed best for plain PyTorch, not measured: convolutions gain, but torch's
# GroupNorm makes a channels_last input contiguous (its fwd+bwd 1.04-1.33x slower on such inputs
# in the second H200 run's bench_group_norm). This row measures the other choice.
PLAIN_CONTIGUOUS = ("plain PyTorch best, contiguous", dataclasses.replace(PLAIN[1], channels_last=False))
PLAIN_ROWS = (PLAIN[0], PLAIN_MAX[0], PLAIN_CONTIGUOUS[0])
# Not cumulative: the "+ our DDP" row's recipe (the base micro-batch, where eager steps were
# host-bound on the H200) with the UNet replayed as CUDA graphs.
GRAPHED = ("+ our DDP, CUDA graphs", "+ our DDP")

# Measured first: the baseline, our full recipe at the base and the larger micro-batch, plain
# PyTorch's best at both (main() says what comes next).
HEADLINE = ("baseline", "+ our DDP", "+ larger micro-batch", *PLAIN_ROWS)
ROW_NAMES = (*(name for name, _ in LADDER), GRAPHED[0], *PLAIN_ROWS)


def row_plan(args, device):
    """(name, recipe, why it cannot run or None, note) per row: the ladder, each step on top of
    the ones before that can run here, then plain PyTorch's best at both micro-batches."""
    plan, recipe, dropped = [], Recipe(), []
    for name, change in LADDER:
        reason = missing_piece(change, device, args.tiny)
        if change.get("compile") and args.no_compile:
            reason = "--no-compile"
        if reason:
            dropped.append(name)
        else:
            recipe = dataclasses.replace(recipe, **change)
        plan.append((name, recipe, reason, f"(without: {', '.join(dropped)})" if dropped else ""))
    name, base = GRAPHED
    _, recipe, reason, note = next(row for row in plan if row[0] == base)
    plan.append((name, dataclasses.replace(recipe, graphs=True),
                 reason or ("CUDA graphs need a GPU" if device.type != "cuda" else None), note))
    for name, plain in (PLAIN, PLAIN_MAX, PLAIN_CONTIGUOUS):
        note = ""
        if args.no_compile:
            plain, note = dataclasses.replace(plain, compile=False), "(no torch.compile: --no-compile)"
        plan.append((name, plain, missing_piece(dataclasses.asdict(plain), device, args.tiny), note))
    return plan


# --- model pieces the recipes swap ---------------------------------------------------------------

class TorchGroupNormSiLU(torch.nn.GroupNorm):
    """torch.nn.GroupNorm then a separate SiLU pass: what a plain PyTorch UNet runs (under
    autocast torch's group_norm computes and returns fp32)."""

    def __init__(self, num_groups, num_channels, eps, affine, activation):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.activation = activation

    def forward(self, x, prenorm=False):
        y = super().forward(x)
        y = F.silu(y) if self.activation == "silu" else y
        return (y, x) if prenorm else y  # as ck.nn.GroupNorm's: x for the skip connection


def swap_modules(model, kind, make):
    """Replace every `kind` module of `model` by make(module), loaded with its state_dict, in
    place; returns how many."""
    replaced = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, kind):
                new = make(child).to(child.weight.device)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new)
                replaced += 1
    return replaced


def plain_group_norm(model):
    """Every ck.nn.GroupNorm of `model` becomes a TorchGroupNormSiLU; returns how many."""
    return swap_modules(model, ck.nn.GroupNorm, lambda m: TorchGroupNormSiLU(m.num_groups, m.num_channels, m.eps,
                                                                             m.affine, m.activation))


def materialized_attention(q, k, v):
    """The baseline: scores and softmax stored in full (ck.attention's torch reference)."""
    return ck.attention(q, k, v, backend="torch")


def sdpa_attention(q, k, v):
    """PyTorch's fused SDPA on (B, H, L, D) views of the BLHD tensors, backend chosen by PyTorch."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


ATTENTION = {"materialized": materialized_attention, "ours": ck.attention, "sdpa": sdpa_attention}


def set_function(model, kind, name, fn):
    """Set attribute `name` (a function the module calls, or a flag) of every `kind` module of
    `model` to fn; returns how many."""
    blocks = [m for m in model.modules() if isinstance(m, kind)]
    for m in blocks:
        setattr(m, name, fn)
    return len(blocks)


def build_unet(unet_cfg, recipe, device):
    with torch.device(device):  # random init on the device: seconds, not a minute on the CPU
        unet = UNet.from_config(unet_cfg)
    if recipe.group_norm == "torch":
        plain_group_norm(unet)
    set_function(unet, Attention, "attend", ATTENTION[recipe.attention])
    set_function(unet, Attention, "fused", recipe.qkv == "fused")
    set_function(unet, GEGLU, "fused", recipe.geglu == "ours")  # else Linear with bias, gelu, a multiply
    set_function(unet, LayerNorm, "fused", recipe.layer_norm == "ours")  # else an add, then nn.LayerNorm
    if recipe.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    return unet


# --- FLOPs and peak --------------------------------------------------------------------------------

def count_flops(unet_cfg, resolution, batch=1):
    """UNet forward + backward FLOPs per image at `resolution` px (8x VAE), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet.from_config(unet_cfg)
        side = resolution // 8
        x = torch.randn(batch, unet.config["in_channels"], side, side)
        t = torch.randint(0, 1000, (batch,))
        ctx = torch.randn(batch, 77, unet.config["cross_attention_dim"])
        counter = FlopCounterMode(display=False)
        with counter:
            unet(x, t, ctx).float().square().mean().backward()
    return counter.get_total_flops() / batch


def measured_peak_tflops(device):
    """bf16 dense matmul rate on this device (fp32 on a CPU), TFLOP/s."""
    if device.type != "cuda":
        a = torch.randn(512, 512)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t0)
        return 2 * 512**3 / float(np.median(times)) / 1e12
    from triton.testing import do_bench

    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = do_bench(lambda: a @ b, warmup=100, rep=500)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# --- one row ----------------------------------------------------------------------------------------

def missing_piece(change, device, tiny):
    """Why `change` (a LADDER entry's dict) cannot run here, or None."""
    for op in ("attention", "group_norm", "layer_norm", "geglu"):
        if change.get(op) == "ours":
            best = ck.available_backends(device)[op][0]
            if best == "torch" and not tiny:
                return f"no triton or cuda backend for ck.{op} on {device.type}"
    if change.get("decoder") == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            return f"DALI not importable ({e})"
    return None


class Shared:
    """What rows reuse: encoders (online rows), the JPEG folder and the latents folder."""

    def __init__(self, args, cfg, world, rank, device):
        self.args, self.cfg, self.world, self.rank, self.device = args, cfg, world, rank, device
        self._encoders = None
        self._latents = None

    def encoders(self):
        if self._encoders is None:
            vae = encoders.load_vae(self.cfg["model"]["vae"], self.device)
            text = encoders.load_text_encoder(self.cfg["model"]["text_encoder"], self.device)
            self._encoders = (vae, text, text.empty_embedding())
        return self._encoders

    def drop_encoders(self):
        self._encoders = None

    def latents(self):
        """trainer.precompute's folder for the JPEGs at this resolution (made once, then reused)."""
        if self._latents is None:
            from trainer.precompute import precompute

            a = self.args
            out = a.cache / f"bench-train-latents-{a.images}-{a.resolution}-{a.encoders_name}"
            precompute(self.image_data("pil"), self.cfg["model"]["vae"], self.cfg["model"]["text_encoder"],
                       [a.resolution], out, batch_size=32, shard_size=256, rank=self.rank,
                       world_size=self.world, device=self.device, cache_dir=a.cache, replace_other=True)
            self._latents = out
        return self._latents

    def image_data(self, backend):
        a = self.args
        return {"path": str(a.jpegs), "format": "folder", "backend": backend, "resolution": a.resolution,
                "workers": a.workers}


def make_loader(recipe, batch, shared):
    from trainer.data import make_loader as trainer_loader

    a = shared.args
    if recipe.data == "latents":
        cfg = {"path": str(shared.latents()), "format": "latents", "resolution": a.resolution}
    else:
        cfg = shared.image_data(recipe.decoder)
    return trainer_loader(cfg, batch, rank=shared.rank, world_size=shared.world, seed=0, device=shared.device,
                          cache_dir=a.cache)


def make_optimizer(recipe, unet, ema_start):
    """(optimizer, ema_step); ema_step() runs after each optimizer step."""
    params = [p for p in unet.parameters() if p.requires_grad]
    lr, wd = 1e-4, 0.01
    if recipe.optimizer == "fused_ema":
        optimizer = ck.FusedAdamWEMA(params, lr=lr, weight_decay=wd)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=recipe.optimizer == "adamw_fused" or None)
    if recipe.ema == "scheduled":
        from trainer.ema import ScheduledEMA

        ema = ScheduledEMA(unet, decay=EMA_DECAY, start_step=ema_start, optimizer=optimizer)
        return optimizer, ema.step
    with torch.no_grad():
        shadow = [p.detach().float().clone() for p in params]
    if recipe.ema == "per_tensor":  # the baseline's: every step, as the original code
        return optimizer, lambda: ck.ema_update_(shadow, params, EMA_DECAY, backend="torch")
    # Plain PyTorch's EMA on the same schedule as ours (updates after step ema_start, so the
    # row mixes its windows by --ema-fraction alike); its shadow is allocated from the start.
    steps = itertools.count(1)

    def foreach_lerp():
        if next(steps) > ema_start:
            torch._foreach_lerp_(shadow, [p.detach() for p in params], 1.0 - EMA_DECAY)

    return optimizer, foreach_lerp


def wrap(recipe, unet, args):
    if recipe.ddp == "ours":
        from trainer.ddp import DistributedDataParallel

        model = DistributedDataParallel(unet)
    else:
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[unet.conv_in.weight.device]
                                                          if unet.conv_in.weight.is_cuda else None)
    if not recipe.compile:
        return model
    mode = None if args.tiny or args.compile_mode == "default" else args.compile_mode
    # dynamic=False: each row compiles for its own batch. Left to dynamo, a second row with the
    # same code at another batch (plain PyTorch's larger micro-batch) got a graph with a symbolic
    # batch dimension, which the rows before it did not.
    return torch.compile(model, backend=args.compile_backend, mode=mode, dynamic=False)


def run_row(recipe, name, batch, shared):
    """Times one recipe; returns {step times, peak and persistent memory, backends used}."""
    a, device = shared.args, shared.device
    cuda = device.type == "cuda"
    phases, t_phase = {}, time.perf_counter()
    calls_before = ck.backend_calls()

    def phase(label):  # seconds since the last phase: where a row's time goes, to size budgets
        nonlocal t_phase
        now = time.perf_counter()
        phases[label] = now - t_phase
        t_phase = now

    # The same initial weights on every rank: the bf16 row's fp32 masters are taken before the
    # DDP wrapper broadcasts rank 0's weights. Then each rank its own noise.
    torch.manual_seed(0)
    unet = build_unet(shared.cfg["model"]["unet"], recipe, device)
    torch.manual_seed(shared.rank)
    scheduled = recipe.ema in ("scheduled", "foreach_lerp")
    # Scheduled EMA (ours, and plain PyTorch's foreach_lerp on the same schedule) starts after
    # the untimed step that follows the first timed window (and the profiled steps, which then
    # time the same steps as that window).
    op_table = name in (a.op_tables or a.rows or ())  # the rows asked for by name
    profiled = (PROFILE_STEPS if op_table else 1) if a.profile else 0
    before_ema = a.warmup + a.steps + profiled
    optimizer, ema_step = make_optimizer(recipe, unet, ema_start=before_ema + 1)
    if recipe.weights == "bf16":  # before the DDP wrapper, which buckets grads by dtype
        optimizer.cast_params_(torch.bfloat16, unet.bf16_weight_params())
    if recipe.graphs:  # captured in the first warm-up step
        graph_on_first_call(unet)
    model = wrap(recipe, unet, a)
    if recipe.data == "latents":
        shared.drop_encoders()
    loader = make_loader(recipe, batch, shared)
    batches = iter(loader)
    if recipe.data == "latents":
        vae, text, empty = None, None, loader.empty_embedding
    else:
        vae, text, empty = shared.encoders()
    schedule = diffusion.NoiseSchedule().to(device)
    # bf16 weights beside fp32 norm weights: torch's clipping scales each bf16 grad alone
    clip_grad_norm_ = ck.clip_grad_norm_ if recipe.weights == "bf16" else torch.nn.utils.clip_grad_norm_
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cuda or recipe.weights == "bf16",
                              cache_enabled=not recipe.graphs)  # a CUDA graph keeps no autocast cache

    def step():
        images, captions = next(batches)
        with torch.no_grad(), autocast:
            if recipe.data == "latents":
                latents, ctx = images, captions
            else:
                latents, ctx = encoders.encode_images(vae, images.to(device)), text.encode(captions)
            ctx = diffusion.drop_captions(ctx, empty, 0.1)
        with autocast:
            loss = diffusion.training_loss(model, schedule, latents, ctx)
        loss.backward()
        clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema_step()
        optimizer.zero_grad(set_to_none=True)

    def window(n, host=None):
        """n steps' times, back to back as in training (no sync between them: the host may run
        ahead): on a GPU between CUDA events recorded after each step, else wall time. `host`
        gets the time each step took to enqueue."""
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)] if cuda else []
        if cuda:
            marks[0].record()
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            step()
            if host is not None:
                host.append(time.perf_counter() - t0)
            if cuda:
                marks[i + 1].record()
            else:
                times.append(time.perf_counter() - t0)
        if cuda:
            torch.cuda.synchronize(device)
            times = [start.elapsed_time(end) / 1e3 for start, end in zip(marks, marks[1:])]
        return times

    phase("setup")
    window(a.warmup)
    phase("warmup")
    if cuda:  # the peak of training steps, not of the warm-up's autotuning (its 256 MiB flush buffer)
        torch.cuda.reset_peak_memory_stats(device)
    host = []
    times = window(a.steps, host)
    phase("timed")
    result = {"step_s": times, "host_s": host, "phases_s": phases}
    if a.profile:
        table = a.profile_dir / f"{slug(name)}.txt" if shared.rank == 0 and op_table else None
        result.update(profile_steps(step, profiled, cuda, table, np.median(times)))
        phase("profiled")
    if scheduled:
        window(1)  # the EMA starts here (ours copies the weights once)
        result["step_s_ema"] = window(max(1, a.steps // 2))
        phase("ema")
    if cuda:
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        result["persistent_bytes"] = torch.cuda.memory_allocated(device)  # weights, states, encoders
        if recipe.data == "latents" and not recipe.compile and not recipe.graphs:  # no recompile, no recapture
            try:  # a failed probe leaves the row (timed already) and the old sizing rule
                result["bytes_per_image"] = memory_per_image(model, schedule, batches, autocast, batch, device)
            except Exception as e:  # noqa: BLE001
                result["bytes_per_image_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    used = ran_since(calls_before)
    result["backends"] = {
        "attention": used.get("attention") if recipe.attention == "ours" else recipe.attention,
        "group_norm": used.get("group_norm") if recipe.group_norm == "ours" else "torch.nn+silu",
        "layer_norm": used.get("layer_norm") if recipe.layer_norm == "ours" else "torch",
        "geglu": used.get("geglu") if recipe.geglu == "ours" else "torch",
        "weights": recipe.weights,
    }
    del batches, loader, model, unet, optimizer, ema_step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def ran_since(calls_before):
    """{op: the backends that ran it since ck.backend_calls() gave calls_before, "+"-joined}."""
    ran = {}
    for op, counts in ck.backend_calls().items():
        names = [b for b, n in counts.items() if n > calls_before.get(op, {}).get(b, 0)]
        if names:
            ran[op] = "+".join(names)
    return ran


def memory_per_image(model, schedule, batches, autocast, batch, device):
    """Bytes of peak memory one more image adds: the peaks of a forward and backward over one
    and over two of the loader's batches (latents), their difference per image. What does not
    grow with the batch (grads, autocast's weight copies) cancels out, where (peak -
    persistent) / batch counted it per image: for plain PyTorch 0.45 GiB an image against the
    0.28 its two rows' peaks gave (third H200 run), so its larger batch came out too small."""
    peaks = []
    for n in (1, 2):
        parts = [next(batches) for _ in range(n)]
        latents, ctx = (torch.cat([part[i] for part in parts]) for i in (0, 1))
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with autocast:
                diffusion.training_loss(model, schedule, latents, ctx).backward()
            peaks.append(torch.cuda.max_memory_allocated(device))
        finally:  # no grads left behind, even by a failed probe
            for p in model.parameters():
                p.grad = None
    return (peaks[1] - peaks[0]) / batch


def profile_steps(step, n, cuda, path, step_s):
    """n more steps under torch.profiler: their op tables (top 30 by GPU time, then by host
    time) go to `path`; with path None only the GPU's kernels are recorded. Returns the time
    per step in which the GPU runs a kernel and its share of the unprofiled median step time
    `step_s` (the profiler slows the host, not the kernels). A share well below 1 means the GPU
    waited for the host: kernel speed-ups cannot show there."""
    from torch.profiler import ProfilerActivity, profile

    record_ops = path is not None or not cuda
    with profile(activities=[ProfilerActivity.CPU] * record_ops + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        ops = prof.key_averages()
        tables = [("GPU: top 30 by self GPU time", "self_device_time_total")] if cuda else []
        # on a GPU, where the host's time goes: the CUDA runtime's calls (launches, syncs,
        # allocations) by self time, and the ops and autograd nodes (ours included) by their total
        tables += [("host: top 30 by self CPU time", "self_cpu_time_total"),
                   ("host: top 30 by total CPU time", "cpu_time_total")]
        path.write_text("\n".join(f"{title}, {n} steps\n{ops.table(sort_by=key, row_limit=30)}" for title, key in tables))
    if not cuda:
        return {}
    busy_s = covered((e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA) * 1e-6 / n
    return {"busy_s_per_step": busy_s, "gpu_busy": busy_s / step_s}


def covered(intervals):
    """Length of the union of (start, end) intervals: kernels on several streams overlap, and a
    sum of their durations would count that time twice (and could pass 100% busy)."""
    total, reached = 0, float("-inf")
    for start, end in sorted(intervals):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def slug(name):
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def measure(recipe, name, earlier, shared):
    """Runs one row; the larger micro-batch steps back (halving the increase) on out-of-memory.
    `earlier`: the rows above it in the table; a larger micro-batch row sizes its batch from
    the memory of the row right above it (the same recipe at the base micro-batch), or takes
    --max-batch."""
    a = shared.args
    batch = a.batch
    if recipe.batch == "max" and (a.max_batch or earlier and "images_per_s" in earlier[-1]):
        # no larger than each rank's share of the --images can fill (the H200 fitted 576 in
        # memory with 512 images: the loader refused it)
        images_per_rank = max(a.batch, a.images // shared.world // 8 * 8)
        if a.max_batch:
            batch = a.max_batch
        elif a.tiny or shared.device.type != "cuda":
            batch = 2 * a.batch  # no memory model on the CPU: the path only
        else:
            capacity = 0.9 * torch.cuda.get_device_properties(shared.device).total_memory
            batch = max_batch(earlier[-1], a.batch, capacity)
        batch = min(batch, images_per_rank)
    while True:
        try:
            result = run_row(recipe, name, batch, shared)
            break
        except Exception as e:  # noqa: BLE001  a row failing is reported, not fatal
            if not (is_oom(e) and recipe.batch == "max" and batch > a.batch):
                return {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            batch = max(a.batch, (a.batch + batch) // 2 // 8 * 8)
        # Out of the except block the traceback, and the row's tensors it holds, are gone.
        gc.collect()
        torch.cuda.empty_cache()
    return {**summarize(result, batch, shared.world, a.ema_fraction), **result}


def summarize(result, batch, world, ema_fraction):
    """Median step time with 20/80 quantiles; a scheduled EMA row mixes its two windows."""
    q = np.quantile(result["step_s"], [0.2, 0.5, 0.8])
    if "step_s_ema" in result:
        q = (1 - ema_fraction) * q + ema_fraction * np.quantile(result["step_s_ema"], [0.2, 0.5, 0.8])
    q20, med, q80 = (float(v) for v in q)
    return {"batch": batch, "step_ms": med * 1e3, "step_ms_q20": q20 * 1e3, "step_ms_q80": q80 * 1e3,
            "host_ms": float(np.median(result["host_s"])) * 1e3, "images_per_s": world * batch / med}


def max_batch(prev, base, capacity):
    """The larger micro-batch: the previous row's peak plus its memory per image (measured by
    memory_per_image, else (peak - persistent) / batch) up to `capacity` bytes, a multiple of 8."""
    per_image = prev.get("bytes_per_image", 0)
    if per_image <= 0:
        per_image = (prev["peak_bytes"] - prev["persistent_bytes"]) / prev["batch"]
    fit = prev["batch"] + int((capacity - prev["peak_bytes"]) / per_image)
    return max(base, fit // 8 * 8)


def is_oom(e):
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# --- output ----------------------------------------------------------------------------------------------

def add_ratios(rows, flops_per_image, peak_tflops):
    done = [r for r in rows if "images_per_s" in r]
    base = next((r for r in done if r["name"] == "baseline"), None)
    plain = max((r["images_per_s"] for r in done if r["name"] in PLAIN_ROWS), default=None)
    for r in done:
        rate = r["images_per_s"]
        r["speedup_vs_baseline"] = rate / base["images_per_s"] if base else None
        r["speedup_vs_plain_pytorch"] = rate / plain if plain else None
        r["tflops"] = flops_per_image * rate / 1e12
        r["mfu_measured_peak"] = r["tflops"] / peak_tflops
        r["mfu_h100_nominal"] = r["tflops"] / H100_SXM_BF16_TFLOPS


def gpu_time_rates(rows):
    """{row name: (images/s, x baseline)} in GPU time, for the rows --profile measured: the
    rate each would reach if the host never held its GPU up (what CUDA graphs approach: the
    fourth H200 run's batch-32 step, 531-534 img/s by its GPU time, ran 516 replayed). Where eager
    steps are host-bound, this is what each kernel's speed-up is worth."""
    rates = {r["name"]: r["images_per_s"] / r["gpu_busy"] for r in rows if r.get("gpu_busy")}
    base = rates.get("baseline")
    return {name: (rate, rate / base if base else None) for name, rate in rates.items()}


def print_table(rows):
    head = (f"{'recipe':<40}{'batch':>6}{'img/s':>9}{'step ms (q20-q80)':>26}{'host ms':>8}{'peak GiB':>10}"
            f"{'x base':>8}{'x plain':>8}{'MFU':>7}{'MFU989':>8}{'busy':>6}{'GPU-time img/s':>22}  backends")
    gpu = gpu_time_rates(rows)
    print(head)
    for r in rows:
        if "images_per_s" not in r:
            print(f"{r['name']:<40}  {r['status']}")
            continue
        mem = f"{r['peak_bytes'] / 2**30:.1f}" if "peak_bytes" in r else "-"
        ratio = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
        steps = f"{r['step_ms']:.1f} ({r['step_ms_q20']:.1f}-{r['step_ms_q80']:.1f})"
        backends = ",".join(f"{k}={v}" for k, v in r["backends"].items())
        busy = f"{r['gpu_busy']:.0%}" if "gpu_busy" in r else "-"
        host = f"{r['host_ms']:.1f}" if "host_ms" in r else "-"  # JSON of runs before the column
        rate, speedup = gpu.get(r["name"], (None, None))
        on_gpu = "-" if rate is None else f"{rate:.1f} ({ratio(speedup)} base)"
        print(f"{r['name']:<40}{r['batch']:>6}{r['images_per_s']:>9.1f}{steps:>26}{host:>8}{mem:>10}"
              f"{ratio(r['speedup_vs_baseline']):>8}{ratio(r['speedup_vs_plain_pytorch']):>8}"
              f"{r['mfu_measured_peak']:>7.1%}{r['mfu_h100_nominal']:>8.1%}{busy:>6}{on_gpu:>22}  {backends} {r.get('note', '')}")
    if any(r.get("gpu_busy", 0) > 1 for r in rows):  # JSON of runs that timed the profiled step apart
        print("busy over 100%: that row's profiled step ran slower than its timed steps' median")


def plot(rows, path, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    names = [r["name"] for r in rows][::-1]
    rates = [r.get("images_per_s", 0.0) for r in rows][::-1]
    colors = ["tab:gray" if n in PLAIN_ROWS else "tab:blue" for n in names]
    bars = ax.barh(names, rates, color=colors)
    gpu = gpu_time_rates(rows)
    for bar, r in zip(bars, rows[::-1]):
        label = f" {r['speedup_vs_baseline']:.2f}x" if r.get("speedup_vs_baseline") else f" {r['status']}"
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=8)
    ticks = [(gpu[n][0], i) for i, n in enumerate(names) if n in gpu]
    if ticks:
        ax.plot(*zip(*ticks), "k|", markersize=12, label="rate in GPU time (--profile): no host stalls")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("images / s (higher is better)")
    ax.set_title(f"SD2 UNet training, {meta['resolution']} px, world {meta['world']}, {meta['device']}", fontsize=9)
    save_plot(fig, path, meta)


# --- main ---------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/local")
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU: seconds (automatic without a GPU)")
    p.add_argument("--count-flops", action="store_true", help="count the UNet's FLOPs per image and exit")
    p.add_argument("--print-table", metavar="JSON", help="print the table of a bench_train.json (a run cut short "
                   "before its final table still wrote one after each row) and exit")
    p.add_argument("--resolution", type=at_least(8), default=None, help="image side in px, a multiple of 8 "
                   "(default 256; tiny: 64)")
    p.add_argument("--batch", type=at_least(1), default=None, help="micro-batch per GPU (default 32 at 256 px, 8 at 512)")
    p.add_argument("--steps", type=at_least(1), default=10, help="timed steps per row (default 10; tiny: 2)")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps per row (compile, autotune, state; "
                   "default 3; tiny: 1)")
    p.add_argument("--images", type=at_least(1), default=512, help="generated JPEGs (1024x768, quality 90; default 512)")
    p.add_argument("--workers", type=at_least(0), default=None, help="PIL worker processes / DALI threads per rank")
    p.add_argument("--ema-fraction", type=float, default=0.035, help="share of steps with a scheduled EMA")
    p.add_argument("--vae", help="local VAE folder (default: random SD2-size VAE)")
    p.add_argument("--text-encoder", help="local text encoder folder (default: random SD2-size CLIP text model)")
    p.add_argument("--rows", nargs="+", help="only these rows (names as printed); the baseline always runs "
                   "(and a larger micro-batch row needs the row above it for its memory estimate)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="the larger micro-batch rows' batch (default: sized from the memory of the row above "
                   "each): a --rows call can measure one without that row, e.g. a compiled plain PyTorch "
                   "row at the batch its eager run fitted")
    p.add_argument("--no-compile", action="store_true",
                   help="no torch.compile: the plain-PyTorch row without it, the + torch.compile row skipped")
    p.add_argument("--compile-mode", default="default",
                   choices=CHOICES["model.compile_mode"],
                   help="torch.compile mode of the compiled rows, ours and plain PyTorch's alike (the CUDA-graph "
                   "modes with the DDP wrapper every row has are untried: a row that fails says so); tiny: default")
    p.add_argument("--budget-s", type=float, default=None, help="skip rows that would start after this many seconds")
    p.add_argument("--profile", action="store_true",
                   help="profile 1 step per row for the GPU busy share in the table; rows named in --rows "
                   "(or --op-tables) 2 steps with their op tables in OUT/bench_train-profile/")
    p.add_argument("--op-tables", nargs="+", metavar="ROW",
                   help="with --profile: the rows whose op tables are written (default: those of --rows)")
    args = p.parse_args(argv)
    unknown = [name for name in (args.rows or []) + (args.op_tables or []) if name not in ROW_NAMES]
    if unknown:  # a misspelt row was skipped as "not in --rows": a GPU call measured the baseline alone
        p.error(f"no row named {', '.join(map(repr, unknown))}; the rows: {', '.join(map(repr, ROW_NAMES))}")
    if args.resolution is not None and args.resolution % 8:
        p.error(f"argument --resolution: must be a multiple of 8 (the VAE's downsampling), got {args.resolution}")
    return args


def setup(args):
    """Fills in defaults; returns (run config, world, rank, device)."""
    gpu = torch.cuda.is_available()
    args.tiny = args.tiny or not (gpu or args.count_flops)  # counting runs on the meta device
    cfg = load_config(ROOT / "configs" / ("tiny.yaml" if args.tiny else "sd2-base.yaml"))
    args.encoders_name = "tiny" if args.tiny else "sd2"
    cfg["model"]["vae"] = {"path": args.vae} if args.vae else {"preset": args.encoders_name}
    cfg["model"]["text_encoder"] = {"path": args.text_encoder} if args.text_encoder else {"preset": args.encoders_name}
    if args.vae or args.text_encoder:
        args.encoders_name = "local"
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if gpu else torch.device("cpu")
    if args.tiny:
        args.resolution = args.resolution or 64
        args.batch = args.batch or 4
        args.steps, args.warmup, args.images = min(args.steps, 2), min(args.warmup, 1), min(args.images, 8)
        args.workers = 0 if args.workers is None else args.workers  # no worker start-up per epoch
        args.image_size = (160, 120)
    else:
        args.resolution = args.resolution or 256
        args.batch = args.batch or (32 if args.resolution <= 256 else 8)
        args.workers = args.workers or max(1, min(16, (os.cpu_count() or 2) // world))
        args.image_size = (1024, 768)
    # tiny: dynamo's graph capture only; inductor's compile alone would take minutes
    args.compile_backend = "eager" if args.tiny else "inductor"
    args.cache = cache_root()
    args.profile_dir = Path(args.out) / "bench_train-profile"
    w, h = args.image_size
    # same folder name as bench_data.py's, so run_gpu.sh generates the JPEGs once
    args.jpegs = args.cache / f"bench-jpegs-{args.images}-{w}x{h}"
    return cfg, world, rank, device


def past_budget(local, device):
    """Whether any rank is past the time budget: every rank must skip the same rows."""
    flag = torch.tensor([float(local)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def init_process_group(world, device):
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1:
        dist.init_process_group(backend)
    else:  # one process: a private in-memory store, no ports
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def main(argv=None):
    args = parse_args(argv)
    if args.print_table:
        rows = json.loads(Path(args.print_table).read_text())["rows"]
        print_table(rows)
        return rows
    cfg, world, rank, device = setup(args)
    unet_cfg = cfg["model"]["unet"]
    if args.count_flops:
        for res in ([args.resolution] if args.tiny else [256, 512]):
            gflop = count_flops(unet_cfg, res) / 1e9
            print(f"UNet forward+backward at {res} px: {gflop:,.1f} GFLOP per image (FlopCounterMode, meta device)")
        return
    threads = torch.get_num_threads()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:  # tiny shapes gain nothing from threads, and spinning threads crawl on a busy machine
        torch.set_num_threads(1)
    init_process_group(world, device)
    try:
        return run(args, cfg, world, rank, device)
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)


def run(args, cfg, world, rank, device):
    unet_cfg = cfg["model"]["unet"]
    is_main = rank == 0
    t_start = time.perf_counter()
    out = output_dir(args.out) if is_main else Path(args.out)
    if is_main:
        make_dataset(args.jpegs, args.images, *args.image_size)
    dist.barrier()

    gflop_known = SD2_GFLOP_PER_IMAGE.get(args.resolution) if not args.tiny else None
    flops_per_image = gflop_known * 1e9 if gflop_known else count_flops(unet_cfg, args.resolution)
    peak = measured_peak_tflops(device)
    meta = {
        "benchmark": "SD2 UNet training throughput: baseline -> our recipe (cumulative), plain PyTorch best",
        **run_meta(device), "world": world, "resolution": args.resolution, "base_batch": args.batch, "tiny": args.tiny,
        "steps": args.steps, "warmup": args.warmup, "ema_fraction": args.ema_fraction,
        "encoders": args.encoders_name, "workers": args.workers, "gflop_per_image": flops_per_image / 1e9,
        "gflop_formula": "UNet forward+backward per image, torch.utils.flop_counter (matmul/conv/attention)",
        "peak_tflops_measured": peak, "peak_formula": "2*8192^3 / time of an 8192^3 bf16 matmul (do_bench)",
        "nominal_tflops": H100_SXM_BF16_TFLOPS, "timing": "steps back to back, each timed between CUDA events (wall time on a CPU), median, q20/q80",
    }
    if is_main:
        print(f"{meta['device']}, world {world}, {args.resolution} px, micro-batch {args.batch}, "
              f"{flops_per_image / 1e9:,.0f} GFLOP/image, measured peak {peak:,.0f} TFLOP/s")
    shared = Shared(args, cfg, world, rank, device)

    plan = row_plan(args, device)
    rows = [{"name": name, "status": "not measured: the run stopped before this row"} for name, *_ in plan]
    # Headline rows first, so a run cut by its time budget still has the comparisons that matter;
    # then precomputed latents and the row above it (encoding online, the same UNet: issue #9's
    # comparison); then ours with CUDA graphs; then the rest of the ladder, in order.
    latents = next(i for i, row in enumerate(plan) if row[0] == "+ precomputed latents")
    above = max((i for i in range(latents) if not plan[i][2]), default=latents)
    first = [*HEADLINE, plan[above][0], plan[latents][0], GRAPHED[0]]
    order = sorted(range(len(plan)), key=lambda i: first.index(plan[i][0]) if plan[i][0] in first else len(first))
    for i in order:
        name, this, reason, note = plan[i]
        row = rows[i]
        del row["status"]
        if reason:
            row["status"] = f"skipped: {reason}"
        elif args.rows and name != "baseline" and name not in args.rows:
            row["status"] = "skipped: not in --rows"
        elif args.budget_s is not None and past_budget(time.perf_counter() - t_start > args.budget_s, device):
            row["status"] = f"skipped: time budget of {args.budget_s:.0f} s spent"
        else:
            t_row = time.perf_counter()
            row.update(measure(this, name, rows[:i], shared))
            row["row_s"] = time.perf_counter() - t_row  # what a budget must allow for this row
        if note and "status" not in row:
            row["note"] = note
        row["recipe"] = dataclasses.asdict(this)
        add_ratios(rows, flops_per_image, peak)
        if is_main:
            phases = "".join(f", {k} {v:.0f}" for k, v in row.get("phases_s", {}).items())
            status = row.get("status") or f"{row['images_per_s']:.1f} img/s ({row['row_s']:.0f} s{phases})"
            print(f"  {name}: {status}", flush=True)
            (out / "bench_train.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
            plot(rows, out / "bench_train.png", meta)

    if is_main:
        print()
        print_table(rows)
        print(f"wrote {out / 'bench_train.json'} and {out / 'bench_train.png'}")
    return rows


if __name__ == "__main__":
    failed = [row["name"] for row in main() or [] if row.get("status", "").startswith("failed")]
    if failed:  # a nonzero exit: run_gpu.sh's summary shows the step failed
        sys.exit(f"{len(failed)} rows failed: {', '.join(failed)}")
