"""Training data: image folders and WebDataset shards, decoded by DALI or PIL.

    from trainer.data import make_loader
    loader = make_loader(cfg["data"], batch_size, rank, world_size, seed, device,
                         start=state.get("data_position", (0, 0)), out_dir=out_dir)
    for images, captions in loader:      # endless; images (B, 3, R, R) in [-1, 1]
        ...
        state["data_position"] = loader.position()

`data.path: builtin` reads the Creative-Commons sample photographs (`builtin_dataset_path()`).
`data.format: latents` reads a folder written by `python -m trainer.precompute` and yields
(latents, text_embeddings) instead; `loader.empty_embedding` is the empty caption's.
`data.caption_field: synthetic_text` trains on the captions `python -m trainer.caption` wrote.
"""

from trainer.data.builtin import builtin_dataset_path
from trainer.data.config import DataConfig, cache_root
from trainer.data.index import DatasetIndex, build_index
from trainer.data.loader import LatentLoader, Loader, decode_once, make_loader

__all__ = ["DataConfig", "DatasetIndex", "LatentLoader", "Loader", "build_index",
           "builtin_dataset_path", "cache_root", "decode_once", "make_loader"]
