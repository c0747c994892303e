"""DALI decoding: nvJPEG / the hardware JPEG decoder on a GPU, DALI's CPU decoders without one.

One pipeline per PIPELINE_SAMPLES samples (whole epochs), because DALI's readers take their
file list (or shard index files) when the pipeline is built: the loader's epoch orders go in,
DALI's reader splits them by shard_id=rank, num_shards=world (every rank's part has the same
length, so DALI's split is exactly the loader's), reads in that order (random_shuffle=False),
and the graph decodes (device "mixed" on GPU, "cpu" with device_id=None without one) to RGB
(alpha dropped, grayscale/CMYK/palette expanded), resizes the shorter side, crops (random or
centre), mirrors, and normalizes to [-1, 1] in float32. Sample ids travel beside the images
through an external_source fed in the same order, so captions are looked up on the host.
WebDataset: each pipeline gets small index files in DALI's format listing only validated
samples in its order (one per run of consecutive samples from one shard).
undecodable() is the index pass's DALI check: DALI's CPU decoder over every image PIL accepted.
"""

import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from trainer.data.index import IMAGE_EXTS, write_dali_index
from trainer.data.loader import decoder_name


class DaliDecoder:
    def __init__(self, index, cfg, batch_size, seed, device):
        self.index, self.cfg, self.batch_size, self.seed = index, cfg, batch_size, seed
        if device.type == "cuda":
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None
        self.name = decoder_name("dali", device)
        self._tmp = tempfile.mkdtemp(prefix="cckernels-dali-")
        weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)

    def stream(self, plans, rank):
        """(images, ids) batches of this rank for the epochs in `plans`, one after another."""
        for group in _pipeline_groups(plans):
            yield from self._epochs(group, rank)

    def _epochs(self, group, rank):
        world = len(group[0][1])
        # Rank by rank, each rank's epochs in order: DALI's contiguous split by shard_id then
        # gives every rank its own part (all ranks' parts have the same length).
        sequence = np.concatenate([shards[r] for r in range(world) for _, shards in group])
        ids = np.concatenate([shards[rank] for _, shards in group])
        pipe = self._pipeline(group[0][0], sequence, rank, world, ids)
        # Each rank's part is a whole number of batches, so DROP never drops here; it is
        # named so the policy is stated rather than DALI's default (FILL) assumed.
        it = DALIGenericIterator(pipe, ["images", "ids"], reader_name="reader",
                                 last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
        for out in it:
            images = out[0]["images"]
            if self.cfg.dtype == "bfloat16":  # DALI has no bfloat16 output type
                images = images.to(torch.bfloat16)
            yield images, out[0]["ids"].view(-1).tolist()

    def _pipeline(self, epoch, sequence, rank, world, ids):
        batches = ids.reshape(-1, self.batch_size).astype(np.int64)
        seed = int(np.random.SeedSequence([self.seed, epoch, rank]).generate_state(1)[0] >> 1)
        pipe = _graph(self, sequence, rank, world, batches, batch_size=self.batch_size,
                      num_threads=max(1, self.cfg.workers), device_id=self.device_id,
                      seed=seed)
        pipe.build()
        return pipe

    def reader(self, sequence, rank, world):
        """The encoded images of `sequence`, this rank's share, in order."""
        samples = self.index.samples
        common = dict(shard_id=rank, num_shards=world, random_shuffle=False, name="reader")
        if self.index.format == "folder":
            encoded, _ = fn.readers.file(files=[samples[i].path for i in sequence], **common)
            return encoded
        paths, index_paths, run = [], [], []
        for k, i in enumerate(sequence):
            run.append(samples[i])
            if k + 1 == len(sequence) or samples[sequence[k + 1]].path != samples[i].path:
                index_paths.append(str(Path(self._tmp) / f"run{len(paths)}.idx"))
                paths.append(samples[i].path)
                write_dali_index(index_paths[-1], [[_member(s)] for s in run])
                run = []
        return fn.readers.webdataset(paths=paths, index_paths=index_paths,
                                     ext=[";".join(IMAGE_EXTS)], case_sensitive_extensions=False,
                                     missing_component_behavior="error", **common)


# Building a pipeline takes about 2 s (16 threads, nvJPEG; H200, DALI 2.4), more than decoding
# a small dataset's epoch: one pipeline per epoch of 512 images ran at 245 images/s, against
# the PIL DataLoader's 1,558. So one pipeline reads consecutive epochs, at least this many
# samples per rank.
PIPELINE_SAMPLES = 8192


def _pipeline_groups(plans):
    """Lists of consecutive (epoch, shards) plans holding >= PIPELINE_SAMPLES samples per rank
    (the last one fewer when `plans` ends)."""
    group, samples = [], 0
    for plan in plans:
        group.append(plan)
        samples += len(plan[1][0])
        if samples >= PIPELINE_SAMPLES:
            yield group
            group, samples = [], 0
    if group:
        yield group


def undecodable(samples, threads, batch_size=64):
    """Per sample (anything with .read() giving its encoded bytes), None if DALI's CPU decoder
    reads it, else why not. trainer.data.index calls this after PIL's check: DALI's parsers
    reject a few files PIL reads (small lossless WebPs with EXIF, with DALI 2.4)."""
    reasons, pipe = [], None
    for k in range(0, len(samples), batch_size):
        chunk = [np.frombuffer(s.read(), np.uint8) for s in samples[k:k + batch_size]]
        try:
            pipe = _decode_run(pipe, chunk, batch_size, threads)
            reasons += [None] * len(chunk)
            continue
        except RuntimeError:
            pipe = None  # a failed run leaves the pipeline unusable
        for data in chunk:  # which one(s) failed
            try:
                pipe = _decode_run(pipe, [data], batch_size, threads)
                reasons.append(None)
            except RuntimeError as e:
                pipe = None
                why = str(e).split("encountered:")[-1].strip().split("\n")[0]
                reasons.append(f"DALI cannot decode it ({why})")
    return reasons


def _decode_run(pipe, chunk, batch_size, threads):
    if pipe is None:
        pipe = _decode_graph(batch_size=batch_size, num_threads=threads, device_id=None,
                             exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        pipe.build()
    pipe.feed_input("encoded", chunk)
    pipe.run()
    return pipe


@pipeline_def
def _decode_graph():
    return fn.decoders.image(fn.external_source(name="encoded", dtype=types.UINT8, ndim=1),
                             device="cpu", output_type=types.RGB)


def _member(sample):
    """(ext, offset, size, name) of a shard member, as a DALI index line lists it."""
    name = sample.name.split("/", 1)[1]  # the index names samples "<shard file>/<member>"
    base = name.rsplit("/", 1)[-1]
    return base.split(".", 1)[1], sample.offset, sample.size, name


@pipeline_def
def _graph(dec, sequence, rank, world, batches):
    cfg = dec.cfg
    images = fn.decoders.image(dec.reader(sequence, rank, world),
                               device="cpu" if dec.device_id is None else "mixed",
                               output_type=types.RGB)
    images = fn.resize(images, resize_shorter=cfg.resolution, antialias=True)
    if cfg.random_crop:
        pos_x, pos_y = fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0))
    else:
        pos_x = pos_y = 0.5
    images = fn.crop_mirror_normalize(
        images, crop=(cfg.resolution, cfg.resolution), crop_pos_x=pos_x, crop_pos_y=pos_y,
        mirror=fn.random.coin_flip(probability=0.5) if cfg.random_flip else 0,
        mean=[127.5] * 3, std=[127.5] * 3, dtype=types.FLOAT,
        output_layout="CHW" if cfg.layout == "NCHW" else "HWC")
    # The pipeline runs ahead of the iterator; past the epoch's end it wraps around like the
    # reader does, and those prefetched batches are thrown away with the pipeline.
    ids = fn.external_source(source=lambda info: batches[info.iteration % len(batches)],
                             batch=True, batch_info=True, dtype=types.INT64)
    return images, ids
