"""PIL decoding in a torch DataLoader: the baseline, and the fallback without DALI.

Workers decode, resize the shorter side to the resolution (bilinear, antialiased when
shrinking, as DALI's resize), crop and flip, and send uint8 HWC images (a quarter of the
bytes of float); scaling to [-1, 1], layout and dtype happen on `device` in the main process.
Random crop and flip draw from a generator seeded by (seed, epoch, sample id), so the result
does not depend on the number of workers.
"""

import io

import numpy as np
import torch
from PIL import Image, ImageOps


def decode_rgb(data):
    """Encoded bytes -> 8-bit RGB PIL image: EXIF orientation applied, alpha dropped,
    16-bit scaled by 1/257 with rounding (as DALI's decoder does)."""
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if im.mode.startswith("I"):
        im = Image.fromarray(np.clip(np.round(np.asarray(im) / 257.0), 0, 255).astype(np.uint8))
    return im.convert("RGB")


def resize_crop_flip(im, size, pos_x, pos_y, flip):
    """Shorter side to `size`, a size x size crop at relative position (pos_x, pos_y) in [0, 1],
    optionally mirrored; returns an HWC uint8 array."""
    w, h = im.size
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((w, h), Image.BILINEAR)
    # pos * (free pixels), rounded half up as DALI's crop does (Python's round() goes to even).
    left, top = int((w - size) * pos_x + 0.5), int((h - size) * pos_y + 0.5)
    im = im.crop((left, top, left + size, top + size))
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(im)


class _Images(torch.utils.data.Dataset):
    def __init__(self, samples, cfg, seed):
        self.samples, self.cfg, self.seed = samples, cfg, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        pos_x, pos_y = rng.random(2) if self.cfg.random_crop else (0.5, 0.5)
        flip = self.cfg.random_flip and rng.random() < 0.5
        image = decode_rgb(self.samples[i].read())
        return resize_crop_flip(image, self.cfg.resolution, pos_x, pos_y, flip), i


def _collate(items):
    return torch.from_numpy(np.stack([a for a, _ in items])), [i for _, i in items]


class PilDecoder:
    name = "pil"

    def __init__(self, index, cfg, batch_size, seed, device):
        self.dataset = _Images(index.samples, cfg, seed)
        self.cfg, self.batch_size, self.device, self.seed = cfg, batch_size, device, seed

    def stream(self, plans, rank):
        """(images, ids) batches of this rank for the epochs in `plans`, one after another.
        One DataLoader for the whole run: its workers start once and prefetch across epochs."""
        def batches():
            for epoch, shards in plans:
                ids = shards[rank].tolist()
                for k in range(0, len(ids), self.batch_size):
                    yield [(epoch, i) for i in ids[k:k + self.batch_size]]

        # Its own generator: a DataLoader otherwise draws worker seeds from the global RNG when it
        # starts, which would shift the training noise of a resumed run.
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches(), num_workers=self.cfg.workers,
            collate_fn=_collate, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.seed))
        for images, ids in loader:
            yield self._finish(images), ids

    def _finish(self, images):
        x = images.to(self.device, non_blocking=True)
        if self.cfg.layout == "NCHW":
            x = x.permute(0, 3, 1, 2)
        x = (x.float() / 127.5 - 1.0).contiguous()
        return x.to(torch.bfloat16) if self.cfg.dtype == "bfloat16" else x
