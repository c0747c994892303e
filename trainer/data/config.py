"""The `data` section of a run config, validated once."""

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("folder", "webdataset", "latents")
BACKENDS = ("dali", "pil")
LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32", "bfloat16")
CAPTION_FIELDS = ("text", "synthetic_text")


def cache_root(cache_dir=None):
    """Where data caches live: `cache_dir`, else $CCKERNELS_CACHE, else ~/.cache/cckernels."""
    return Path(cache_dir or os.environ.get("CCKERNELS_CACHE", "~/.cache/cckernels")).expanduser()


@dataclass(frozen=True)
class DataConfig:
    path: str = "builtin"       # a folder, a WebDataset .tar or folder of .tar, "builtin",
                                # or (format latents) a folder written by trainer.precompute
    format: str = "folder"      # folder | webdataset | latents
    backend: str = "dali"       # dali | pil; dali falls back to pil when not importable
    resolution: int = 64        # square output side in pixels
    random_crop: bool = True    # False: centre crop
    random_flip: bool = True    # horizontal flip with probability 0.5
    workers: int = 2            # PIL DataLoader processes, or DALI CPU threads
    layout: str = "NCHW"        # NCHW | NHWC
    dtype: str = "float32"      # float32 | bfloat16
    caption_field: str = "text"  # text | synthetic_text (written by trainer.caption)

    @classmethod
    def from_dict(cls, d):
        """Builds the config from a mapping; unknown keys and bad values raise ValueError."""
        if isinstance(d, cls):
            return d
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown data config key(s) {unknown}; valid keys: {valid}")
        cfg = cls(**d)
        cfg._check()
        return cfg

    def _check(self):
        for name, allowed in (("format", FORMATS), ("backend", BACKENDS), ("layout", LAYOUTS),
                              ("dtype", DTYPES), ("caption_field", CAPTION_FIELDS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"data.{name}={value!r}; expected one of {list(allowed)}")
        for name, low in (("resolution", 1), ("workers", 0)):
            value = getattr(self, name)
            if type(value) is not int or value < low:
                raise ValueError(f"data.{name}={value!r}; expected an integer >= {low}")
        for name in ("random_crop", "random_flip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"data.{name}={getattr(self, name)!r}; expected true or false")
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"data.path={self.path!r}; expected a path or 'builtin'")
