r"""Train a text-to-image latent diffusion UNet (the main job).

    # the tiny default on the built-in Creative-Commons images, 2 CPU processes
    torchrun --standalone --nproc_per_node=2 trainer/train.py
    # one GPU / eight GPUs on one node, SD2-base at 256 px on your own folder
    torchrun --standalone --nproc_per_node=8 trainer/train.py --config configs/sd2-base.yaml data.path=/data/cc
    # two nodes: run on each (out_dir and data.path on a file system both share; README.md)
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 --nproc_per_node=8 --rdzv-id=JOB \
        --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --max-restarts=3 trainer/train.py --config configs/sd2-base.yaml

Any config key can be overridden as key=value (train.steps=1000 data.backend=dali ...).
Running again with the same out_dir resumes from its latest checkpoint; resume=false starts
over, moving the earlier run's files to out_dir/earlier_runs/. An elastic restart by torchrun
resumes the same way (after resume=false too: it resumes the run that started over).
"""
import argparse
import contextlib
import datetime
import logging
import math
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `torchrun trainer/train.py` from a checkout

import cckernels as ck  # noqa: E402
from trainer import checkpoint, config, data, diffusion, encoders  # noqa: E402
from trainer.ddp import DistributedDataParallel  # noqa: E402
from trainer.ema import ScheduledEMA  # noqa: E402
from trainer.export import save_export  # noqa: E402
from trainer.graphs import graph_on_first_call  # noqa: E402
from trainer.metrics import open_for_append as open_metrics, plot as plot_metrics, record as metrics_record  # noqa: E402
from trainer.sample import sample_images, save_grid  # noqa: E402
from trainer.unet import UNet, config_differences, per_block  # noqa: E402

logger = logging.getLogger("trainer.train")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    return p.parse_intermixed_args(argv)  # overrides before --config too


# torch.compile modes that replay the compiled forward and backward as CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _compile_args(model_cfg, world, grad_accum):
    """torch.compile's keyword arguments for model.compile / model.compile_mode, or None."""
    backend = {True: "inductor", False: None}.get(model_cfg["compile"], model_cfg["compile"])
    mode = model_cfg["compile_mode"]
    if mode != "default" and backend != "inductor":
        raise ValueError(f"model.compile_mode={mode} is an inductor mode: it needs model.compile=true, "
                         f"got model.compile={model_cfg['compile']!r}")
    # CUDA graphs free a step's graph outputs when the next step's forward replays. Gradients
    # that outlive a step, as accumulated ones do (grad_accum > 1, and our DDP's no_sync()),
    # are then at risk; one step with our DDP is plausible (its hooks and all-reduces run
    # eagerly after the replayed backward, outside the graphs) but no multi-GPU run checked it.
    if mode in CUDA_GRAPH_MODES and (world > 1 or grad_accum > 1):
        raise ValueError(f"model.compile_mode={mode} (CUDA graphs) is supported on one process without "
                         f"gradient accumulation (got world size {world}, train.grad_accum={grad_accum}); "
                         "use default or max-autotune-no-cudagraphs")
    if backend is None:
        return None
    return {"backend": backend} if mode == "default" else {"backend": backend, "mode": mode}


def _check_cuda_graphs(cfg, device):
    """Raise where train.cuda_graphs cannot hold (trainer/graphs.py says why)."""
    tc, mc = cfg["train"], cfg["model"]
    if not tc["cuda_graphs"]:
        return
    clashes = {"a CUDA device": device.type != "cuda", "train.grad_accum=1": tc["grad_accum"] > 1,
               "model.gradient_checkpointing=false": mc["gradient_checkpointing"], "model.compile=false": mc["compile"]}
    needed = [name for name, clash in clashes.items() if clash]
    if needed:
        raise ValueError(f"train.cuda_graphs=true needs {' and '.join(needed)} (trainer/graphs.py says why)")


def latents_encoders(model_cfg, recorded, latents_path, log):
    """model.vae and model.text_encoder for a run on precomputed latents (its samples and its
    exported pipeline): the configured ones, or where a section is empty, the ones that made
    the latents (recorded in their index); a configured one unlike those gets a warning."""
    chosen = {}
    for name, theirs in recorded.items():
        mine = model_cfg[name]
        if not mine:
            log(f"model.{name}: the one that encoded {latents_path}: {theirs}")
        elif encoders.resolve_preset(mine, name) != encoders.resolve_preset(theirs, name):
            log(f"warning: model.{name} {mine} is not the {theirs} that encoded {latents_path}: "
                "samples and the exported pipeline will not condition as training did")
        chosen[name] = mine or theirs
    return chosen


# What a resumed run may change without a word (where and how long it runs, what it logs and
# samples), and what it may not: another network or objective on the saved weights.
FREE_ON_RESUME = ("out_dir", "resume", "train.steps", "train.log_every", "train.max_bad_steps", "train.deterministic",
                  "train.cuda_graphs", "checkpoint.", "sample.", "data.workers", "model.compile", "model.init_from")
FIXED_ON_RESUME = ("model.unet", "diffusion.prediction_type")


def check_resumable(saved, cfg, path, log):
    """ValueError where the run's config changes what the checkpoint at `path` trained (its
    UNet or prediction type); logs the other changes."""
    def described(key, old, new):  # a whole section (model.unet) by the keys that differ in it
        if isinstance(old, dict) and isinstance(new, dict):
            return "; ".join(described(f"{key}.{k}", old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
                             if old.get(k) != new.get(k))
        return f"{key}: {old!r} -> {new!r}"

    changed = config.changes(saved, cfg)
    fixed = [described(*c) for c in changed if c[0] in FIXED_ON_RESUME]
    if fixed:
        raise ValueError(f"{path} was trained otherwise ({'; '.join(fixed)}): resuming would train another network "
                         f"or objective on its weights. resume=false starts over (setting the run aside); "
                         f"model.init_from={path} in a new out_dir starts from its weights")
    noted = [described(*c) for c in changed if not c[0].startswith(FREE_ON_RESUME)]
    if noted:
        log("resuming with changed settings: " + "; ".join(noted))


def check_encoders_fit(unet_config, text_width, vae, resolution):
    """ValueError unless the UNet takes the text encoder's embeddings and the VAE's latents, at
    data.resolution (a real text encoder on the tiny UNet failed in the first step, inside a
    matmul)."""
    dims = unet_config["cross_attention_dim"]
    if any(d != text_width for d in per_block(dims, len(unet_config["block_out_channels"]))):
        raise ValueError(f"model.text_encoder gives {text_width}-wide embeddings but model.unet's "
                         f"cross_attention_dim is {dims}: use a UNet config made for this text encoder "
                         "(configs/sd2-base.yaml for SD2's)")
    if vae is not None and vae.config.latent_channels != unet_config["in_channels"]:
        raise ValueError(f"model.vae gives {vae.config.latent_channels}-channel latents but model.unet's "
                         f"in_channels is {unet_config['in_channels']}")
    if vae is not None:
        encoders.check_resolution(resolution, vae, "data.resolution")


def main(argv=None):
    args = parse_args(argv)
    cfg = config.load(args.config, args.overrides)
    rank = int(os.environ.get("RANK", 0))
    # Rank 0 holds out_dir's lock for the whole run: a second run there would resume from this
    # one's checkpoints, and the two would prune each other's.
    lock = checkpoint.run_lock(cfg["out_dir"]) if rank == 0 else contextlib.nullcontext()
    with lock, logging_to(cfg["out_dir"], rank):  # a refused second run writes nothing in the first's log
        train(cfg)


@contextlib.contextmanager
def logging_to(out_dir, rank):
    """The run's logging, while it runs: records above the progress bar, stamped HH:MM:SS, and on
    rank 0 appended to out_dir/train.log too (a resume goes on in the same file), dated. Rank 0
    logs from INFO: the trainer's lines, why cckernels could not take an input (once per reason),
    what the data pipeline found and skipped; the other ranks only what they warn about."""
    is_main = rank == 0
    fmt = f"%(asctime)s rank {rank} %(name)s: %(message)s"
    handlers = [_TqdmHandler()]
    handlers[0].setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    if is_main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(out_dir) / "train.log"))  # mode "a"
        handlers[1].setFormatter(logging.Formatter(fmt))
    for name in ("trainer.train", "cckernels", "trainer.data", "trainer.checkpoint"):
        logging.getLogger(name).setLevel(logging.INFO if is_main else logging.WARNING)
    logging.getLogger("trainer.encoders").setLevel(logging.WARNING if is_main else logging.ERROR)  # said once
    root = logging.getLogger()  # at WARNING: other libraries' warnings too
    for handler in handlers:
        root.addHandler(handler)
    try:
        yield
    except BaseException as e:  # why the run stopped, in the log (the console has it from cli)
        if is_main:
            try:
                interrupted = _interrupted(e)
            except KeyboardInterrupt:  # a Ctrl-C still pending runs its handler here
                interrupted = True
            handlers[1].handle(_stop_record(e, interrupted))
        raise
    finally:  # train.main may run again in this process (tests), with another out_dir
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()


def train(cfg):
    out_dir = Path(cfg["out_dir"])
    if cfg["train"]["deterministic"]:
        # cuBLAS is deterministic only with a fixed workspace, set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)

    # -- distributed setup: torchrun's environment variables ---------------------------------
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # Every step has the same shapes: cuDNN's per-shape algorithm search pays off after the
        # first one (bench_train measures with it); its pick may differ between runs.
        torch.backends.cudnn.benchmark = not cfg["train"]["deterministic"]
    else:
        device = torch.device("cpu")
    compile_args = _compile_args(cfg["model"], world, cfg["train"]["grad_accum"])
    _check_cuda_graphs(cfg, device)
    if world > 1:
        # a wrong WORLD_SIZE waits here for ranks that never come
        logger.info(f"waiting for {world} ranks at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=cfg["train"]["dist_timeout_s"]))
    is_main = rank == 0
    torch.manual_seed(cfg["seed"] + rank)  # each rank draws its own noise and timesteps
    # bf16: autocast on GPUs (on CPUs it would only be slower); bf16-weights: bf16 weights
    # (autocast then has no weight to cast) with fp32 masters in the optimizer, on any device.
    precision = cfg["train"]["precision"]
    autocast = precision == "bf16-weights" or (device.type == "cuda" and precision == "bf16")
    if device.type == "cpu":  # the cores this process may use (affinity, containers), shared by the ranks
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        # One process honours OMP_NUM_THREADS (torchrun sets it to 1 for several ranks, so there it is ours).
        threads = os.environ.get("OMP_NUM_THREADS", "") if local_ranks == 1 else ""
        torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else max(1, cores // local_ranks))

    log = logger.info  # rank 0's lines (logging_to)
    if world > 1:
        _check_shared_out_dir(out_dir, rank)
    if _restarts_may_fail():
        log("warning: torchrun --max-restarts without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment: "
            "a restart can fail to connect (pytorch/pytorch#135712) instead of resuming")

    # -- resume ------------------------------------------------------------------------------
    # resume=false starts over once: torchrun's restarts of this run still resume its checkpoints
    resume = cfg["resume"] or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if cfg["data"]["path"] != "builtin":  # before anything is set aside
        data.index.existing_data_path(cfg["data"]["path"])
    if not resume:  # the earlier run's checkpoints would outrank ours, and ours be pruned for them
        earlier = checkpoint.set_aside_earlier_run(out_dir) if is_main else None
        if earlier:
            log(f"resume=false: the earlier run's files in {out_dir} moved to {earlier}")
        _barrier(world)
    ckpt = _load_resumed(out_dir, rank, world) if resume else None
    ckpt_path = ckpt["path"] if ckpt else None
    start_step = ckpt["state"]["step"] if ckpt else 0
    if start_step > cfg["train"]["steps"]:
        raise ValueError(f"{ckpt_path} is at step {start_step}, past train.steps={cfg['train']['steps']}: raise "
                         "train.steps to train on, or resume=false to start over")
    log(f"resuming from {ckpt_path} at step {start_step}" if ckpt else f"starting from scratch in {out_dir}")
    if start_step == cfg["train"]["steps"]:  # a finished run run again (raise train.steps to train on)
        log(f"nothing to train: already at train.steps={start_step}; the last samples and the export are made again")
    if ckpt and ckpt["state"].get("world", world) != world:  # allowed: the epoch's order is split anew
        log(f"resuming on {world} ranks; the checkpoint was written on {ckpt['state']['world']}: "
            f"{world * cfg['train']['batch_size'] * cfg['train']['grad_accum']} images a step now")

    # -- data --------------------------------------------------------------------------------
    batch, accum = cfg["train"]["batch_size"], cfg["train"]["grad_accum"]
    loader = data.make_loader(
        cfg["data"], batch, rank=rank, world_size=world, seed=cfg["seed"], device=device,
        start=data_start(ckpt["state"]) if ckpt else (0, 0), out_dir=out_dir if is_main else None,
    )
    batches = iter(loader)
    if ckpt and ckpt["state"].get("samples", len(loader.index)) != len(loader.index):
        log(f"the data holds {len(loader.index)} samples, {ckpt['state']['samples']} when {ckpt_path} was written: "
            "this epoch's order is drawn anew")
    latents_format = cfg["data"]["format"] == "latents"
    # Frozen encoders: they encode each batch (unless latents were precomputed) and, on rank 0,
    # the sample prompts and images; ranks training on latents need neither.
    vae = text_encoder = None
    if not latents_format or is_main:
        if latents_format:  # then the checkpoints' config names them: trainer.sample loads those
            cfg["model"].update(latents_encoders(cfg["model"], loader.encoders, cfg["data"]["path"], log))
        vae = encoders.load_vae(cfg["model"]["vae"], device)
        text_encoder = encoders.load_text_encoder(cfg["model"]["text_encoder"], device)
    # Caption dropout's empty caption, from the same encoder that made the training embeddings.
    empty_ctx = loader.empty_embedding if latents_format else text_encoder.empty_embedding().to(device)

    # -- model, optimizer, EMA -----------------------------------------------------------------
    # The same initial weights on every rank, not only after DDP's broadcast: bf16-weights'
    # fp32 masters are taken (cast_params_) before DDP wraps the model, and the EMA may start.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        unet = UNet.from_config(cfg["model"]["unet"]).to(device)
    if latents_format:  # what the UNet gets on every rank: the latents (model.vae is rank 0's, for samples)
        channels = loader.index.meta["latent_shapes"][str(cfg["data"]["resolution"])][0]
        if channels != unet.config["in_channels"]:
            raise ValueError(f"the latents in {cfg['data']['path']} have {channels} channels but model.unet's "
                             f"in_channels is {unet.config['in_channels']}")
    check_encoders_fit(unet.config, empty_ctx.shape[-1], vae, cfg["data"]["resolution"])
    if vae is not None:  # sample_size is only diffusers' default resolution: the exports say this run's
        latent_size = cfg["data"]["resolution"] // encoders.vae_downsampling(vae)
        if unet.config["sample_size"] != latent_size:
            log(f"model.unet.sample_size {unet.config['sample_size']} written as {latent_size} in the exported "
                f"UNet configs: the latent size of data.resolution {cfg['data']['resolution']}")
            unet.config["sample_size"] = unet.sample_size = latent_size
    if cfg["model"]["channels_last"]:
        unet = unet.to(memory_format=torch.channels_last)
    if cfg["model"]["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    init_from = cfg["model"]["init_from"]
    if ckpt:
        check_resumable(ckpt["config"], cfg, ckpt_path, log)
        unet.load_state_dict(ckpt["unet"])  # fp32 weights, whatever the saving run's precision
        if init_from:
            log(f"model.init_from={init_from} ignored: resuming this run's own checkpoint")
    elif init_from:
        weights, trained_for = checkpoint.init_weights(init_from)
        try:
            unet.load_diffusers(weights)
        except ValueError as e:  # a key or shape that model.unet's config does not have
            raise ValueError(f"model.init_from={init_from} ({weights}) does not fit model.unet: {e}") from None
        log(f"UNet weights from {weights}")
        trained_as = checkpoint.weights_unet_config(weights)
        differences = config_differences(unet.config, trained_as) if trained_as else []
        if differences:  # e.g. another head count: the same shapes, another network
            log("warning: those weights were trained with another UNet config: " + "; ".join(
                f"{key} {theirs!r} there, {ours!r} here" for key, theirs, ours in differences))
        if trained_for not in (None, cfg["diffusion"]["prediction_type"]):  # e.g. SD2-768's v_prediction
            log(f"warning: those weights were trained to predict {trained_for}, this run trains them to predict "
                f"{cfg['diffusion']['prediction_type']} (diffusion.prediction_type)")
    tc = cfg["train"]
    optimizer = ck.FusedAdamWEMA(unet.parameters(), lr=tc["lr"], betas=tuple(tc["betas"]), weight_decay=tc["weight_decay"])
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"]["optimizer"])
    if precision == "bf16-weights":  # before DDP, which buckets the grads by their dtype
        optimizer.cast_params_(torch.bfloat16, unet.bf16_weight_params())
    ema = ScheduledEMA(unet, decay=cfg["ema"]["decay"], start_step=cfg["ema"]["start_step"],
                       every=cfg["ema"]["every"], warmup=cfg["ema"]["warmup"], optimizer=optimizer)
    if ckpt:
        ema.load_state_dict(ckpt["optimizer"]["ema"], ckpt["ema"])
        if ema.state_tensors() is not None and cfg["ema"]["start_step"] > start_step:  # a later start, resumed
            log(f"warning: the EMA started before step {start_step} is kept, and not updated until ema.start_step="
                f"{cfg['ema']['start_step']} (resume=false restarts it there)")
        if ckpt["rng"] is not None:
            checkpoint.set_rng_state(ckpt["rng"])
        else:  # a rank the saving run did not have
            logger.warning(f"{ckpt_path} holds no RNG state for this rank; noise and timesteps "
                           "will not repeat the saved run's")
    if tc["cuda_graphs"]:
        graph_on_first_call(unet)  # captured in the first step, after loading and casting above
    # the compiled forward shares unet's parameters; checkpoints and EMA keep using unet
    model = torch.compile(unet, **compile_args) if compile_args else unet
    model = DistributedDataParallel(model) if world > 1 else model
    warmup = max(1, tc["warmup_steps"])
    lr_at = lambda step: tc["lr"] * min(1.0, (step + 1) / warmup)  # noqa: E731  linear warm-up, then constant
    schedule = diffusion.NoiseSchedule().to(device)
    dc = cfg["diffusion"]

    n_params = sum(p.numel() for p in unet.parameters())
    weights = ""
    if precision == "bf16-weights":
        weights = ", bf16 weights with fp32 masters in the optimizer"
        weights += f" (grads add up in bf16 over the {accum} micro-batches)" if accum > 1 else ""
    log(f"world {world} x batch {batch} x accum {accum} = {world * batch * accum} images/step, "
        f"{n_params / 1e6:.1f}M UNet parameters, device {device}, autocast bf16: {autocast}"
        + (" (LayerNorm in bf16 too)" if autocast else "") + weights
        + (", the UNet's forward and backward as CUDA graphs (captured in the first step)" if tc["cuda_graphs"] else "")
        + (", the UNet under torch.compile (" + ", ".join(f"{k}={v}" for k, v in compile_args.items())
           + "; the first step compiles)" if compile_args else ""))
    log("kernel backends usable, best first: "
        + "; ".join(f"{op}: {', '.join(names)}" for op, names in ck.available_backends(device).items())
        + f" (CCKERNELS_BACKEND={os.environ.get('CCKERNELS_BACKEND', 'unset')})")

    # -- training loop ---------------------------------------------------------------------------
    data_wait = 0.0  # seconds spent waiting for batches: near the run's time, the data is the bottleneck

    def train_step(step):
        nonlocal data_wait
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step)
        total = torch.zeros((), device=device)
        for micro in range(accum):
            t = time.perf_counter()
            images, captions = next(batches)
            data_wait += time.perf_counter() - t
            with torch.no_grad():
                if latents_format:
                    latents, ctx = images.to(device), captions.to(device)
                else:
                    latents = encoders.encode_images(vae, images.to(device))
                    ctx = text_encoder.encode(captions)
                ctx = diffusion.drop_captions(ctx, empty_ctx, dc["caption_dropout"])
            with model.no_sync() if world > 1 and micro < accum - 1 else contextlib.nullcontext():
                # a CUDA graph keeps no autocast weight cache (make_graphed_callables refuses one)
                with torch.autocast(device.type, torch.bfloat16, enabled=autocast, cache_enabled=not tc["cuda_graphs"]):
                    loss = diffusion.training_loss(model, schedule, latents, ctx, prediction_type=dc["prediction_type"],
                                                   min_snr_gamma=dc["min_snr_gamma"])
                (loss / accum).backward()
            total += loss.detach() / accum
        if world > 1:  # the logged loss is the global batch's, not rank 0's share of it
            dist.all_reduce(total)
            total /= world
        grad_norm = ck.clip_grad_norm_(unet.parameters(), tc["grad_clip"])
        # The step's one wait for the GPU: loss and grad norm come back together before the
        # optimizer is launched (an .item() per micro-batch idled the GPU at each, and one after
        # optimizer.step() waited for the optimizer too). Grads are all-reduced: every rank agrees.
        mean_loss, norm = torch.stack([total, grad_norm.float()]).tolist()
        finite = math.isfinite(norm)
        if finite:
            optimizer.step()
            ema.step()
        optimizer.zero_grad(set_to_none=True)
        return mean_loss, norm, finite

    def fp32_weights():  # the UNet's state_dict, with the optimizer's fp32 masters of bf16 weights
        names = (n for n, _ in unet.named_parameters())
        return {**unet.state_dict(), **dict(zip(names, optimizer.master_weights()))}

    def save(step):
        if is_main:
            checkpoint.begin(out_dir, step)
        _barrier(world)
        checkpoint.save_rank_rng(out_dir, step, rank)
        _barrier(world)
        if is_main:
            state = {"step": step, "data_position": list(loader.position()), "bad_steps": bad_steps, "world": world,
                     "samples_per_epoch": loader.samples_per_epoch, "samples": len(loader.index)}
            path = checkpoint.commit(
                out_dir, step, unet=fp32_weights(), ema=ema.state_tensors(), config=cfg,
                optimizer={"optimizer": optimizer.state_dict(ema=False, master=False), "ema": ema.state_dict()},
                state=state, keep=cfg["checkpoint"]["keep"], diffusers_config=unet.diffusers_config(),
            )
            try:  # the plot is a convenience: never the reason a run stops
                plot = plot_metrics(metrics.name, out_dir / "metrics.png")
            except Exception as e:
                plot = f"not drawn ({type(e).__name__}: {e})"
            log(f"step {step}: checkpoint {path}" + (f", loss plot {plot}" if plot else ""))
        _barrier(world)

    def samples(step):
        if is_main:
            sc = cfg["sample"]
            with ema.swapped_in():
                images = sample_images(unet, vae, text_encoder, sc["prompts"], resolution=cfg["data"]["resolution"],
                                       n=sc["n"], steps=sc["steps"], guidance=sc["guidance"], seed=sc["seed"],
                                       prediction_type=dc["prediction_type"], schedule=schedule)
            path = save_grid(images, out_dir / "samples" / f"step_{step:07d}.png", rows=len(sc["prompts"]),
                             labels=sc["prompts"])
            log(f"step {step}: samples {path}" + ("" if torch.isfinite(images).all() else
                " (warning: they hold NaN or inf, drawn black: the weights diverged)"))
        _barrier(world)

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = open_metrics(out_dir / "metrics.jsonl") if is_main else None
    steps = tc["steps"]
    bad_steps = ckpt["state"]["bad_steps"] if ckpt else 0
    # Redirected to a file, the bar writes a line every minute, not ~10 a second.
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, disable=not is_main, desc="train",
               mininterval=0.1 if sys.stderr.isatty() else 60)
    interval, rates = [], {}  # rank 0: (loss, taken) of the steps since the last metrics record; its rates
    last_record = (time.perf_counter(), data_wait, start_step)  # when, the data wait and step then
    for step in bar:
        loss, grad_norm, finite = train_step(step)
        bad_steps = 0 if finite else bad_steps + 1
        if not finite:
            log(f"step {step + 1}: non-finite gradients (loss {loss}), step skipped ({bad_steps} in a row)")
            if bad_steps >= tc["max_bad_steps"]:
                raise RuntimeError(f"{bad_steps} consecutive steps with non-finite loss or gradients; stopping")
        done = step + 1
        if is_main:
            interval.append((loss, finite))
            if done % tc["log_every"] == 0 or done == steps:  # each a mean over the steps since the last record
                taken = [x for x, ok in interval if ok]
                now, wait_then, step_then = last_record
                seconds = time.perf_counter() - now
                images_per_s = world * batch * accum * (done - step_then) / seconds
                data_share = (data_wait - wait_then) / seconds
                metrics.write(metrics_record(step=done, steps=len(interval), loss=sum(taken) / len(taken) if taken
                                             else math.nan, grad_norm=grad_norm, lr=lr_at(step),
                                             images_per_s=images_per_s, data_wait=data_share,
                                             skipped=len(interval) - len(taken), time=round(time.time(), 1)))
                metrics.flush()
                rates = {"img_s": f"{images_per_s:.1f}", "data_wait": f"{data_share:.0%}"}
                interval, last_record = [], (time.perf_counter(), data_wait, done)
            bar.set_postfix(loss=f"{loss:.4f}", **rates, refresh=False)
        if done == start_step + 1:
            calls = ck.backend_calls().items()
            log("kernel calls by backend so far: "
                + ", ".join(f"{op}=" + " + ".join(f"{b} x{n}" for b, n in counts.items()) for op, counts in calls)
                + (" (under torch.compile: the calls traced, each backend's choice for the graph)" if compile_args else ""))
        if done % cfg["checkpoint"]["every"] == 0 or done == steps:
            save(done)
        if cfg["sample"]["every"] and done % cfg["sample"]["every"] == 0 and done != steps:
            samples(done)

    if is_main:  # the export first: it must not depend on the last sample grid working
        ema_weights = ema.state_tensors()
        final = {**fp32_weights(), **(ema_weights or {})}
        bad = checkpoint.nonfinite(final)
        if bad:
            log(f"warning: {len(bad)} of the final UNet's tensors hold NaN or inf ({', '.join(bad[:3])}): the run "
                "diverged and its export is unusable; an earlier checkpoint may not be (trainer.sample refuses them)")
        why_not = save_export(out_dir / "diffusers", unet, vae, text_encoder, schedule, dc["prediction_type"], final)
        which = "EMA" if ema_weights else f"trained (the EMA starts at step {cfg['ema']['start_step']})"
        summary = (f"done: checkpoints in {checkpoint.checkpoint_dir(out_dir)}, "
                   + (f"diffusers UNet in {out_dir / 'diffusers' / 'unet'} (no whole pipeline: {why_not})" if why_not
                      else f"diffusers pipeline (StableDiffusionPipeline.from_pretrained) in {out_dir / 'diffusers'}")
                   + f", with the {which} weights")
    samples(steps)
    if is_main:
        log(summary)
    if world > 1:
        dist.destroy_process_group()


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        tqdm.write(self.format(record))
        sys.stdout.flush()  # a pipe under torchrun: "waiting for N ranks" is seen while it waits


def _stop_record(e, interrupted):
    """The log record saying why a run stopped: Ctrl-C, a mistake (as cli says it) or a bug (with
    its traceback)."""
    if interrupted:
        level, msg, exc_info = logging.WARNING, "stopped: interrupted (Ctrl-C); " + INTERRUPTED, None
    elif isinstance(e, USER_ERRORS):
        level, msg, exc_info = logging.ERROR, f"stopped: train.py: error: {e}", None
    else:
        level, msg, exc_info = logging.ERROR, f"stopped by a bug: {type(e).__name__}: {e}", (type(e), e, e.__traceback__)
    return logger.makeRecord(logger.name, level, __file__, 0, msg, (), exc_info)


def _restarts_may_fail():
    """Whether torchrun restarts this run's ranks through the rendezvous' shared TCP store, where
    a restarted rank can read the previous attempt's address and fail in init_process_group."""
    return (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1")


def _check_shared_out_dir(out_dir, rank):
    """Every rank reads and writes checkpoints in out_dir: on several nodes it must be one folder
    they share (a network file system). Checked now, not at the first checkpoint."""
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token)
    path = out_dir / ".shared_check"
    if rank == 0:
        path.write_text(token[0])
    dist.barrier()
    try:
        seen = path.read_text()
    except OSError:
        seen = None
    dist.barrier()
    if rank == 0:
        path.unlink()
    if seen != token[0]:
        raise OSError(f"rank {rank} on {socket.gethostname()} cannot see {path.resolve()}, which rank 0 wrote: "
                           "out_dir must be one folder every node shares (a network file system), as data.path")


def _barrier(world):
    if world > 1:
        dist.barrier()


def _load_resumed(out_dir, rank, world):
    """The checkpoint to resume from, or None. Rank 0 picks it (the newest intact one) and the
    others load the same one, checking it again: picking their own, a rank that sees a file
    damaged where rank 0 does not (another node's view of a network file system) would resume
    from another step."""
    ckpt = checkpoint.load_newest_intact(out_dir, rank) if rank == 0 else None
    if world > 1:
        picked = [ckpt["path"] if ckpt else None]
        dist.broadcast_object_list(picked)
        if rank != 0 and picked[0] is not None:
            ckpt = checkpoint.load(picked[0], rank)
    return ckpt


def data_start(state):
    """The loader's start from a checkpoint's state: its position and, when recorded, how many
    samples a rank's epoch held then (another world size, batch size or data moves the position
    to the same share of the epoch)."""
    position = tuple(state["data_position"])
    return (*position, state["samples_per_epoch"]) if "samples_per_epoch" in state else position


# The command's mistakes (a config key or value; a file it names: the config, data.path, a
# checkpoint, out_dir) raise ValueError or OSError with a message naming what to change: the
# command says it once, without a traceback, and exits with argparse's status for a bad command
# line. Other exceptions are bugs and keep their traceback.
USER_ERRORS = (ValueError, OSError)
USER_ERROR_STATUS = 2
# A node's first rank says why the run failed. The others wait this long for torchrun to stop
# them when it exits: they have the same error (a config's), or one it caused (the collective
# they waited in with rank 0 fails as it exits), and their own exit first would have torchrun
# stop it before it had said anything. A rank still running after the wait says its own.
QUIET_RANK_WAIT_S = 10


INTERRUPTED = "the checkpoints written so far are intact; run the same command again to resume from the latest"
# Non-empty once this process got a Ctrl-C (SIGINT), as cli records it. Under torchrun every
# rank gets it, and a rank whose peer stopped first fails in a collective with that peer's
# "Connection closed" (a RuntimeError, not KeyboardInterrupt): that is a Ctrl-C too, not a bug.
_sigints = []


def _on_sigint(signum, frame):
    _sigints.append(signum)
    signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as before


def _interrupted(e):
    """Whether the exception `e` that stopped the run comes of a Ctrl-C."""
    return isinstance(e, KeyboardInterrupt) or bool(_sigints)


@contextlib.contextmanager
def _sigint_recorded():
    """_on_sigint as the SIGINT handler, where Python's own is (not where SIGINT is ignored)."""
    before = signal.getsignal(signal.SIGINT)
    mine = before is signal.default_int_handler
    if mine:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        if mine:
            signal.signal(signal.SIGINT, before)


def cli(argv=None):
    """main() as the command runs it: a mistake in one line and exit status 2, Ctrl-C in one line."""
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    _sigints.clear()
    with _sigint_recorded():
        try:
            try:
                main(argv)
            except Exception as e:
                if _interrupted(e):  # a pending Ctrl-C's handler may raise here instead: the same
                    raise KeyboardInterrupt from None
                if local_rank != 0:
                    time.sleep(QUIET_RANK_WAIT_S)
                if not isinstance(e, USER_ERRORS):
                    raise
                print(f"train.py: error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr, flush=True)
                sys.exit(USER_ERROR_STATUS)
        except KeyboardInterrupt:  # every rank gets the Ctrl-C: one line, from rank 0
            if rank == 0:
                print("\ninterrupted: " + INTERRUPTED, file=sys.stderr)
            sys.exit(130)


if __name__ == "__main__":
    cli()
