"""Training data: image folders and WebDataset shards, decoded by DALI or PIL.

    from trainer.data import make_loader
    loader = make_loader(cfg["data"], batch_size, rank, world_size, seed, device,
                         start=state.get("data_position", (0, 0)), out_dir=out_dir)
    for images, captions in loader:      # endless; images (B, 3, R, R) in [-1, 1]
        ...
        state["data_position"] = loader.position()

`data.path: builtin` reads the Creative-Commons sample photographs (`builtin_dataset_path()`).
"""

from trainer.data.builtin import builtin_dataset_path
from trainer.data.config import DataConfig
from trainer.data.index import DatasetIndex, build_index
from trainer.data.loader import Loader, make_loader

__all__ = ["DataConfig", "DatasetIndex", "Loader", "build_index", "builtin_dataset_path",
           "make_loader"]
