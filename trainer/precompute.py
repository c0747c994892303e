"""Encode a dataset once: VAE latents per resolution and text embeddings, for data.format=latents.

    python -m trainer.precompute --data DIR --vae PATH --text-encoder PATH --resolutions 256 512 --out DIR
    python -m trainer.precompute ... --text-encoder open_clip_pytorch_model.bin --open-clip ViT-H-14
    torchrun --standalone --nproc_per_node=8 -m trainer.precompute --data DIR ... --out DIR
    python -m trainer.precompute --config configs/sd2-base.yaml --out DIR   # data and encoders of a run
    python -m trainer.precompute --encoders tiny --data builtin --resolutions 64 --out DIR  # CPU, random

then train with `data.format=latents data.path=DIR data.resolution=256`.

Images are decoded by trainer.data (centre crop, no flip, every image exactly once per
resolution, each resized from the original) and
encoded with the VAE's posterior mean, times its scaling factor (trainer.encoders.encode_images);
captions (data.caption_field) with the text encoder; both stored as float16. The output is
described in trainer/data/latents.py. Shards of --shard-size consecutive samples go to the
ranks round-robin; each is written to a temporary name and renamed when complete, then its
index entry is written beside it, so a rerun with the same --out keeps finished shards and
only encodes the rest: those missing, those whose bytes no longer match their recorded sha256,
and those whose samples changed (a caption, or an image file's size or modification time). A
rerun with other data (sample names) or settings (the decoder's included: DALI's and PIL's
resizes differ) is refused rather than mixed.
"""

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save
from tqdm import tqdm

from trainer import config as run_config
from trainer.data import DataConfig, build_index, builtin_dataset_path, decode_once
from trainer.data.latents import (EMPTY_FILE, FORMAT, INDEX_FILE, TEXT_KEY, VERSION, latent_key,
                                  sha256_file, shard_file)
from trainer.data.loader import available_backend, decoder_name
from trainer.encoders import (MAX_LENGTH, encode_images, encoder_config, load_text_encoder,
                              load_vae, vae_downsampling)

log = logging.getLogger("trainer.precompute")
PLAN_FILE = "plan.json"
TMP = ".tmp"  # _atomic_write's temporary files: .<name>.tmp<pid>
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precompute(data_cfg, vae_cfg, text_cfg, resolutions, out, *, batch_size=32, shard_size=1024,
               precision="auto", rank=0, world_size=1, device="cpu", cache_dir=None, replace_other=False,
               verify=False):
    """Writes the precompute folder `out` (this rank's shards; rank 0 also index.json).

    A folder already holding a precompute of other data or settings is an error, unless
    replace_other: then (a cache, e.g. the benchmarks') it is emptied and written anew. A rerun
    takes a finished shard of the recorded size as it is; verify: only if its sha256 matches too
    (reads every shard: terabytes for SD2's text embeddings of tens of millions of captions)."""
    data = DataConfig.from_dict(data_cfg)
    if data.format == "latents":
        raise ValueError("data.format=latents is already precomputed; give the image dataset")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if type(value) is not int or value < 1:
            raise ValueError(f"{name}={value!r}; expected an integer >= 1")
    if not resolutions or any(type(r) is not int or r < 1 for r in resolutions):
        raise ValueError(f"resolutions={resolutions!r}; expected positive integers")
    resolutions = sorted(set(resolutions))
    device = torch.device(device)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in DTYPES:
        raise ValueError(f"precision={precision!r}; expected auto or one of {list(DTYPES)}")
    out = Path(out)
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier():
        if distributed:
            dist.barrier()

    # Rank 0 validates the images first; the others then read its cache (as make_loader does).
    if rank != 0:
        barrier()
    path = builtin_dataset_path(cache_dir) if data.path == "builtin" else data.path
    index = build_index(path, data.format, cache_dir=cache_dir, caption_field=data.caption_field)
    if rank == 0:
        barrier()
    data = dataclasses.replace(data, backend=available_backend(data.backend))
    decoder = decoder_name(data.backend, device)

    vae, text = load_vae(vae_cfg, device), load_text_encoder(text_cfg, device)
    if rank == 0:
        log.info("precompute: VAE %s; text encoder %s; resolutions %s; decoder %s",
                 _described(vae_cfg), _described(text_cfg), resolutions, decoder)
    if precision != "fp32":
        vae, text = vae.to(DTYPES[precision]), text.to(DTYPES[precision])
    factor = vae_downsampling(vae)
    bad = [r for r in resolutions if r % factor]
    if bad:
        raise ValueError(f"resolutions {bad} are not multiples of the VAE's downsampling factor {factor}")
    plan = {
        "format": FORMAT, "version": VERSION, "source": index.root, "source_format": data.format,
        "caption_field": data.caption_field, "count": len(index),
        "names_sha256": hashlib.sha256("\n".join(s.name for s in index.samples).encode()).hexdigest(),
        "resolutions": resolutions, "shard_size": shard_size, "dtype": "float16",
        "precision": precision,  # of the encoders: a rerun in another would mix its rounding in
        "decoder": decoder,
        "latent_shapes": {str(r): [vae.config.latent_channels, r // factor, r // factor]
                          for r in resolutions},
        "text_embedding_shape": [MAX_LENGTH, text.dim],
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": vae.config.get("shift_factor") or 0.0,
        "vae": vae_cfg, "text_encoder": text_cfg,
    }
    if rank == 0:
        _start(out, plan, text, replace_other)
        index.report(out)
    barrier()

    out.mkdir(parents=True, exist_ok=True)  # every rank writes shards into it
    n_shards = -(-len(index) // shard_size)
    inputs = {k: _inputs(index, _shard_ids(k, shard_size, len(index)))
              for k in range(rank, n_shards, world_size)}
    # Hashing the shards an earlier run wrote: threads, as hashlib releases the GIL.
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        states = dict(zip(inputs, pool.map(lambda k: _state(out, k, inputs[k], verify), inputs)))
    todo = [k for k, state in states.items() if state != "finished"]
    for state, why in (("changed", "their samples' captions or image files changed"),
                       ("damaged", "their files do not match their recorded size and sha256")):
        again = list(states.values()).count(state)
        if again:
            log.info("precompute rank %d: %d shards to encode again: %s", rank, again, why)
    count = sum(len(_shard_ids(k, shard_size, len(index))) for k in todo)
    # Every rank says what it encodes: under torchrun the lines show how the work was split.
    log.info("precompute rank %d of %d: %d samples in %d shards, %d samples in %d of them to encode",
             rank, world_size, len(index), n_shards, count, len(todo))
    bar = tqdm(total=count * len(resolutions), unit="img", desc=f"precompute rank {rank}",
               disable=rank != 0)
    for k in todo:
        ids = _shard_ids(k, shard_size, len(index))
        tensors = {}
        for r in resolutions:
            parts = []
            for images, got in decode_once(index, _at_resolution(data, r), ids, batch_size, device):
                parts.append(_finite(encode_images(vae, images.to(device)), index, got, precision))
                bar.update(len(got))
            tensors[latent_key(r)] = torch.cat(parts)
        captions = [index.samples[i].caption for i in ids]
        cut_before = text.truncated
        tensors[TEXT_KEY] = torch.cat([
            _finite(text.encode(captions[j:j + batch_size]), index, ids[j:j + batch_size], precision)
            for j in range(0, len(ids), batch_size)])
        samples = [{"name": s.name, "caption": s.caption, "license": s.license, "source": s.source}
                   for s in (index.samples[i] for i in ids)]
        _write_shard(out, k, tensors, samples, text.truncated - cut_before, inputs[k])
    bar.close()
    barrier()
    if rank == 0:
        _write_index(out, plan, n_shards, shard_size, index)
    barrier()


def _described(cfg):
    """An encoder config as the log shows it: its path, its preset, or that it is random."""
    if "path" in cfg:
        return cfg["path"] + (f" (OpenCLIP {cfg['open_clip']})" if "open_clip" in cfg else "")
    if "preset" in cfg:
        return f"preset {cfg['preset']} (configs/encoders/{cfg['preset']}.yaml)"
    return f"randomly initialized from its config (init_seed {cfg.get('init_seed', 0)})"


def _shard_ids(k, shard_size, count):
    return list(range(k * shard_size, min(count, (k + 1) * shard_size)))


def _inputs(index, ids):
    """sha256 of what samples `ids` are made of: name, caption, license, source, and the file
    holding the image (a WebDataset sample: its .tar, and its place there) by size and mtime."""
    stamps = {}
    for path in {index.samples[i].path for i in ids}:
        st = os.stat(path)
        stamps[path] = [st.st_size, st.st_mtime_ns]
    rows = [[s.name, s.caption, s.license, s.source, s.offset, s.size, *stamps[s.path]]
            for s in (index.samples[i] for i in ids)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _at_resolution(data, resolution):
    """The data config decoding at `resolution` into float32 NCHW, the VAE's input."""
    return {**dataclasses.asdict(data), "resolution": resolution, "layout": "NCHW", "dtype": "float32"}


def _finite(x, index, ids, precision):
    """x as float16 on the CPU; non-finite values stop the run instead of being stored."""
    x = x.to("cpu", torch.float16)
    if not torch.isfinite(x).all():
        names = [index.samples[i].name for i in ids][:5]
        raise RuntimeError(f"non-finite encoder output for samples {names} in {precision} "
                           f"(or beyond float16's range); try --precision fp32")
    return x


def _atomic_write(path, data):
    tmp = path.with_name(f".{path.name}{TMP}{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a kill: no partial file left behind
        tmp.unlink(missing_ok=True)
        raise


def _entry(path, data):
    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _start(out, plan, text, replace_other):
    """Checks a rerun continues the same plan, and that a first run's `out` holds nothing else;
    removes the temporary files of a run that died; writes the plan and the empty caption's
    embedding (again, if it no longer matches its sha256)."""
    plan_path = out / PLAN_FILE
    plan = json.loads(json.dumps(plan))  # as it reads back (lists, string keys)
    if not plan_path.exists() and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no {PLAN_FILE} (it is no precompute "
                         f"output): its files would be overwritten; give an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(f".*{TMP}*"):
        tmp.unlink()
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        if diff and not replace_other:
            raise ValueError(f"{out} holds a precompute of other data or settings (differing: "
                             f"{diff}); use another --out or delete it")
        if diff:
            log.warning("%s held a precompute of other settings (differing: %s): written anew", out, diff)
            shutil.rmtree(out)
            out.mkdir(parents=True)
    if not plan_path.exists():
        _atomic_write(plan_path, json.dumps(plan, indent=1).encode())
    if not _intact(out / EMPTY_FILE, _read_entry(out / "empty.json"), verify=True):
        data = save({TEXT_KEY: text.encode([""]).to("cpu", torch.float16)})
        _atomic_write(out / EMPTY_FILE, data)
        _atomic_write(out / "empty.json", json.dumps(_entry(out / EMPTY_FILE, data)).encode())


def _sidecar(out, k):
    return out / shard_file(k).replace(".safetensors", ".json")


def _read_entry(path):
    """The index entry in the JSON file `path`, or None when missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _intact(path, entry, verify):
    """Whether `path` has the size (verify: and the sha256) its index entry records."""
    try:
        return path.stat().st_size == entry["bytes"] and (not verify or sha256_file(path) == entry["sha256"])
    except (OSError, KeyError, TypeError):
        return False


def _state(out, k, inputs, verify):
    """"finished", or why shard k is to be encoded: "missing", "changed" (not made of `inputs`)
    or "damaged" (verify: its sha256 is checked, else its size only)."""
    entry = _read_entry(_sidecar(out, k))
    if not isinstance(entry, dict):
        return "missing"
    if entry.get("inputs_sha256") != inputs:
        return "changed"
    return "finished" if _intact(out / shard_file(k), entry, verify) else "damaged"


def _write_shard(out, k, tensors, samples, cut_captions, inputs):
    """The shard, then its index entry: an entry exists only for a complete shard."""
    data = save({key: t.contiguous() for key, t in tensors.items()},
                metadata={"samples": json.dumps(samples)})
    path = out / shard_file(k)
    _atomic_write(path, data)
    _atomic_write(_sidecar(out, k), json.dumps({**_entry(path, data), "count": len(samples),
                                                 "cut_captions": cut_captions,
                                                 "inputs_sha256": inputs}).encode())


def _write_index(out, plan, n_shards, shard_size, index):
    # Sizes only: each rank hashed its shards at its start, or wrote them since.
    missing = [k for k in range(n_shards) if _state(
        out, k, _inputs(index, _shard_ids(k, shard_size, len(index))), verify=False) != "finished"]
    if missing:
        raise RuntimeError(f"shards {missing[:10]} of {out} are not finished; run again to complete them")
    shards = [json.loads(_sidecar(out, k).read_text()) for k in range(n_shards)]
    meta = {**plan, "shards": shards, "empty": json.loads((out / "empty.json").read_text()),
            "skipped_images": index.skipped, "missing_captions": index.missing_captions}
    _atomic_write(out / INDEX_FILE, json.dumps(meta, indent=1).encode())
    log.info("precompute: %d samples in %d shards written to %s", len(index), n_shards, out)
    cut = sum(shard.get("cut_captions", 0) for shard in shards)
    if cut:
        log.warning("precompute: %d of %d captions are longer than the text encoder's %d tokens; their "
                    "embeddings hold the first %d", cut, len(index), MAX_LENGTH, MAX_LENGTH)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config: its data section and model.vae / model.text_encoder "
                                    "(default: configs/tiny.yaml, whose encoders are tiny and random)")
    p.add_argument("--encoders", help="configs/encoders/NAME.yaml for both encoders (e.g. tiny)")
    p.add_argument("--vae", help="local AutoencoderKL or diffusers pipeline folder (default: --encoders', "
                                 "else the config's model.vae); give --text-encoder too, or --config / --encoders")
    p.add_argument("--text-encoder", help="local CLIP text model or diffusers pipeline folder, "
                                          "or with --open-clip an OpenCLIP checkpoint file (default: as --vae)")
    p.add_argument("--open-clip", metavar="ARCH",
                   help="--text-encoder is an OpenCLIP checkpoint of this open_clip architecture (ViT-H-14: SD2's)")
    p.add_argument("--data", help="image folder, WebDataset shards, or builtin (default: the config's)")
    p.add_argument("--format", choices=["folder", "webdataset"])
    p.add_argument("--backend", choices=["dali", "pil"])
    p.add_argument("--caption-field", choices=["text", "synthetic_text"])
    p.add_argument("--resolutions", type=int, nargs="+", help="default: the config's data.resolution")
    p.add_argument("--out", required=True, help="output folder (rerun with it to resume)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard")
    p.add_argument("--precision", default="auto", choices=["auto", *DTYPES],
                   help="encoder precision; auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--workers", type=int, help="decoding processes / threads")
    p.add_argument("--cache-dir", help="validation cache and built-in images")
    p.add_argument("--verify", action="store_true", help="on a rerun, check each finished shard's sha256, not "
                   "only its size, and encode those that differ anew (what training's 'checksum mismatch' asks for)")
    args = p.parse_args(argv)
    if args.open_clip and not args.text_encoder:
        p.error("--open-clip names the architecture of --text-encoder's checkpoint; give --text-encoder")
    if bool(args.vae) != bool(args.text_encoder) and not (args.config or args.encoders):
        given, other = ("--vae", "--text-encoder") if args.vae else ("--text-encoder", "--vae")
        p.error(f"{given} without {other} would pair it with configs/tiny.yaml's tiny random encoder; "
                f"give {other}, or --config / --encoders for it")
    return args


def _absolute(path):
    return str(Path(path).expanduser().resolve())


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    explicit = args.encoders or (args.vae and args.text_encoder)
    cfg = run_config.load(args.config) if args.config or not explicit else run_config.DEFAULTS
    model = encoder_config(args.encoders) if args.encoders else cfg["model"]
    # Absolute, as the index records them: training may run from another folder.
    vae_cfg = {"path": _absolute(args.vae)} if args.vae else model["vae"]
    text_cfg = {"path": _absolute(args.text_encoder)} if args.text_encoder else model["text_encoder"]
    if args.open_clip:
        text_cfg["open_clip"] = args.open_clip
    for flag, name, section in (("--vae", "vae", vae_cfg), ("--text-encoder", "text_encoder", text_cfg)):
        if not section:  # sd2-base.yaml leaves them to the command line
            raise SystemExit(f"{args.config} gives no model.{name}: give {flag} (or --encoders)")
    data = dict(cfg["data"])
    for key, value in (("path", args.data), ("format", args.format), ("backend", args.backend),
                       ("caption_field", args.caption_field), ("workers", args.workers)):
        if value is not None:
            data[key] = value

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        precompute(data, vae_cfg, text_cfg, args.resolutions or [data["resolution"]], args.out,
                   batch_size=args.batch_size, shard_size=args.shard_size,
                   precision=args.precision, rank=rank, world_size=world, device=device,
                   cache_dir=args.cache_dir, verify=args.verify)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
