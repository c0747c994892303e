"""Images/s of JPEG decode + augmentation: DALI (cpu, and mixed on a GPU) vs the PIL DataLoader.

    python benchmarks/bench_data.py [--out DIR] [--cores N] [--images 1024]
    python benchmarks/bench_data.py --tiny          # seconds on a CPU, for the smoke test

Every backend runs the trainer's own loader (trainer.data.make_loader) with the same number
of CPU cores (PIL: DataLoader worker processes; DALI: pipeline threads), random crop and
flip, normalized float32 NCHW output delivered on the GPU when there is one (PIL's
host-to-device copy included, as the trainer pays it). Data: generated ~1024x768 JPEGs at
quality 90 made of multi-scale smooth noise, so they compress like photographs (~150 KiB).
Rate per window of `--batches` batches; the table gives the median and 20/80 quantiles
over `--windows` windows after a warm-up batch. A window may span an epoch boundary (DALI
builds a new pipeline there; PIL's workers run on across epochs); the median hides that.
Writes bench_data.json and bench_data.png to --out (default benchmarks/results/local).
"""

import argparse
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from run_info import at_least, output_dir, run_meta, save_plot


def synthetic_jpeg(seed, width, height):
    """Smooth noise over 9 octaves (down to ~2-pixel detail), a gradient and a little grain:
    about 150 KiB at 1024x768, quality 90, like a photograph."""
    rng = np.random.default_rng(seed)
    image = np.linspace(0, 80, width, dtype=np.float32)[None, :, None].repeat(height, 0)
    for octave in range(1, 10):
        cells = 2 ** octave
        small = rng.standard_normal((cells * height // width + 1, cells + 1, 3))
        up = Image.fromarray(((small * 0.2 + 0.5).clip(0, 1) * 255).astype(np.uint8))
        image = image + np.asarray(up.resize((width, height), Image.BICUBIC), np.float32) / 2 ** (0.3 * octave)
    image = (image - image.min()) / (image.max() - image.min()) * 255 + rng.normal(0, 2, image.shape)
    buf = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_dataset(folder, count, width, height):
    """Writes `count` JPEGs with captions once; reuses them when already there."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(count) if not (folder / f"{i:06d}.jpg").exists()]

    def write(i):
        (folder / f"{i:06d}.jpg").write_bytes(synthetic_jpeg(i, width, height))
        (folder / f"{i:06d}.txt").write_text(f"synthetic image {i}")

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write, todo))
    sizes = [os.path.getsize(folder / f"{i:06d}.jpg") for i in range(count)]
    return float(np.mean(sizes))


def measure(loader, batch_size, batches, windows, device):
    it = iter(loader)
    next(it)  # warm-up: worker start, pipeline build, first decode
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(batches):
            images, _ = next(it)
            images = images.to(device)  # a no-op unless DALI decoded on the CPU of a GPU machine
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(batches * batch_size / (time.perf_counter() - t0))
    q20, med, q80 = np.quantile(rates, [0.2, 0.5, 0.8])
    return {"images_per_s": med, "q20": q20, "q80": q80, "windows": rates}


def main(argv=None):
    from trainer.data import cache_root, make_loader

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/local")
    p.add_argument("--data", default=None, help="folder for the generated JPEGs (reused; "
                   "default under $CCKERNELS_CACHE or ~/.cache/cckernels)")
    p.add_argument("--tiny", action="store_true", help="a few small images: seconds on a CPU")
    p.add_argument("--cores", type=at_least(1), default=os.cpu_count(), help="decoding threads/processes "
                   "(default: this machine's cores)")
    p.add_argument("--images", type=at_least(1), default=1024, help="generated JPEGs (default 1024)")
    p.add_argument("--batch-size", type=at_least(1), default=64, help="default 64")
    p.add_argument("--batches", type=at_least(1), default=8, help="batches per timed window (default 8)")
    p.add_argument("--windows", type=at_least(1), default=5, help="timed windows (default 5)")
    p.add_argument("--resolutions", type=at_least(8), nargs="+", default=[256, 512], help="default 256 512")
    args = p.parse_args(argv)
    width, height = 1024, 768
    if args.tiny:  # its own sizes: the other size options are not for tiny mode
        args.cores, args.images, args.batch_size, args.batches, args.windows = 1, 8, 4, 1, 2
        args.resolutions, width, height = [32, 64], 160, 120
    out = output_dir(args.out)
    folder = Path(args.data or cache_root() / f"bench-jpegs-{args.images}-{width}x{height}")
    mean_bytes = make_dataset(folder, args.images, width, height)

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    try:
        import nvidia.dali
        dali_version = nvidia.dali.__version__
    except ImportError:
        dali_version = None
    # (name, backend, device): DALI's decoder runs where the output goes, so "dali cpu" on a
    # GPU machine is DALI with a CPU device (device_id=None) and a host-to-device copy after.
    setups = [("pil", "pil", device)]
    if dali_version:
        setups.append(("dali cpu", "dali", torch.device("cpu")))
        if gpu:
            setups.append(("dali mixed", "dali", device))

    rows = []
    meta = {
        "benchmark": "data: decode + resize + crop + flip + normalize, images/s", **run_meta(device),
        "cpu_cores": args.cores, "dali": dali_version,
        "images": args.images, "image_size": [width, height], "mean_jpeg_bytes": mean_bytes,
        "batch_size": args.batch_size,
    }

    def save():  # after every row: a run cut by its time limit keeps what it measured
        pil = {r["resolution"]: r["images_per_s"] for r in rows if r["backend"] == "pil"}
        for r in rows:
            r["speedup_vs_pil"] = r["images_per_s"] / pil[r["resolution"]] if r["resolution"] in pil else None
        (out / "bench_data.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
        plot(rows, args.resolutions, [s[0] for s in setups], out / "bench_data.png", meta)

    print(f"{args.images} JPEGs {width}x{height} q90 (mean {mean_bytes / 1024:.0f} KiB), "
          f"batch {args.batch_size}, {args.cores} CPU cores, device {device}")
    print(f"{'backend':<12}{'res':>6}{'images/s':>12}{'q20':>10}{'q80':>10}")
    for res in args.resolutions:
        for name, backend, dev in setups:
            cfg = dict(path=str(folder), backend=backend, resolution=res, random_crop=True,
                       random_flip=True, workers=args.cores)
            loader = make_loader(cfg, args.batch_size, seed=0, device=dev)
            r = measure(loader, args.batch_size, args.batches, args.windows, device)
            rows.append({"backend": name, "resolution": res, **r})
            print(f"{name:<12}{res:>6}{r['images_per_s']:>12.1f}{r['q20']:>10.1f}{r['q80']:>10.1f}", flush=True)
            del loader
            save()
    print(f"wrote {out / 'bench_data.json'} and {out / 'bench_data.png'}")


def plot(rows, resolutions, names, path, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        done = {r["resolution"]: r for r in rows if r["backend"] == name}
        sel = [(i, done[res]) for i, res in enumerate(resolutions) if res in done]  # a cut run lacks some
        if not sel:
            continue
        x = np.array([i for i, _ in sel]) + k * width
        med = np.array([r["images_per_s"] for _, r in sel])
        err = np.array([[m - r["q20"], r["q80"] - m] for m, (_, r) in zip(med, sel)]).T
        ax.bar(x, med, width, yerr=err, label=name, color=f"C{k}")
    ax.set_xticks(np.arange(len(resolutions)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels([f"{r} px" for r in resolutions])
    ax.set_ylabel("images / s")
    ax.set_title(f"decode + augment, {meta['cpu_cores']} CPU cores, {meta['device']}", fontsize=9)
    ax.legend()
    save_plot(fig, path, meta)


if __name__ == "__main__":
    main()
