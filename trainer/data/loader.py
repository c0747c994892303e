"""make_loader: the trainer's one entry point to image data, whichever backend decodes.

Order, sharding and resuming are decided here, on the host, identically for both backends:
  - epoch order: a permutation of the dataset seeded by (seed, epoch); for WebDataset the
    shard order is permuted and then the samples within each shard, so each shard is still
    read in one sequential run.
  - sharding: rank r takes the contiguous slice [r*N//W, (r+1)*N//W) of the epoch order
    (the split DALI's readers make for shard_id=r, num_shards=W).
  - last batch: DROP. Every rank yields the same number of full batches per epoch,
    (N // W) // batch_size, so ranks stay in lockstep; the few samples left over differ
    from epoch to epoch because the order does.
  - position: (epoch, samples this rank has delivered in the epoch); equal on all ranks.
    Resuming from a stored position yields exactly the rest of that epoch (same world size
    and batch size), then carries on with the next epochs as if never stopped.
data.format=latents follows the same rules over precomputed samples (trainer/data/latents.py).
decode_once is trainer.precompute's single pass: the given samples, in order, each once.
"""

import dataclasses
import logging

import numpy as np
import torch

from trainer.data.builtin import builtin_dataset_path
from trainer.data.config import DataConfig
from trainer.data.index import build_index
from trainer.data.latents import LatentReader, load_latent_index

log = logging.getLogger("trainer.data")


def make_loader(cfg_data, batch_size, rank=0, world_size=1, seed=0, device="cpu", start=(0, 0),
                *, out_dir=None, cache_dir=None):
    """An endless iterator of (images, captions) batches for this rank; see the module doc.

    images: (B, 3, R, R) (layout NCHW) or (B, R, R, 3) (NHWC) on `device`, float32 or bfloat16,
    values in [-1, 1]. captions: list of B strings ("" where a sample has none).
    `out_dir` receives skipped_files.txt (rank 0); `cache_dir` holds the validation cache
    and the built-in images. start: a position() to go on from, optionally with the
    samples_per_epoch of the loader that gave it (then a position of another world size, batch
    size or data moves to the same share of its epoch).
    data.format=latents yields (latents (B, C, R/f, R/f), text embeddings (B, 77, dim)) instead,
    same layout and dtype rules, and the loader has `empty_embedding` (1, 77, dim) on `device`.
    """
    cfg = DataConfig.from_dict(cfg_data)
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; expected an integer >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} must be in [0, world_size={world_size!r})")
    device = torch.device(device)
    # Under torch.distributed, rank 0 writes the built-in images and the validation cache
    # first; the other ranks then read them instead of decoding every image again.
    dist = torch.distributed
    rank0_first = world_size > 1 and dist.is_available() and dist.is_initialized()
    if rank0_first and rank != 0:
        dist.barrier()
    if cfg.format == "latents":
        index = load_latent_index(cfg.path, cfg, cache_dir=cache_dir)
    else:
        path = builtin_dataset_path(cache_dir) if cfg.path == "builtin" else cfg.path
        index = build_index(path, cfg.format, cache_dir=cache_dir, caption_field=cfg.caption_field)
    if rank0_first and rank == 0:
        dist.barrier()
    index.report(out_dir if rank == 0 else None)

    if cfg.format == "latents":
        reader = LatentReader(index, cfg, batch_size, device)
        log.info("data: precomputed latents at %d px, %d batches of %d per rank per epoch",
                 cfg.resolution, len(index) // world_size // batch_size, batch_size)
        return LatentLoader(index, reader, batch_size, rank, world_size, seed, start)
    decoder = _decoder(index, cfg, batch_size, seed, device)
    log.info("data: backend %s, %d batches of %d per rank per epoch", decoder.name,
             len(index) // world_size // batch_size, batch_size)
    return Loader(index, decoder, batch_size, rank, world_size, seed, start)


def decode_once(index, cfg_data, ids, batch_size, device="cpu"):
    """(images, ids) batches of the samples `ids` of `index`, in that order, each exactly once,
    the last batch possibly smaller; centre crop and no flip whatever cfg_data says."""
    cfg = dataclasses.replace(DataConfig.from_dict(cfg_data), random_crop=False, random_flip=False)
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return
    # Decoders take whole batches (DALI's reader splits its list into equal batches), so the
    # last batch is padded with repeats of the last id, and the repeats are dropped here.
    padded = np.concatenate([ids, np.repeat(ids[-1:], -len(ids) % batch_size)])
    decoder = _decoder(index, cfg, batch_size, 0, torch.device(device))
    left = len(ids)
    for images, got in decoder.stream([(0, [padded])], 0):
        yield images[:left], got[:left]
        left -= len(got)
        if left <= 0:
            break


def available_backend(backend):
    """data.backend `backend`, or pil (with a warning) where it is dali and DALI is not importable."""
    if backend == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            log.warning("data: data.backend=dali but DALI is not importable (%s); "
                        "falling back to the PIL DataLoader", e)
            return "pil"
    return backend


def decoder_name(backend, device):
    """What decodes for data.backend `backend` (as available_backend gives it) on `device`,
    as the decoders name themselves: pil, dali cpu, or dali mixed (on the GPU)."""
    if backend == "pil":
        return "pil"
    return f"dali {'mixed' if torch.device(device).type == 'cuda' else 'cpu'}"


def _decoder(index, cfg, batch_size, seed, device):
    if available_backend(cfg.backend) == "dali":
        from trainer.data.dali import DaliDecoder as Decoder
    else:
        from trainer.data.pil import PilDecoder as Decoder
    return Decoder(index, cfg, batch_size, seed, device)


def epoch_order(index, seed, epoch):
    """The dataset's sample ids in the order of `epoch`."""
    rng = np.random.default_rng([seed, epoch])
    if index.format == "webdataset":
        groups = index.shard_groups()
        return np.concatenate([rng.permutation(groups[g]) for g in rng.permutation(len(groups))])
    return rng.permutation(len(index))


class Loader:
    """Yields (images, captions) forever, epoch after epoch; `position()` for checkpoints."""

    def __init__(self, index, decoder, batch_size, rank, world_size, seed, start=(0, 0)):
        self.index, self.decoder = index, decoder
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.samples_per_epoch = len(index) // world_size // batch_size * batch_size
        if self.samples_per_epoch == 0:
            fits = len(index) // world_size
            raise ValueError(f"{len(index)} readable images cannot fill one batch of {batch_size} on each of "
                             f"{world_size} ranks: " + (f"a batch size of at most {fits} can" if fits else
                                                        "fewer images than ranks"))
        epoch, sample, *then = (int(v) for v in start)
        if then and then[0] > 0:  # the same share of the epoch, in whole batches (another layout moves it)
            moved = sample * self.samples_per_epoch // then[0] // batch_size * batch_size
            if moved != sample:
                log.info("data: resuming at sample %d of %d of epoch %d on each rank (was %d of %d: another world size, "
                         "batch size or data)", moved, self.samples_per_epoch, epoch, sample, then[0])
            sample = moved
        if epoch < 0 or not 0 <= sample <= self.samples_per_epoch or sample % batch_size:
            raise ValueError(f"start=({epoch}, {sample}) is no position of this loader: epochs "
                             f"hold {self.samples_per_epoch} samples per rank in batches of "
                             f"{batch_size} (was the world size or batch size changed?)")
        if sample == self.samples_per_epoch:
            epoch, sample = epoch + 1, 0
        self._epoch, self._sample = epoch, sample

    def position(self):
        """(epoch, sample): where the next batch comes from; pass it back as `start`."""
        return self._epoch, self._sample

    def shards(self, epoch, start=0):
        """Every rank's sample ids for `epoch`, from its `start`-th sample on."""
        order = epoch_order(self.index, self.seed, epoch)
        n, w = len(order), self.world_size
        return [order[r * n // w:r * n // w + self.samples_per_epoch][start:] for r in range(w)]

    def __iter__(self):
        for batch, ids in self.decoder.stream(self._plans(), self.rank):
            self._sample += len(ids)
            if self._sample == self.samples_per_epoch:
                self._epoch, self._sample = self._epoch + 1, 0
            yield self.pair(batch, ids)

    def pair(self, images, ids):
        """A decoded batch and what it pairs with: the samples' captions."""
        return images, [self.index.samples[i].caption for i in ids]

    def _plans(self):
        """(epoch, every rank's sample ids) from the current position on, forever. Decoders
        may read ahead of what has been yielded, so this keeps its own counters."""
        epoch, start = self._epoch, self._sample
        while True:
            yield epoch, self.shards(epoch, start)
            epoch, start = epoch + 1, 0


class LatentLoader(Loader):
    """data.format=latents: yields (latents, text embeddings); `empty_embedding` is the empty
    caption's (1, 77, dim), for caption dropout; `encoders` the model.vae and
    model.text_encoder configs that made them (as trainer.precompute recorded them)."""

    def __init__(self, index, reader, *args):
        super().__init__(index, reader, *args)
        self.empty_embedding = reader.empty_embedding()
        self.encoders = {"vae": index.meta["vae"], "text_encoder": index.meta["text_encoder"]}

    def pair(self, batch, ids):
        return batch  # the reader's (latents, text embeddings)
