"""data.format=latents: training on what trainer.precompute wrote; no decoding, no encoders.

A precompute folder holds
  index.json                   format, counts, shapes, dtypes, encoders, caption field, and per
                               shard {file, count, bytes, sha256, inputs_sha256 (of its samples'
                               captions and image files, so a rerun sees them change)}
  shard-00000.safetensors ...  latents_<R> (n, C, R/f, R/f) per resolution R and
                               text_embeddings (n, 77, dim), all float16; its metadata "samples"
                               is a JSON list of {name, caption, license, source} per row
  shard-00000.json             that shard's index entry, written once the shard is complete
  empty.safetensors            text_embeddings (1, 77, dim) of the empty caption (caption dropout)
Why safetensors: one self-describing file per shard (dtype and shape of every tensor, metadata
beside them) that any tool reads with safe_open; its layout (8-byte little-endian header length,
JSON header, raw row-major tensors) lets this reader memory-map each tensor with numpy and gather
a batch of random rows in one indexing operation.

Bad input follows trainer.data's rules: a shard whose file is missing, has the wrong size or
checksum, or whose header does not match index.json is skipped, reported and listed in
<out_dir>/skipped_shards.txt, never read. Checksums are verified once per file version (size and
mtime), cached like the image validation.
"""

import hashlib
import json
import logging
import os
import queue
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from trainer.data.config import cache_root
from trainer.data.index import list_skipped

log = logging.getLogger("trainer.data")

FORMAT = "cckernels-latents"
VERSION = 1
INDEX_FILE = "index.json"
EMPTY_FILE = "empty.safetensors"
TEXT_KEY = "text_embeddings"
CACHE_VERSION = 1


def latent_key(resolution):
    return f"latents_{resolution}"


def shard_file(k):
    return f"shard-{k:05d}.safetensors"


def sha256_file(path):
    """The sha256 of a file, read in blocks (shards and checkpoints hold GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_header(path):
    """(header dict, byte offset of the data) of a safetensors file; ValueError when malformed."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > os.fstat(f.fileno()).st_size - 8:
            raise ValueError(f"header length {n} exceeds the file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("unreadable header (not a JSON object)")
    return header, 8 + n


class LatentIndex:
    """The usable shards of a precompute folder; sample ids run over them in shard order."""

    format = "latents"

    def __init__(self, root, meta, shards, skipped):
        self.root, self.meta, self.shards, self.skipped = root, meta, shards, skipped
        self.offsets = np.cumsum([0] + [s["count"] for s in shards])

    def __len__(self):
        return int(self.offsets[-1])

    def report(self, out_dir=None):
        """Logs the counts (precompute's too) and writes <out_dir>/skipped_shards.txt
        (file <TAB> reason)."""
        where = list_skipped(out_dir, "skipped_shards.txt", self.skipped)
        images = len(self.meta.get("skipped_images", []))
        listed = f" (listed in {Path(self.root) / 'skipped_files.txt'})" if images else ""
        log.info("data: %d precomputed samples in %d shards of %s, %d damaged shards skipped%s; "
                 "images precompute skipped as unreadable: %d%s", len(self), len(self.shards), self.root,
                 len(self.skipped), where, images, listed)
        for name, reason in self.skipped:
            log.warning("data: skipped damaged shard %s: %s (trainer.precompute run again with the same "
                        "--out and --verify encodes it anew)", name, reason)


def load_latent_index(path, cfg, *, cache_dir=None):
    """Reads index.json of the precompute folder `path` and verifies every shard against it.
    cfg: the DataConfig (resolution and caption_field must be among what was precomputed)."""
    root = Path(path).expanduser().resolve()
    try:
        meta = json.loads((root / INDEX_FILE).read_text())
    except FileNotFoundError:
        raise ValueError(f"data.path {str(path)!r} has no {INDEX_FILE}: not a finished "
                         f"`python -m trainer.precompute` output") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{root / INDEX_FILE} is unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{root / INDEX_FILE} is not a {FORMAT} v{VERSION} index")
    if cfg.resolution not in meta["resolutions"]:
        raise ValueError(f"data.resolution={cfg.resolution} was not precomputed in {root}; "
                         f"available: {meta['resolutions']}")
    if cfg.caption_field != meta["caption_field"]:
        raise ValueError(f"data.caption_field={cfg.caption_field!r} but {root} holds embeddings "
                         f"of {meta['caption_field']!r} captions")
    expected = {TEXT_KEY: meta["text_embedding_shape"]}
    expected.update({latent_key(r): meta["latent_shapes"][str(r)] for r in meta["resolutions"]})

    entries = [meta["empty"]] + meta["shards"]
    hashes = _ChecksumCache(root, cache_dir).hashes([root / e["file"] for e in entries])
    reasons = [_check(root / e["file"], e, h, {TEXT_KEY: meta["text_embedding_shape"]}
                      if e is meta["empty"] else expected)
               for e, h in zip(entries, hashes)]
    if reasons[0] is not None:
        raise ValueError(f"{root / meta['empty']['file']} (the empty caption's embedding) is "
                         f"damaged: {reasons[0]}; run trainer.precompute again")
    shards = [dict(e, path=str(root / e["file"])) for e, r in zip(entries[1:], reasons[1:]) if r is None]
    skipped = [(e["file"], r) for e, r in zip(entries[1:], reasons[1:]) if r is not None]
    if not shards:
        raise ValueError(f"no usable shard in {root}: all {len(skipped)} damaged, e.g. {skipped[:3]}")
    return LatentIndex(str(root), meta, shards, skipped)


def _check(path, entry, digest, shapes):
    """None if the file matches its index entry, else why not."""
    if digest is None:
        return "missing or unreadable"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"size {size} bytes, index says {entry['bytes']}"
    if digest != entry["sha256"]:
        return "checksum mismatch"
    try:
        header, _ = read_header(path)
    except ValueError as e:
        return str(e)
    for key, shape in shapes.items():
        want = [entry.get("count", 1), *shape]
        got = header.get(key, {})
        if got.get("dtype") != "F16" or got.get("shape") != want:
            return f"tensor {key}: {got.get('dtype')} {got.get('shape')}, expected F16 {want}"
    return None


class _ChecksumCache:
    """sha256 per file, reused while the file's size and mtime are unchanged; one JSON file per
    precompute folder under `cache_dir` (default $CCKERNELS_CACHE or ~/.cache/cckernels)."""

    def __init__(self, root, cache_dir):
        key = hashlib.sha1(str(root).encode()).hexdigest()[:16]
        self.path = cache_root(cache_dir) / "latents" / f"{key}.json"

    def hashes(self, paths):
        try:
            cached = json.loads(self.path.read_text())
            entries = cached["entries"] if cached.get("version") == CACHE_VERSION else {}
        except (OSError, ValueError, KeyError, TypeError):
            entries = {}

        def one(path):
            try:
                st = os.stat(path)
                stamp = [st.st_size, st.st_mtime_ns]
                if entries.get(str(path), [None])[:2] == stamp:
                    return stamp, entries[str(path)][2]
                return stamp, sha256_file(path)
            except OSError:
                return None, None

        # hashlib releases the GIL on large blocks, so threads use all cores.
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(one, paths))
        fresh = {str(p): stamp + [digest] for p, (stamp, digest) in zip(paths, results) if stamp}
        if fresh != {k: entries.get(k) for k in fresh}:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": fresh}))
            os.replace(tmp, self.path)
        return [digest for _, digest in results]


class LatentReader:
    """Batches of rows gathered from the memory-mapped shards, moved to `device` in cfg.dtype
    (latents in cfg.layout); plays the part of a decoder for trainer.data's Loader.

    A thread gathers the next PREFETCH batches, and one more while it waits for room to queue
    it (pinned host memory on CUDA), while the caller trains on this one: at SD2's batch 368 a
    batch is ~61 MB of random rows (58 MB of them text embeddings), tens of milliseconds of
    copying that the GPU would otherwise wait for at the start of every step."""

    name = "latents"
    PREFETCH = 2

    def __init__(self, index, cfg, batch_size, device):
        self.index, self.cfg, self.batch_size, self.device = index, cfg, batch_size, device
        self.key = latent_key(cfg.resolution)
        self._arrays = {}

    def stream(self, plans, rank):
        """((latents, text embeddings), ids) batches of this rank for the epochs in `plans`, one
        after another."""

        gpu = self.device.index if self.device.type == "cuda" else None
        if self.device.type == "cuda" and gpu is None:  # plain "cuda": the caller's current GPU
            gpu = torch.cuda.current_device()

        def host_batches():
            if gpu is not None:  # pin on this rank's GPU's context (as DataLoader's pin thread)
                torch.cuda.set_device(gpu)
            for _, shards in plans:
                ids = shards[rank]
                for k in range(0, len(ids), self.batch_size):
                    batch = ids[k:k + self.batch_size]
                    yield self._gather(self.key, batch), self._gather(TEXT_KEY, batch), batch.tolist()

        for latents, text, ids in prefetched(host_batches(), self.PREFETCH):
            yield (self._finish(latents, self.key), self._finish(text, TEXT_KEY)), ids

    def _gather(self, key, ids):
        """Rows `ids` of tensor `key` over all shards, as one host tensor, gathered straight into
        pinned memory for CUDA (not copied there after: ~61 MB a batch at SD2's batch 368)."""
        ids = np.asarray(ids, dtype=np.int64)
        shard = np.searchsorted(self.index.offsets, ids, side="right") - 1
        rows = ids - self.index.offsets[shard]
        shards, out = np.unique(shard), None
        for s in shards:
            array = self._array(s, key)
            if out is None:
                out = torch.empty((len(ids), *array.shape[1:]), dtype=torch.from_numpy(np.empty(0, array.dtype)).dtype,
                                  pin_memory=self.device.type == "cuda")
            if len(shards) == 1:
                np.take(array, rows, axis=0, out=out.numpy())
            else:
                take = shard == s
                out.numpy()[take] = array[rows[take]]
        return out

    def empty_embedding(self):
        entry = self.index.meta["empty"]
        return self._finish(torch.from_numpy(np.array(
            _memmap(Path(self.index.root) / entry["file"], TEXT_KEY))), TEXT_KEY)

    def _array(self, s, key):
        if (s, key) not in self._arrays:
            self._arrays[s, key] = _memmap(self.index.shards[s]["path"], key)
        return self._arrays[s, key]

    def _finish(self, x, key):
        # float16 crosses to the device (half the bytes of float32) and is converted there.
        x = x.to(self.device, non_blocking=True)
        if key != TEXT_KEY and self.cfg.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        return x.to(torch.bfloat16 if self.cfg.dtype == "bfloat16" else torch.float32).contiguous()


def prefetched(items, depth):
    """Iterate `items` in a background thread, at most `depth` items queued ahead of the caller
    and one more in the thread's hands, waiting for room (so depth + 1 made ahead). An
    exception in the thread is raised here, at the item where it happened; closing (or
    dropping) this generator stops the thread."""
    ready = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item):  # False once the consumer is gone
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer
            put((None, e))
            return
        put((end, None))

    thread = threading.Thread(target=work, name="latents-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _memmap(path, key):
    header, start = read_header(path)
    info = header[key]
    begin, _ = info["data_offsets"]
    return np.memmap(path, np.float16, "r", offset=start + begin, shape=tuple(info["shape"]))
