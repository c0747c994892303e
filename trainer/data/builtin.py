"""The built-in dataset: public-domain and CC0 photographs that ship inside scikit-image.

Only images whose scikit-image docstring states CC0 or public domain are used (licenses
copied from skimage.data's docstrings, scikit-image 0.26); images with "no known copyright
restrictions" only (coins, immunohistochemistry), or no stated license (moon, page, the
stereo pair), and drawings (horse, text, logo) are left out. Captions are hand-written.
The files are copied unchanged (grayscale ones included: the loaders convert them).
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from trainer.data.config import cache_root

PHOTOS = [
    # (file in skimage/data, caption, license, source)
    ("astronaut.png",
     "portrait of a smiling astronaut in an orange flight suit holding a helmet, "
     "an American flag and a space shuttle model behind her",
     "public domain (NASA)", "https://flic.kr/p/r9qvLn"),
    ("brick.png", "black and white photo of a brick wall seen at an angle",
     "CC0", "https://cc0textures.com/view.php?tex=Bricks25"),
    ("camera.png",
     "black and white photo of a man in a dark coat looking through a camera on a tripod "
     "on a lawn, buildings in the distance",
     "CC0 (photographer Lav Varshney)", "https://github.com/scikit-image/scikit-image/issues/3927"),
    ("chelsea.png", "close-up of a tabby cat with green eyes looking into the camera",
     "CC0 (photographer Stefan van der Walt)", "scikit-image: skimage.data.chelsea"),
    ("clock_motion.png", "black and white photo of a wall clock, blurred by camera motion",
     "public domain (photographer Stefan van der Walt)", "scikit-image: skimage.data.clock"),
    ("coffee.png",
     "a cup of espresso on a red saucer with a spoon, on a wooden table, seen from above",
     "CC0 (photographer Rachel Michetti)", "scikit-image: skimage.data.coffee"),
    ("grass.png", "black and white close-up of a patch of grass",
     "CC0", "https://www.deviantart.com/linolafett/art/Grass-01-434853879"),
    ("gravel.png", "black and white close-up of gravel stones",
     "CC0", "https://cc0textures.com/view.php?tex=Gravel04"),
    ("hubble_deep_field.jpg",
     "deep space photo of countless small colorful galaxies on a black background",
     "public domain (NASA)",
     "http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/"),
    ("microaneurysms.png", "grayscale close-up of retinal blood vessels",
     "CC0 (Andreas Maier)", "https://www5.cs.fau.de/research/data/fundus-images/"),
    ("retina.jpg",
     "fundus photograph of a human retina, orange with branching red blood vessels",
     "CC0 1.0", "https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg"),
    ("rocket.jpg",
     "a rocket on its launch pad between lightning towers at dusk, lit by floodlights",
     "public domain (SpaceX)", "https://www.flickr.com/photos/spacexphotos/16511594820/"),
]
VERSION = 1  # bump when PHOTOS changes, so cached copies are rewritten


def builtin_dataset_path(cache_dir=None):
    """The built-in image folder (metadata.jsonl with text, license, source), written on
    first use under `cache_dir` (default $CCKERNELS_CACHE or ~/.cache/cckernels)."""
    import skimage.data  # only needed to find the files

    dest = cache_root(cache_dir) / f"cc-sample-v{VERSION}"
    if (dest / "metadata.jsonl").is_file():
        return str(dest)
    src = Path(skimage.data.__file__).parent
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Built in a temporary folder and renamed, so ranks racing here never see half a dataset.
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".cc-sample-"))
    rows = []
    for name, caption, license, source in PHOTOS:
        shutil.copyfile(src / name, tmp / name)
        rows.append({"file_name": name, "text": caption, "license": license, "source": source})
    (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        os.rename(tmp, dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp)
    return str(dest)
