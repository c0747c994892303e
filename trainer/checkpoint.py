"""Checkpoints that survive crashes: each is written to a temporary folder, then renamed.

Layout: <out_dir>/checkpoints/step_0000100/{unet,ema}.safetensors, optimizer.pt,
state.json, rng_rank<r>.pt, config.yaml, and unet/ in diffusers layout (config.json +
diffusion_pytorch_model.safetensors, a hard link to the EMA weights once the EMA has started,
else to the UNet's), so `UNet2DConditionModel.from_pretrained(step / "unet")` loads any
checkpoint; checksums.json, written last, holds every other file's size and sha256;
<out_dir>/checkpoints/latest names the newest.
A crash mid-write leaves only a *.tmp folder behind, which the next save clears; a failed
write (a full disk) removes its own and says which checkpoint is intact. A file damaged
after its checkpoint was written (bit rot, a copy cut short) is found by its checksum when
it is loaded: a resume then says so and falls back to the newest intact checkpoint
(load_newest_intact); trainer.sample and trainer.export name it. Checkpoints written before
checksums were recorded load unverified.
A run that starts over in an out_dir (resume=false) first moves the earlier run's files aside
(set_aside_earlier_run), so neither run's checkpoints are pruned for the other's. A run holds
<out_dir>/.lock (run_lock), so a second run there at the same time is refused.
"""
import contextlib
import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer import config as config_mod
from trainer.data.latents import sha256_file
from trainer.unet import CONFIG_NAME, WEIGHTS_NAME, diffusers_files, save_safetensors, write_diffusers_config

log = logging.getLogger("trainer.checkpoint")


def checkpoint_dir(out_dir):
    return Path(out_dir) / "checkpoints"


def step_name(step):
    return f"step_{step:07d}"


def latest(out_dir):
    """Path of the checkpoint out_dir's `latest` pointer names or, without a pointer (a crash
    right after the first checkpoint, folders copied without it), of the newest complete one;
    None where there is none. A pointer that names no complete checkpoint (only ever published
    after its checkpoint: someone deleted it) is an error, not a fresh start."""
    pointer = checkpoint_dir(out_dir) / "latest"
    if not pointer.exists():
        done = [p for p in _step_folders(out_dir) if (p / "state.json").exists()]
        return done[-1] if done else None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{pointer} cannot be read ({type(e).__name__}: {e}): write the name of the "
                         "checkpoint to resume from into it (e.g. step_0000100)") from None
    path = checkpoint_dir(out_dir) / name
    if not name or not (path / "state.json").exists():
        raise FileNotFoundError(f"{pointer} names {name!r}, which is missing or incomplete (no state.json): write "
                                "the name of an existing checkpoint into it (or, to train, start over with "
                                "resume=false, which sets this run's files aside)")
    return path


def _step_folders(out_dir):
    """The checkpoint folders (complete or not, no .tmp), in step order."""
    found = [p for p in checkpoint_dir(out_dir).glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve(path):
    """A checkpoint folder, or an out_dir or its checkpoints folder (-> the latest in it). Only
    a checkpoints folder (holding `latest`) defers to its parent: a run's diffusers/ is not
    the run."""
    path = Path(path)
    if (path / "state.json").exists():
        return path
    found = latest(path.parent if (path / "latest").is_file() else path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {path} (expected state.json or a 'latest' pointer)")
    return found


# What a training run writes into its out_dir.
RUN_FILES = ("checkpoints", "samples", "diffusers", "metrics.jsonl", "metrics.png", "skipped_files.txt")


@contextlib.contextmanager
def run_lock(out_dir):
    """Holds <out_dir>/.lock while a run writes there: an flock, which the system releases when
    the process ends, however it ends. A second run is refused, naming the first (its pid and
    host are in the file)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise BlockingIOError(f"another run ({f.read().strip() or 'pid unknown'}) is writing to {out_dir}: two "
                               "runs there would resume from and prune each other's checkpoints; wait for it "
                               "to end, or give this one another out_dir") from None
        except OSError as e:  # a file system without locks (some NFS, Lustre mounts): train on, unguarded
            log.warning("%s cannot be locked (%s): a second run started there would not be refused", f.name, e)
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        yield


def set_aside_earlier_run(out_dir):
    """Moves an earlier run's files (RUN_FILES) out of the way, into
    <out_dir>/earlier_runs/<UTC time>/, for a run that starts over there; returns that folder,
    or None when there was nothing to move."""
    out_dir = Path(out_dir)
    found = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    if not found:
        return None
    dest = out_dir / "earlier_runs" / datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    dest.mkdir(parents=True)
    for path in found:
        os.replace(path, dest / path.name)
    return dest


def init_weights(path):
    """(weights file, prediction type or None) for model.init_from: one of our checkpoints, or
    a run or checkpoints folder (its latest), gives its trained weights (unet.safetensors; the
    EMA ones are in its unet/, which is a diffusers folder) and its config's prediction type;
    anything else is read as a diffusers UNet, with the prediction type of the pipeline around
    it, if any."""
    if any((Path(path) / name).exists() for name in ("state.json", "latest", "checkpoints")):
        step = resolve(path)  # ours: its errors say what is wrong (a pointer naming a deleted folder)
        verify(step, ["unet.safetensors", "config.yaml"])
        return step / "unet.safetensors", config_mod.load(step / "config.yaml")["diffusion"]["prediction_type"]
    try:
        weights = diffusers_files(path)[0]
    except ValueError as e:
        raise ValueError(f"model.init_from={path}: neither one of our checkpoints (no state.json, no "
                         f"checkpoints/latest) nor a diffusers UNet ({e})") from None
    pipeline = next((p for p in weights.parents[:2] if (p / "model_index.json").is_file()), None)  # unet/, its pipeline
    return weights, pipeline_prediction_type(pipeline) if pipeline else None


def pipeline_prediction_type(folder):
    """What a diffusers pipeline's UNet predicts, from its scheduler config (diffusers'
    default: epsilon), or None without one."""
    scheduler = Path(folder) / "scheduler" / "scheduler_config.json"
    return json.loads(scheduler.read_text()).get("prediction_type", "epsilon") if scheduler.is_file() else None


def weights_unet_config(weights):
    """The UNet config a weights file was trained with, where one lies beside it: one of our
    checkpoints' config.yaml (model.unet) or a diffusers folder's config.json; else None."""
    folder = Path(weights).parent
    if (folder / "state.json").is_file():
        return config_mod.load(folder / "config.yaml")["model"]["unet"]
    if (folder / CONFIG_NAME).is_file():
        return json.loads((folder / CONFIG_NAME).read_text())
    return None


def nonfinite(state_dict):
    """The names of the tensors holding NaN or inf (a diverged run's weights)."""
    return [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def _contiguous_cpu(state_dict):
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def tmp_path(out_dir, step):
    return checkpoint_dir(out_dir) / (step_name(step) + ".tmp")


def save_rank_rng(out_dir, step, rank):
    """Every rank saves its own RNG state into the temporary folder before rank 0 commits."""
    torch.save(rng_state(), tmp_path(out_dir, step) / f"rng_rank{rank}.pt")


def begin(out_dir, step):
    """Rank 0: a fresh temporary folder for the checkpoint of `step`; those a crash left behind
    (of any step) go."""
    for stale in checkpoint_dir(out_dir).glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp_path(out_dir, step).mkdir(parents=True)


def commit(out_dir, step, *, unet, ema, optimizer, state, config, keep, diffusers_config=None):
    """Rank 0: write the weights and state, then atomically publish the checkpoint.
    diffusers_config: the UNet's diffusers config.json dict; given, the folder gets unet/."""
    tmp, final = tmp_path(out_dir, step), checkpoint_dir(out_dir) / step_name(step)
    try:
        save_safetensors(_contiguous_cpu(unet), tmp / "unet.safetensors")
        if ema is not None:
            save_safetensors(_contiguous_cpu(ema), tmp / "ema.safetensors")
        if diffusers_config is not None:
            _diffusers_unet(tmp, diffusers_config, "ema.safetensors" if ema is not None else "unet.safetensors")
        torch.save(optimizer, tmp / "optimizer.pt")
        config_mod.dump(config, tmp / "config.yaml")
        with open(tmp / "state.json", "w") as f:  # its presence marks a complete checkpoint (latest())
            json.dump(state, f, indent=1)
        # Every file flushed to the disk before the renames: after a machine crash (not only a
        # process crash) a published checkpoint must not hold weights that never left the page
        # cache. Each is read back from that cache for its checksum in the same pass.
        names = [p.relative_to(tmp).as_posix() for p in sorted(tmp.rglob("*")) if p.is_file()]
        with open(tmp / CHECKSUMS, "w") as f:
            json.dump(_checksums(tmp, names, fsync=True), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        for path in [*(p for p in tmp.rglob("*") if p.is_dir()), tmp]:  # their entries
            _fsync(path)
    except (OSError, RuntimeError) as e:  # torch.save's full disk reads "unexpected pos ..."
        shutil.rmtree(tmp, ignore_errors=True)
        pointer = checkpoint_dir(out_dir) / "latest"
        kept = f"the one {pointer} names is intact" if pointer.exists() else "there is no earlier one"
        raise OSError(f"writing the checkpoint of step {step} to {tmp} failed ({type(e).__name__}: {e}); "
                           f"is the disk full? {kept}") from e
    if final.exists():  # a run resumed from before it (a damaged checkpoint's fallback, a rewound latest)
        log.info("%s replaces the one of that step written before (this run resumed from an earlier step)", final)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = checkpoint_dir(out_dir) / "latest"
    pointer.with_suffix(".tmp").write_text(final.name + "\n")
    _fsync(pointer.with_suffix(".tmp"))
    os.replace(pointer.with_suffix(".tmp"), pointer)
    _fsync(checkpoint_dir(out_dir))  # the renames themselves
    _prune(out_dir, keep, step)
    return final


def _fsync(path):
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _diffusers_unet(folder, diffusers_config, weights):
    """folder/unet/ for UNet2DConditionModel.from_pretrained: the weights hard-linked (no second
    copy on disk; copied where the filesystem has no hard links) next to config.json."""
    unet = folder / "unet"
    unet.mkdir()
    write_diffusers_config(unet, diffusers_config)
    try:
        os.link(folder / weights, unet / WEIGHTS_NAME)
    except OSError:
        shutil.copyfile(folder / weights, unet / WEIGHTS_NAME)


def _prune(out_dir, keep, step):
    """Keeps the newest `keep` checkpoints up to `step`, the one just written. Those of higher
    steps (a run resumed from an earlier checkpoint than its last) stay until this run's own
    replace them: pruning by name deleted this run's checkpoints for them."""
    done = [p for p in _step_folders(out_dir) if int(p.name[5:]) <= step]
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
        log.info("removed %s (checkpoint.keep=%d keeps the newest)", old, keep)


# Each file's size and sha256 when its checkpoint was written ({name: {"bytes", "sha256"}}).
CHECKSUMS = "checksums.json"


class Damaged(ValueError):
    """A checkpoint file that cannot be read, or no longer holds the bytes written (`why`)."""

    def __init__(self, file, why):
        self.file, self.why = Path(file), why
        super().__init__(f"{file} {why}: the checkpoint is damaged; take an earlier one")


def _sha256(path, fsync=False):
    """(size, sha256) of a file; fsync: flushed to the disk too."""
    size, digest = os.stat(path).st_size, sha256_file(path)
    if fsync:
        _fsync(path)
    return size, digest


def _checksums(folder, names, fsync=False):
    """{name: {"bytes", "sha256"}} of folder's files `names`. Hashed in threads (hashlib, reads
    and fsync release the GIL: the UNet, EMA and optimizer files of SD2, 3.4+3.4+7 GB, take
    the time of the largest); a file linked under two names (unet/'s weights) is read once."""
    by_inode = {}
    for name in names:
        st = os.stat(folder / name)
        by_inode.setdefault((st.st_dev, st.st_ino), []).append(name)
    with ThreadPoolExecutor() as pool:
        sums = pool.map(lambda linked: _sha256(folder / linked[0], fsync), by_inode.values())
        return {name: {"bytes": size, "sha256": digest}
                for linked, (size, digest) in zip(by_inode.values(), sums) for name in linked}


def verify(path, names=None):
    """Checks a checkpoint's files (`names`, default: all) against the sizes and sha256 recorded
    when it was written; Damaged naming the first that differs. A checkpoint written before
    checksums were recorded is said to load unverified (False); True where all match."""
    path = Path(path)
    if not (path / CHECKSUMS).exists():
        log.info("%s holds no %s (written before checkpoints recorded checksums): its files load unverified",
                 path, CHECKSUMS)
        return False
    recorded = read(path / CHECKSUMS, lambda p: json.loads(p.read_text()))
    try:  # damage to checksums.json itself is damage too, not a KeyError
        expected = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in recorded.items()
                    if names is None or name in names}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise Damaged(path / CHECKSUMS, "holds no valid checksums") from None
    for name, (size, _) in expected.items():  # sizes first: a truncated file is found without reading GBs
        if not (path / name).is_file():
            raise Damaged(path / name, "is missing")
        found = (path / name).stat().st_size
        if found != size:
            raise Damaged(path / name, f"holds {found} bytes, not the {size} written"
                                       + (" (truncated: a copy or a write cut short?)" if found < size else ""))
    for name, entry in _checksums(path, list(expected)).items():
        if entry["sha256"] != expected[name][1]:
            raise Damaged(path / name, "does not hold the bytes written (its sha256 differs: corrupted on the "
                                       f"disk or in a copy; edited on purpose? then delete {path / CHECKSUMS})")
    return True


def read(file, reader=load_file):
    """reader(file) for a file of a checkpoint; Damaged naming the file where it cannot be read
    (damaged, missing). Training and trainer.sample read checkpoints with it."""
    file = Path(file)
    try:
        return reader(file)
    except Exception as e:  # safetensors, torch, json and yaml each raise their own
        # one line, however many a pickle or YAML error spans
        raise Damaged(file, f"cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None


def load(path, rank=0):
    """Everything a checkpoint holds, tensors on CPU, its files checked against their checksums
    first. A file that cannot be read or differs is a Damaged error naming it."""
    path = Path(path)
    verify(path)
    ckpt = {
        "path": path,
        "unet": read(path / "unet.safetensors"),
        "ema": read(path / "ema.safetensors") if (path / "ema.safetensors").exists() else None,
        "optimizer": read(path / "optimizer.pt", lambda p: torch.load(p, map_location="cpu", weights_only=False)),
        "state": read(path / "state.json", lambda p: json.loads(p.read_text())),
        "config": read(path / "config.yaml", config_mod.load),
    }
    if ckpt["ema"] is None and ckpt["optimizer"]["ema"]["steps"] >= ckpt["config"]["ema"]["start_step"]:
        raise Damaged(path / "ema.safetensors", "is missing, though that run's EMA had started (ema.start_step "
                      f"{ckpt['config']['ema']['start_step']}): resuming would restart it")
    rng = path / f"rng_rank{rank}.pt"
    ckpt["rng"] = read(rng, lambda p: torch.load(p, weights_only=False)) if rng.exists() else None
    return ckpt


def load_newest_intact(out_dir, rank=0):
    """load() of the checkpoint out_dir's `latest` names or, where that one is damaged, of the
    newest intact one before it, saying which was damaged and why; None where there is none.
    ValueError naming every damaged file where no checkpoint is intact."""
    first = latest(out_dir)
    if first is None:
        return None
    # Before it only: those of higher steps a rewound run left behind are not this run's past.
    earlier = [p for p in reversed(_step_folders(out_dir)) if int(p.name[5:]) < int(first.name[5:])]
    damaged = []
    for path in [first, *earlier]:
        try:
            ckpt = load(path, rank)
        except Damaged as e:
            log.warning("checkpoint %s is damaged: %s %s", path.name, e.file, e.why)
            damaged.append(e)
            continue
        if damaged:
            log.warning("falling back to %s, the newest intact checkpoint (the damaged ones are left as they are "
                        "until this run writes those steps again)", path.name)
        return ckpt
    raise ValueError(f"no intact checkpoint to resume from in {checkpoint_dir(out_dir)}: "
                     + "; ".join(f"{e.file} {e.why}" for e in damaged)
                     + ". Restore them from a copy, or start over with resume=false (which sets them aside)")
