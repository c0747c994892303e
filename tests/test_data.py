import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import DataConfig, build_index, builtin_dataset_path, make_loader
from trainer.data import index as data_index
from trainer.data.index import ensure_dali_index, read_dali_index

try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
BACKENDS = ["pil", pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI,
                                                                  reason="DALI not importable"))]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # cuda: DALI "mixed" decoding
REPO = Path(__file__).resolve().parents[1]


def repo_env(drop=(), **extra):
    """os.environ for a subprocess that imports this checkout: REPO goes in front of
    PYTHONPATH, whose entries stay (run_gpu.sh puts the carried diffusers and DALI there);
    the variables named in drop are left out, extra ones set."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return dict(env, PYTHONPATH=path, **extra)


def smooth_image(seed, h, w):
    """A smooth colour field, different for every seed, so images are told apart easily."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [np.sin(rng.uniform(1, 6) * x + rng.uniform(1, 6) * y + rng.uniform(0, 6))
             for _ in range(3)]
    return ((np.stack(chans, -1) * 0.5 + 0.5) * 255).astype(np.uint8)


def encode(image, fmt="JPEG", mode=None, **kw):
    """Encoded bytes of an array or PIL image, optionally converted to `mode` first."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}), **kw)
    return buf.getvalue()


def make_folder(root, n, captions="txt"):
    """n images of odd sizes; captions from .txt files or from metadata.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        h, w = 40 + 3 * (i % 4), 56 - 5 * (i % 3)
        ext, fmt = ("png", "PNG") if i % 3 == 0 else ("jpg", "JPEG")
        (root / f"img{i:02d}.{ext}").write_bytes(encode(smooth_image(i, h, w), fmt))
        if captions == "txt":
            (root / f"img{i:02d}.txt").write_text(f"caption {i}\n")
        else:
            rows.append({"file_name": f"img{i:02d}.{ext}", "text": f"caption {i}",
                         "license": "CC0", "source": f"https://example.org/{i}"})
    if rows:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_shards(root, n, per_shard):
    """WebDataset shards; captions alternate between .txt and .json members."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, per_shard):
        with tarfile.open(root / f"shard-{s // per_shard:03d}.tar", "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                members = {f"{i:05d}.jpg": encode(smooth_image(i, 44, 52))}
                if i % 2:
                    members[f"{i:05d}.json"] = json.dumps({"caption": f"caption {i}",
                                                           "license": "CC-BY"}).encode()
                else:
                    members[f"{i:05d}.txt"] = f"caption {i}".encode()
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def cfg(path, backend, fmt="folder", **kw):
    return dict(dict(path=str(path), format=fmt, backend=backend, resolution=16,
                     random_crop=False, random_flip=False, workers=0), **kw)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


# ---- config and index ---------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    ({"resolutionn": 64}, "unknown data config key"),
    ({"backend": "opencv"}, "data.backend='opencv'"),
    ({"format": "lmdb"}, "data.format='lmdb'"),
    ({"resolution": 0}, "data.resolution=0"),
    ({"layout": "CHW"}, "data.layout='CHW'"),
    ({"random_crop": "yes"}, "data.random_crop='yes'"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        DataConfig.from_dict(bad)


def test_loader_argument_errors(tmp_path, cache):
    folder = make_folder(tmp_path / "d", 4)
    with pytest.raises(ValueError, match="batch_size=0"):
        make_loader(cfg(folder, "pil"), 0, cache_dir=cache)
    with pytest.raises(ValueError, match="rank=2"):
        make_loader(cfg(folder, "pil"), 1, rank=2, world_size=2, cache_dir=cache)
    with pytest.raises(ValueError, match="4 readable images cannot fill one batch of 3 on each of 2 ranks: a batch "
                                         "size of at most 2 can"):
        make_loader(cfg(folder, "pil"), 3, world_size=2, cache_dir=cache)
    with pytest.raises(ValueError, match="cannot fill one batch of 1 on each of 5 ranks: fewer images than ranks"):
        make_loader(cfg(folder, "pil"), 1, world_size=5, cache_dir=cache)
    with pytest.raises(ValueError, match="does not exist"):
        make_loader(cfg(tmp_path / "nowhere", "pil"), 1, cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no readable image in .*empty' \(format=folder\): no .jpg, .jpeg, .png, "
                                         r".webp file there$"):
        make_loader(cfg(tmp_path / "empty", "pil"), 1, cache_dir=cache)
    (tmp_path / "empty" / "index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"it holds precomputed latents: data.format=latents"):
        make_loader(cfg(tmp_path / "empty", "pil"), 1, cache_dir=cache)


def test_folder_captions(tmp_path, cache):
    root = make_folder(tmp_path / "d", 3, captions="jsonl")
    (root / "sub").mkdir()
    (root / "sub" / "a.jpg").write_bytes(encode(smooth_image(7, 30, 30)))
    (root / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.jpg", "text": "from sub", "license": "CC-BY-SA"}) + "\n")
    (root / "b.webp").write_bytes(encode(smooth_image(8, 30, 30), "WEBP"))
    (root / "b.txt").write_text("  from txt \n")
    (root / "c.jpg").write_bytes(encode(smooth_image(9, 30, 30)))   # no caption at all
    index = build_index(root, cache_dir=cache)
    by_name = {s.name: s for s in index.samples}
    assert sorted(by_name) == ["b.webp", "c.jpg", "img00.png", "img01.jpg", "img02.jpg", "sub/a.jpg"]
    assert by_name["img01.jpg"].caption == "caption 1"
    assert (by_name["img01.jpg"].license, by_name["img01.jpg"].source) == ("CC0", "https://example.org/1")
    assert (by_name["sub/a.jpg"].caption, by_name["sub/a.jpg"].license) == ("from sub", "CC-BY-SA")
    assert by_name["b.webp"].caption == "from txt"
    assert by_name["c.jpg"].caption == "" and index.missing_captions == 1
    (root / "metadata.jsonl").write_text('{"text": "no file name"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: expected a JSON object with 'file_name'"):
        build_index(root, cache_dir=cache)


def test_metadata_rows_that_do_not_fit(tmp_path, cache, caplog):
    # A row without the caption field keeps the .txt caption; "./" names the same file; a row
    # naming no image is warned about; a bad file_name or a non-UTF-8 jsonl names the file.
    root = make_folder(tmp_path / "d", 3)
    rows = [{"file_name": "img00.png", "license": "CC0"}, {"file_name": "./img01.jpg", "text": "from jsonl"},
            {"file_name": "gone.jpg", "text": "no such file"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        by_name = {s.name: s for s in build_index(root, cache_dir=cache).samples}
    assert (by_name["img00.png"].caption, by_name["img00.png"].license) == ("caption 0", "CC0")
    assert by_name["img01.jpg"].caption == "from jsonl"
    assert "1 metadata.jsonl row(s) name no image" in caplog.text and "metadata.jsonl:3 gone.jpg" in caplog.text
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": ["img00.png"]}) + "\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: .*file_name is list, not a string"):
        build_index(root, cache_dir=cache)
    (root / "metadata.jsonl").write_bytes(b'{"file_name": "img00.png", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl is not UTF-8"):
        build_index(root, cache_dir=cache)


def test_byte_order_marks_and_captions_that_are_not_utf8(tmp_path, cache, caplog):
    # A BOM (Windows editors) starts no row nor caption; a .txt that is not UTF-8 is read with
    # U+FFFD, counted and named once; a row without text takes the .txt, as it is now.
    root = make_folder(tmp_path / "d", 4)
    (root / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"file_name": "img00.png"}).encode() + b"\n")
    (root / "img01.txt").write_bytes(b"\xef\xbb\xbfwith a BOM")
    (root / "img02.txt").write_bytes(b"caf\xe9")
    (root / "img03.txt").write_bytes(b"na\xefve")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        by_name = {s.name: s.caption for s in build_index(root, cache_dir=cache).samples}
    assert by_name == {"img00.png": "caption 0", "img01.jpg": "with a BOM", "img02.jpg": "caf\ufffd",
                       "img03.png": "na\ufffdve"}
    assert "2 captions are not UTF-8" in caplog.text and "e.g. img02.txt" in caplog.text
    (root / "img00.txt").write_text("edited")
    assert build_index(root, cache_dir=cache).samples[0].caption == "edited"


def test_a_dataset_without_captions_is_warned_about(tmp_path, cache, caplog):
    root = make_folder(tmp_path / "d", 2, captions="jsonl")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        build_index(root, cache_dir=cache, caption_field="synthetic_text")  # no row has it
    assert "none of the 2 images" in caplog.text and "data.caption_field=synthetic_text" in caplog.text


def test_files_that_cannot_be_read_are_skipped_and_checked_again(tmp_path, cache, monkeypatch):
    # A permission error on an image or its caption (a run as another user) skips that image
    # and lists why; it is not cached as bad: readable again, the image is used again.
    root = make_folder(tmp_path / "d", 3)
    read_bytes, read_file = data_index.read_bytes, Path.read_bytes

    def no_access(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data_index, "read_bytes", lambda path, *a: (no_access if "img01" in path else read_bytes)(path, *a))
    monkeypatch.setattr(Path, "read_bytes", lambda self: (no_access if self.name == "img02.txt" else read_file)(self))
    index = build_index(root, cache_dir=cache)
    assert [s.name for s in index.samples] == ["img00.png"]
    assert dict(index.skipped) == {"img01.jpg": "unreadable (PermissionError: Permission denied)",
                                   "img02.jpg": "caption img02.txt unreadable (PermissionError: Permission denied)"}
    monkeypatch.undo()
    assert [s.name for s in build_index(root, cache_dir=cache).samples] == ["img00.png", "img01.jpg", "img02.jpg"]


def test_a_file_name_that_is_not_utf8(tmp_path, cache):
    # os.fsdecode gives such a name surrogate escapes, which UTF-8 writers (skipped_files.txt,
    # logs, pytest-xdist's reports) refuse: shown backslash-escaped. Where DALI is installed
    # both backends skip it (DALI's reader cannot open it).
    root = make_folder(tmp_path / "d", 2)
    name = os.fsdecode(b"caf\xe9.jpg")
    (root / name).write_bytes(b"")
    out = tmp_path / "out"
    build_index(root, cache_dir=cache).report(str(out))
    assert (out / "skipped_files.txt").read_text() == "caf\\udce9.jpg\tempty file\n"
    (root / name).write_bytes(encode(smooth_image(3, 30, 30)))
    index = build_index(root, cache_dir=cache)
    if HAVE_DALI:
        assert index.skipped == [("caf\\udce9.jpg", "file name is not UTF-8 (DALI's reader cannot open it)")]
    else:
        assert "caf\\udce9.jpg" in [s.name for s in index.samples]  # shown escaped, read by its path


def test_folder_scan_follows_links_and_lists_what_it_passes_over(tmp_path, cache, monkeypatch, caplog):
    # rglob passed over folders it could not list, links to nothing and .gif/.bmp files without a
    # word, and did not follow links to folders (a dataset assembled from links lost them all).
    root = make_folder(tmp_path / "d", 2)
    outside = make_folder(tmp_path / "elsewhere", 1, captions="jsonl")
    (root / "more").symlink_to(outside)                        # followed, with its metadata.jsonl
    (root / "again").symlink_to(root)                          # a loop: each real folder once
    (root / "a-link").symlink_to(root / "sub")                 # the names are sub/'s, read once
    make_folder(root / "sub", 1, captions="jsonl")
    (root / "twin.jpg").symlink_to(root / "img01.jpg")         # one file, two names: taken once
    (root / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (root / "anim.gif").write_bytes(encode(smooth_image(5, 20, 20), "GIF"))
    (root / "locked").mkdir()
    (root / "locked" / "img.jpg").write_bytes(encode(smooth_image(6, 20, 20)))
    scandir = os.scandir

    def no_access(path):  # the test runs as root, whom permissions do not stop
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", no_access)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        index = build_index(root, cache_dir=cache)
    assert "name no image" not in caplog.text  # a-link/metadata.jsonl is sub/'s, read once
    assert [(s.name, s.caption) for s in index.samples] == [
        ("img00.png", "caption 0"), ("img01.jpg", "caption 1"), ("more/img00.png", "caption 0"),
        ("sub/img00.png", "caption 0")]
    assert dict(index.skipped) == {
        "anim.gif": "unsupported image type .gif (the loaders read .jpg, .jpeg, .png, .webp)",
        "gone.jpg": "symbolic link to nothing",
        "locked/": "folder unreadable (PermissionError: Permission denied)"}


def test_huge_images_and_odd_names_are_listed(tmp_path, cache, monkeypatch):
    root = make_folder(tmp_path / "d", 1)
    (root / "big.png").write_bytes(encode(smooth_image(1, 100, 100), "PNG"))
    (root / "tab\there.jpg").write_bytes(b"")
    (root / "line\nbreak.jpg").write_bytes(b"")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2300)  # 10000 pixels > 2x: PIL refuses to open it
    build_index(root, cache_dir=cache).report(str(tmp_path / "out"))
    lines = (tmp_path / "out" / "skipped_files.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == ["big.png", "line\\nbreak.jpg", "tab\\there.jpg"]
    assert lines[0].startswith("big.png\ttoo large to decode safely (Image size (10000 pixels) exceeds limit")


def bad_files(root):
    """Every awkward case: the first six are unusable, the rest must be converted."""
    root.mkdir(parents=True)
    rgb = smooth_image(1, 36, 44)
    rgba = np.concatenate([rgb, np.full((36, 44, 1), 90, np.uint8)], -1)
    gray16 = (smooth_image(2, 36, 44)[..., 0].astype(np.uint16) * 257 + 100)
    files = {
        "empty.jpg": b"",
        "truncated.jpg": encode(rgb)[:-300],
        "text.jpg": b"this is not an image\n" * 10,
        "bitmap.jpg": encode(rgb, "BMP"),
        "animated.png": encode(rgb, "PNG", save_all=True, append_images=[Image.fromarray(rgb[::-1])]),
        "strip.png": encode(np.tile(rgb[:2], (1, 10, 1)), "PNG"),  # 440x2: the crop would be a sliver
        "cmyk.jpg": encode(rgb, mode="CMYK"),
        "palette.png": encode(Image.fromarray(rgb).quantize(64), "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "gray.jpg": encode(rgb[..., 0]),
        "gray16.png": encode(gray16, "PNG"),
        # A camera JPEG with a preview image after it: PIL calls it MPO, with 2 frames.
        "mpo.jpg": encode(rgb, "MPO", save_all=True, append_images=[Image.fromarray(rgb[::-1])]),
        "good.jpg": encode(rgb),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def test_bad_files_are_skipped_and_listed(tmp_path, cache, caplog):
    root = bad_files(tmp_path / "bad")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        loader = make_loader(cfg(root, "pil"), 2, cache_dir=cache, out_dir=str(out))
    reasons = dict(line.split("\t") for line in (out / "skipped_files.txt").read_text().splitlines())
    assert reasons == {"empty.jpg": "empty file",
                       "text.jpg": "not an image (UnidentifiedImageError)",
                       "bitmap.jpg": "unsupported format BMP",
                       "animated.png": "animated image",
                       "strip.png": "aspect ratio over 16:1 (440x2)",
                       "truncated.jpg": reasons["truncated.jpg"]}
    assert reasons["truncated.jpg"].startswith("truncated or corrupt")
    assert "6 unreadable skipped" in caplog.text and "skipped_files.txt" in caplog.text
    assert "7 without caption" in caplog.text
    assert sorted(s.name for s in loader.index.samples) == [
        "cmyk.jpg", "good.jpg", "gray.jpg", "gray16.png", "mpo.jpg", "palette.png", "rgba.png"]
    # Once the bad files are gone, the list of an earlier run does not stay behind.
    for name in reasons:
        (root / name).unlink()
    make_loader(cfg(root, "pil"), 2, cache_dir=cache, out_dir=str(out))
    assert not (out / "skipped_files.txt").exists()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_never_crash_and_convert(tmp_path, cache, backend, device):
    root = bad_files(tmp_path / "bad")
    # resolution 36 = the images' short side: no resampling, so pixels can be checked exactly.
    loader = make_loader(cfg(root, backend, resolution=36, layout="NHWC"), 2, device=device,
                         cache_dir=cache)
    names = [s.name for s in loader.index.samples]
    got, it = {}, iter(loader)
    for epoch in range(4):  # 7 images, 3 batches of 2 per epoch: the one left out changes
        ids = loader.shards(epoch)[0]
        for k in range(3):
            images, _ = next(it)
            assert images.shape == (2, 36, 36, 3) and torch.isfinite(images).all()
            assert images.device.type == device
            for j, i in enumerate(ids[2 * k:2 * k + 2]):
                got[names[i]] = ((images[j] + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    assert len(got) == 7
    rgb = smooth_image(1, 36, 44)[:, 4:40]
    palette = np.asarray(Image.fromarray(smooth_image(1, 36, 44)).quantize(64).convert("RGB"))[:, 4:40]
    gray16 = smooth_image(2, 36, 44)[..., 0].astype(np.uint16) * 257 + 100
    close = {"rgba.png": rgb, "palette.png": palette, "good.jpg": rgb, "cmyk.jpg": rgb, "mpo.jpg": rgb,
             "gray16.png": np.repeat(np.round(gray16[:, 4:40, None] / 257.0), 3, -1)}
    # Lossless PNGs exactly, JPEGs within their loss: 3 levels on average for PIL's and DALI's CPU
    # decoders; nvJPEG (DALI mixed) upsamples chroma differently: 3.6 on good.jpg (H200, DALI 2.4).
    jpeg_tol = 5 if (backend, device) == ("dali", "cuda") else 3
    for name, want in close.items():
        assert np.abs(got[name].astype(int) - want).mean() < (0.01 if ".png" in name else jpeg_tol), name
    assert (got["gray.jpg"][..., 0] == got["gray.jpg"][..., 2]).all()


def test_unsupported_mode(tmp_path, cache, monkeypatch):
    root = bad_files(tmp_path / "bad")
    monkeypatch.setattr(data_index, "IMAGE_MODES", tuple(m for m in data_index.IMAGE_MODES
                                                         if m != "CMYK"))
    assert dict(build_index(root, cache_dir=cache).skipped)["cmyk.jpg"] == "unsupported mode CMYK"


@pytest.mark.skipif(not HAVE_DALI, reason="DALI not importable")
def test_files_dali_cannot_decode_are_skipped(tmp_path, cache):
    """PIL reads a small lossless WebP with EXIF; DALI 2.4's WebP parser does not, and would stop
    a DALI run mid-epoch. The index pass checks with DALI's decoder too."""
    from trainer.data.dali import undecodable

    root = make_folder(tmp_path / "d", 5)
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "exif.webp").write_bytes(encode(smooth_image(1, 36, 44), "WEBP", lossless=True, exif=exif))
    index = build_index(root, cache_dir=cache)
    reasons = undecodable([s for s in index.samples] + [data_index._Candidate(
        str(root / "exif.webp"), -1, 0, "exif.webp")], threads=1, batch_size=4)
    assert reasons[:5] == [None] * 5  # the batch holding the bad file is checked one by one
    if reasons[5] is not None:        # with the DALI that has this bug
        assert reasons[5].startswith("DALI cannot decode it")
        assert dict(index.skipped)["exif.webp"] == reasons[5]
    for backend in ("dali", "pil"):   # both see the same samples, and neither crashes
        loader = make_loader(cfg(root, backend), 5, cache_dir=cache)
        assert [s.name for s in loader.index.samples] == [s.name for s in index.samples]
        take(loader, 2)


def test_no_readable_image(tmp_path, cache):
    root = tmp_path / "d"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    (root / "b.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no readable image.*2 image file"):
        make_loader(cfg(root, "pil"), 1, cache_dir=cache)


def test_validation_cache(tmp_path, cache, monkeypatch):
    root = make_folder(tmp_path / "d", 5)
    build_index(root, cache_dir=cache)
    checked = []
    real = data_index.check_image
    monkeypatch.setattr(data_index, "check_image", lambda data: checked.append(1) or real(data))
    build_index(root, cache_dir=cache)
    assert checked == []
    path = root / "img01.jpg"
    path.write_bytes(path.read_bytes()[:300])            # damaged after the first run
    index = build_index(root, cache_dir=cache)
    assert len(checked) == 1
    assert [n for n, _ in index.skipped] == ["img01.jpg"]


# ---- order, sharding, both backends -----------------------------------------------------------


@pytest.mark.parametrize("n, world, batch", [(12, 2, 3), (13, 3, 2), (7, 1, 7)])
def test_shards_disjoint_and_cover(tmp_path, cache, n, world, batch):
    root = make_folder(tmp_path / "d", n)
    loaders = [make_loader(cfg(root, "pil"), batch, rank=r, world_size=world, seed=3,
                           cache_dir=cache) for r in range(world)]
    per_rank = n // world // batch * batch
    for epoch in range(2):
        seen = [sorted(c for _, caps in take(ld, per_rank // batch) for c in caps) for ld in loaders]
        flat = [c for s in seen for c in s]
        assert len(flat) == len(set(flat)) == world * per_rank  # disjoint, full batches only
        assert all(ld.position() == (epoch + 1, 0) for ld in loaders)
    # Over epochs, the dropped remainder changes: everything is seen eventually.
    ld = loaders[0]
    everything = set()
    for epoch in range(20):
        for shard in ld.shards(epoch):
            everything.update(shard.tolist())
    assert everything == set(range(n))


def test_epoch_order_depends_on_seed_and_epoch(tmp_path, cache):
    root = make_folder(tmp_path / "d", 10)
    a = make_loader(cfg(root, "pil"), 5, seed=0, cache_dir=cache)
    b = make_loader(cfg(root, "pil"), 5, seed=1, cache_dir=cache)
    assert not np.array_equal(a.shards(0)[0], a.shards(1)[0])
    assert not np.array_equal(a.shards(0)[0], b.shards(0)[0])
    assert np.array_equal(a.shards(4)[0], make_loader(cfg(root, "pil"), 5, seed=0,
                                                      cache_dir=cache).shards(4)[0])


def assert_same_pairs(batches_a, batches_b):
    """Same captions in the same batches, and each image is nearest its counterpart."""
    for (xa, ca), (xb, cb) in zip(batches_a, batches_b, strict=True):
        assert ca == cb
        d = (xa[:, None].float() - xb[None].float()).abs().mean(dim=(2, 3, 4))
        assert (d.argmin(dim=1) == torch.arange(len(ca))).all()
        assert d.diagonal().max() < 0.03, d.diagonal()


@pytest.mark.skipif(not HAVE_DALI, reason="DALI not importable")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["folder", "webdataset"])
@pytest.mark.parametrize("pipeline_samples", [1, 8192], ids=["pipeline-per-epoch", "one-pipeline"])
def test_backends_deliver_same_pairs(tmp_path, cache, fmt, device, pipeline_samples, monkeypatch):
    import trainer.data.dali

    monkeypatch.setattr(trainer.data.dali, "PIPELINE_SAMPLES", pipeline_samples)
    root = (make_folder(tmp_path / "d", 11) if fmt == "folder"
            else make_shards(tmp_path / "w", 11, per_shard=4))
    for rank in range(2):
        got = {b: take(make_loader(cfg(root, b, fmt), 2, rank=rank, world_size=2, seed=5,
                                   device=device, cache_dir=cache), 4)  # 2 epochs of 2 batches
               for b in ("pil", "dali")}
        assert all(x.device.type == device for b in got.values() for x, _ in b)
        assert_same_pairs(*([(x.cpu(), c) for x, c in got[b]] for b in ("pil", "dali")))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout, dtype", [("NCHW", "float32"), ("NHWC", "bfloat16")])
def test_layout_dtype_and_augmentation(tmp_path, cache, backend, layout, dtype):
    root = make_folder(tmp_path / "d", 4)
    loader = make_loader(cfg(root, backend, layout=layout, dtype=dtype, random_crop=True,
                             random_flip=True), 4, seed=2, cache_dir=cache)
    images, captions = take(loader, 1)[0]
    shape = (4, 3, 16, 16) if layout == "NCHW" else (4, 16, 16, 3)
    assert images.shape == shape and images.is_contiguous() and len(captions) == 4
    assert images.dtype == getattr(torch, dtype)
    assert -1 <= images.min() and images.max() <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_position(tmp_path, cache, backend):
    root = make_folder(tmp_path / "d", 12)
    kw = dict(rank=1, world_size=2, seed=7, cache_dir=cache)
    c = cfg(root, backend)
    full = take(make_loader(c, 2, **kw), 9)                  # 3 batches per epoch, 3 epochs
    loader = make_loader(c, 2, **kw)
    take(loader, 4)
    assert loader.position() == (1, 2)
    resumed = take(make_loader(c, 2, start=loader.position(), **kw), 5)
    assert [caps for _, caps in resumed] == [caps for _, caps in full[4:]]
    if backend == "pil":  # augmentation is keyed by sample, so even the pixels match
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, full[4:]))
    with pytest.raises(ValueError, match=r"start=\(0, 3\) is no position"):
        make_loader(c, 2, start=(0, 3), **kw)
    assert make_loader(c, 2, start=(1, 6), **kw).position() == (2, 0)


def test_pil_workers_do_not_change_the_result(tmp_path, cache):
    root = make_folder(tmp_path / "d", 6)
    c = dict(random_crop=True, random_flip=True)
    runs = [take(make_loader(cfg(root, "pil", workers=w, **c), 2, seed=4, cache_dir=cache), 5)
            for w in (0, 2)]                                # 3 batches per epoch: crosses one
    for (a, ca), (b, cb) in zip(*runs):
        assert ca == cb and torch.equal(a, b)


def test_distributed_rank0_validates_first(tmp_path, cache, monkeypatch):
    root = make_folder(tmp_path / "d", 8)
    events = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: events.append("barrier"))
    real = data_index.check_image
    monkeypatch.setattr(data_index, "check_image", lambda data: events.append("check") or real(data))
    make_loader(cfg(root, "pil"), 2, rank=0, world_size=2, cache_dir=cache)
    assert events == ["check"] * 8 + ["barrier"]          # rank 0: validate, then release
    events.clear()
    make_loader(cfg(root, "pil"), 2, rank=1, world_size=2, cache_dir=cache)
    assert events == ["barrier"]                           # rank 1: wait, then read the cache


def test_dali_fallback_to_pil(tmp_path, cache, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)   # makes the import fail
    root = make_folder(tmp_path / "d", 2)
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        loader = make_loader(cfg(root, "dali"), 2, cache_dir=cache)
    assert "falling back to the PIL DataLoader" in caplog.text
    assert loader.decoder.name == "pil"


# ---- WebDataset ---------------------------------------------------------------------------


def test_webdataset_index_files(tmp_path, cache):
    root = make_shards(tmp_path / "w", 6, per_shard=4)
    idx = root / "shard-000.idx"
    assert not idx.exists()
    index = build_index(root, "webdataset", cache_dir=cache)
    assert idx.exists() and (root / "shard-001.idx").exists()
    assert [s.caption for s in index.samples] == [f"caption {i}" for i in range(6)]
    assert index.samples[1].license == "CC-BY"
    entries = read_dali_index(idx)
    assert [[c[0] for c in e] for e in entries] == [["jpg", "txt"], ["jpg", "json"]] * 2
    wds2idx = pytest.importorskip("wds2idx")  # DALI's own tool, when installed
    with wds2idx.IndexCreator(str(root / "shard-000.tar"), str(tmp_path / "ref.idx"),
                              verbose=False) as creator:
        creator.create_index()
    assert idx.read_text() == (tmp_path / "ref.idx").read_text()
    # An existing, up-to-date index is used as it is; a stale one is rebuilt.
    mtime = idx.stat().st_mtime_ns
    ensure_dali_index(root / "shard-000.tar")
    assert idx.stat().st_mtime_ns == mtime
    os.utime(idx, ns=(0, 0))
    ensure_dali_index(root / "shard-000.tar")
    assert idx.stat().st_mtime_ns > 0 and idx.read_text() == (tmp_path / "ref.idx").read_text()
    idx.write_text("v1.1 2\n")  # an older index version is rewritten, not misread
    ensure_dali_index(root / "shard-000.tar")
    assert idx.read_text() == (tmp_path / "ref.idx").read_text()


@pytest.mark.parametrize("backend", BACKENDS)
def test_webdataset_read_only_folder(tmp_path, cache, backend, monkeypatch):
    """Where the shards' folder is read-only, their DALI indexes go to the cache folder."""
    root = make_shards(tmp_path / "w", 6, per_shard=3)
    write = data_index.write_dali_index

    def read_only(path, samples):
        if Path(path).parent == root:
            raise PermissionError(13, "Read-only file system", str(path))
        write(path, samples)

    monkeypatch.setattr(data_index, "write_dali_index", read_only)
    loader = make_loader(cfg(root, backend, "webdataset"), 3, cache_dir=cache)
    assert not list(root.glob("*.idx")) and len(list(Path(cache).glob("wds-index/*.idx"))) == 2
    assert sorted(c for _, caps in take(loader, 2) for c in caps) == [f"caption {i}" for i in range(6)]
    stamps = sorted(p.stat().st_mtime_ns for p in Path(cache).glob("wds-index/*.idx"))
    build_index(root, "webdataset", cache_dir=cache)  # the cached indexes are used as they are
    assert sorted(p.stat().st_mtime_ns for p in Path(cache).glob("wds-index/*.idx")) == stamps


@pytest.mark.parametrize("backend", BACKENDS)
def test_webdataset_shard_names_with_dots(tmp_path, cache, backend):
    """part.0.tar and part.1.tar get an index each (one shared part.idx read part.1.tar at
    part.0.tar's offsets: images lost as 'truncated', captions paired with other images)."""
    root = make_shards(tmp_path / "w", 8, per_shard=4)
    for k in range(2):
        (root / f"shard-{k:03d}.tar").rename(root / f"part.{k}.tar")
    loader = make_loader(cfg(root, backend, "webdataset"), 4, cache_dir=cache)
    assert sorted(p.name for p in root.glob("*.idx")) == ["part.0.idx", "part.1.idx"]
    assert not loader.index.skipped
    assert [s.caption for s in loader.index.samples] == [f"caption {i}" for i in range(8)]
    want = {f"caption {i}": smooth_image(i, 44, 52)[:, 4:48] for i in range(8)}
    for images, captions in take(make_loader(cfg(root, backend, "webdataset", resolution=44,
                                                 layout="NHWC"), 4, cache_dir=cache), 2):
        for x, c in zip(images, captions):  # each image with its own caption
            assert np.abs(((x + 1) * 127.5).numpy() - want[c]).mean() < 3, c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_index", [False, True])
def test_webdataset_bad_members(tmp_path, cache, backend, with_index):
    root = make_shards(tmp_path / "w", 4, per_shard=4)
    with tarfile.open(root / "shard-001.tar", "w") as tar:
        for name, data in {"a.jpg": b"", "b.png": b"garbage", "c.jpg": encode(smooth_image(9, 30, 40)),
                           "d.txt": b"caption without image"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if with_index:
        for shard in root.glob("*.tar"):
            ensure_dali_index(shard)
    loader = make_loader(cfg(root, backend, "webdataset"), 5, cache_dir=cache,
                         out_dir=str(tmp_path / "out"))
    assert sorted(n for n, _ in loader.index.skipped) == ["shard-001.tar/a.jpg", "shard-001.tar/b.png",
                                                          "shard-001.tar/d.txt"]  # no image: listed too
    assert loader.index.missing_captions == 1
    captions = sorted(c for _, caps in take(loader, 2) for c in caps)
    assert captions == sorted(["", "caption 0", "caption 1", "caption 2", "caption 3"] * 2)


def test_webdataset_captions_not_utf8_or_not_json(tmp_path, cache, caplog):
    # As in folders: a caption that is not UTF-8 is read with U+FFFD, counted and named; a BOM
    # starts no caption; a sample whose caption .json is no JSON object is skipped and listed
    # (it trained on the empty caption); next to a .txt caption it costs only the licence.
    root = tmp_path / "w"
    root.mkdir()
    image = encode(smooth_image(1, 30, 40))
    samples = {"a": {"txt": b"caf\xe9"}, "b": {"txt": b"\xef\xbb\xbfbom"}, "c": {"json": b'{"caption": "na\xefve"}'},
               "d": {"json": b'{"caption": '}, "e": {"json": b'["a list"]'}, "f": {"json": b"{", "txt": b"kept"}}
    with tarfile.open(root / "s.tar", "w") as tar:
        for key, members in samples.items():
            for ext, data in {"jpg": image, **members}.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        index = build_index(root, "webdataset", cache_dir=cache)
    assert {s.name: s.caption for s in index.samples} == {"s.tar/a.jpg": "caf\ufffd", "s.tar/b.jpg": "bom",
                                                          "s.tar/c.jpg": "na\ufffdve", "s.tar/f.jpg": "kept"}
    assert "2 captions are not UTF-8" in caplog.text and "e.g. s.tar/a.txt" in caplog.text
    skipped = dict(index.skipped)
    assert sorted(skipped) == ["s.tar/d.jpg", "s.tar/e.jpg"]
    assert "s.tar/d.json is no JSON object (not JSON: " in skipped["s.tar/d.jpg"]
    assert "(a JSON list)" in skipped["s.tar/e.jpg"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_webdataset_member_names_the_index_cannot_hold(tmp_path, cache, backend):
    # White space (the DALI index's separator) or bytes that are not UTF-8 in a member name
    # broke the whole shard's index: every sample of the shard was lost. Now escaped in the
    # index; the samples load (by offset) with their captions. A dotted key (img.001.jpg: key
    # img, extension 001.jpg) has no image member: listed, not dropped silently.
    root = tmp_path / "w"
    root.mkdir()
    members = {"my pic.jpg": encode(smooth_image(1, 30, 40)), "my pic.txt": b"spaced",
               os.fsdecode(b"caf\xe9.jpg"): encode(smooth_image(2, 30, 40)), os.fsdecode(b"caf\xe9.txt"): b"latin-1",
               "k.jpg": encode(smooth_image(3, 30, 40)), "k.txt": b"plain",
               "img.001.jpg": encode(smooth_image(4, 30, 40)), "img.001.txt": b"dotted"}
    with tarfile.open(root / "s.tar", "w", encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    loader = make_loader(cfg(root, backend, "webdataset"), 3, cache_dir=cache)
    assert dict(loader.index.skipped) == {"s.tar/img.001.jpg, img.001.txt": "no jpg/jpeg/png/webp member in the sample"}
    assert sorted(s.caption for s in loader.index.samples) == ["latin-1", "plain", "spaced"]
    assert "s.tar/my%20pic.jpg" in [s.name for s in loader.index.samples]
    assert sorted(c for _, caps in take(loader, 1) for c in caps) == ["latin-1", "plain", "spaced"]
    # an index an older version wrote from the raw names (unparseable) is written anew
    (root / "s.idx").write_text("v1.2 1\njpg 512 100 my pic.jpg\n")
    assert len(build_index(root, "webdataset", cache_dir=cache)) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_webdataset_damaged_shards_are_skipped(tmp_path, cache, backend):
    root = make_shards(tmp_path / "w", 12, per_shard=4)                  # shards 000 to 002
    at = {m.name: m for m in tarfile.open(root / "shard-001.tar")} | {m.name: m for m in tarfile.open(root / "shard-002.tar")}
    data = (root / "shard-001.tar").read_bytes()
    (root / "shard-001.tar").write_bytes(data[:at["00006.jpg"].offset_data + 10])  # a download cut short
    data = bytearray((root / "shard-002.tar").read_bytes())
    (root / "shard-006.tar").write_bytes(data[:at["00010.jpg"].offset + 100])      # cut inside a header
    data[at["00010.jpg"].offset:at["00010.jpg"].offset + 512] = b"x" * 512
    (root / "shard-007.tar").write_bytes(data)                                     # a garbled header
    (root / "shard-003.tar").write_bytes(b"not a tar archive\n" * 40)
    tarfile.open(root / "shard-004.tar", "w").close()                   # no sample at all
    with tarfile.open(root / "shard-005.tar", "w:gz") as tar:           # compressed: offsets unusable
        tar.add(root / "shard-000.tar", arcname="00000.jpg")
    loader = make_loader(cfg(root, backend, "webdataset"), 2, cache_dir=cache,
                         out_dir=str(tmp_path / "out"))
    reasons = dict(loader.index.skipped)
    assert sorted(reasons) == ["shard-001.tar", "shard-003.tar", "shard-004.tar", "shard-005.tar",
                               "shard-006.tar", "shard-007.tar"]
    assert all(reasons[f"shard-00{k}.tar"].startswith("unreadable WebDataset shard") for k in (3, 4, 5))
    assert reasons["shard-001.tar"] == (f"damaged WebDataset shard (cut short at byte {at['00006.jpg'].offset_data + 10}, "
                                        "inside a member): the 2 samples before the damage are used, any after it lost")
    for k in (6, 7):  # the sample before the damage (9) may have had members after it: not used
        assert reasons[f"shard-00{k}.tar"] == (f"damaged WebDataset shard (no valid tar header at byte {at['00010.jpg'].offset}): "
                                               "the sample before the damage is used, any after it lost")
    assert not (root / "shard-001.idx").exists()  # read again, and reported, every run
    assert "shard-001.tar\tdamaged" in (tmp_path / "out" / "skipped_files.txt").read_text()
    captions = sorted(c for _, caps in take(loader, 6) for c in caps)
    assert captions == sorted(f"caption {i}" for i in [0, 1, 2, 3, 4, 5, 8, 8, 8, 9, 10, 11])
    for name in ("shard-000.tar", "shard-001.tar", "shard-002.tar", "shard-006.tar", "shard-007.tar"):
        (root / name).write_bytes(b"")
    with pytest.raises(ValueError, match="no readable image.*8 image file"):
        build_index(root, "webdataset", cache_dir=cache)


# ---- built-in data and benchmark ------------------------------------------------------------


def test_builtin_dataset(tmp_path):
    path = builtin_dataset_path(tmp_path / "cache")
    assert builtin_dataset_path(tmp_path / "cache") == path
    rows = [json.loads(line) for line in open(os.path.join(path, "metadata.jsonl"))]
    assert len(rows) >= 10
    for row in rows:
        assert row["text"] and row["source"]
        assert "CC0" in row["license"] or "public domain" in row["license"]
    index = build_index(path, cache_dir=tmp_path / "cache")
    assert len(index) == len(rows) and not index.skipped and index.missing_captions == 0


def test_bench_data_tiny(tmp_path):
    out = tmp_path / "bench"
    env = repo_env(CCKERNELS_CACHE=str(tmp_path / "cache"))
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_data.py"), "--tiny",
                    "--out", str(out)], check=True, env=env, timeout=300)
    result = json.loads((out / "bench_data.json").read_text())
    assert {r["backend"] for r in result["rows"]} >= {"pil"}
    assert all(r["images_per_s"] > 0 for r in result["rows"])
    assert (out / "bench_data.png").exists()


def test_bench_data_cut_short_keeps_the_rows_done(tmp_path, monkeypatch):
    # run_gpu.sh's timeout once killed bench_data before it wrote anything: it now writes after each row.
    monkeypatch.setenv("CCKERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_data

    measure, calls = bench_data.measure, []

    def cut(*args):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the time limit's kill
        return measure(*args)

    monkeypatch.setattr(bench_data, "measure", cut)
    out = tmp_path / "bench"
    with pytest.raises(KeyboardInterrupt):
        bench_data.main(["--tiny", "--out", str(out)])
    rows = json.loads((out / "bench_data.json").read_text())["rows"]
    assert [(r["backend"], r["resolution"]) for r in rows] == [("pil", 32)] and rows[0]["speedup_vs_pil"] == 1.0
    assert (out / "bench_data.png").stat().st_size > 0
