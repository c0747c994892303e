"""Training images/s on precomputed latents (data.format=latents) vs encoding every batch online.

    python benchmarks/bench_precompute.py [--out DIR] [--resolution 256] [--batch-size 32]
    python benchmarks/bench_precompute.py --tiny      # seconds on a CPU, for the smoke test

Both sides run the same training step of the same UNet (trainer.unet.UNet.from_config with
model.unet of configs/sd2-base.yaml on a GPU, of configs/tiny.yaml with --tiny or without a GPU):
diffusion loss, backward, AdamW step, bf16 autocast on a GPU. "online" gets (images, captions) from trainer.data's loader (PIL
DataLoader, or DALI with --backend dali) and runs the VAE encoder and the text encoder in the
step, under no_grad, as a trainer without precompute must; "latents" gets (latents, text
embeddings) from the latents loader. Encoders: configs/encoders/sd2.yaml (random weights, the
compute of SD2's VAE and OpenCLIP-H text tower) or tiny.yaml. Data: the generated ~1024x768
JPEGs of bench_data.py, precomputed once with trainer.precompute into the cache (reused on
reruns, its one-time rate reported too). Rate per window of --steps steps; the table gives the
median and 20/80 quantiles over --windows windows after --warmup steps (timing as bench_data's).
Writes bench_precompute.json and bench_precompute.png to --out (default benchmarks/results/local).
"""

import argparse
import json
import os
import time

import numpy as np
import torch

from bench_data import make_dataset, measure
from run_info import at_least, output_dir, run_meta, save_plot

def training(step, loader, warmup):
    """Batches of `loader`, each after `step` trained on it, so bench_data's measure times
    training; the first warmup - 1 steps run here (measure runs one more before timing)."""
    def run():
        for batch in loader:
            step(*batch)
            yield batch
    it = run()
    for _ in range(warmup - 1):
        next(it)
    return it


def main():
    from trainer import config
    from trainer.data import cache_root, make_loader
    from trainer.diffusion import NoiseSchedule, training_loss
    from trainer.encoders import encode_images, encoder_config, load_text_encoder, load_vae
    from trainer.precompute import precompute
    from trainer.unet import UNet

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/local")
    p.add_argument("--tiny", action="store_true", help="tiny models and images: seconds on a CPU")
    p.add_argument("--images", type=at_least(1), default=512, help="generated JPEGs (default 512)")
    p.add_argument("--resolution", type=at_least(8), default=256, help="default 256")
    p.add_argument("--batch-size", type=at_least(1), default=32, help="default 32")
    p.add_argument("--backend", default="pil", choices=["pil", "dali"], help="online decoding")
    p.add_argument("--workers", type=at_least(0), default=os.cpu_count(), help="default: this machine's cores")
    p.add_argument("--steps", type=at_least(1), default=5, help="steps per timed window (default 5)")
    p.add_argument("--windows", type=at_least(1), default=5, help="timed windows (default 5)")
    p.add_argument("--warmup", type=at_least(1), default=3, help="untimed steps first (default 3)")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    width, height, run, encoders = 1024, 768, "sd2-base", "sd2"
    out = output_dir(args.out)
    if args.tiny or not gpu:  # its own sizes: the other size options are not for tiny mode
        args.images, args.resolution, args.batch_size = 8, 64, 2
        args.steps, args.windows, args.warmup, args.workers = 1, 2, 1, 0
        width, height, run, encoders = 160, 120, "tiny", "tiny"
        if not gpu:
            torch.set_num_threads(1)  # tiny ops: threads only add synchronization on a shared CPU
    unet_cfg = config.load(config.ROOT / "configs" / f"{run}.yaml")["model"]["unet"]
    cache = cache_root()
    folder = cache / f"bench-jpegs-{args.images}-{width}x{height}"
    make_dataset(folder, args.images, width, height)
    enc = encoder_config(encoders)
    data = dict(path=str(folder), backend=args.backend, resolution=args.resolution,
                workers=args.workers, random_crop=False, random_flip=False)

    latents_dir = cache / f"bench-latents-{args.images}-{width}x{height}-{encoders}-{args.resolution}"
    reused = (latents_dir / "index.json").exists()
    t0 = time.perf_counter()
    precompute(data, enc["vae"], enc["text_encoder"], [args.resolution], latents_dir,
               batch_size=args.batch_size, device=device, replace_other=True)
    precompute_rate = None if reused else args.images / (time.perf_counter() - t0)

    autocast = gpu  # bf16 autocast on a GPU, fp32 on a CPU, as train.py's default
    torch.manual_seed(0)
    unet = UNet.from_config(unet_cfg).to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    schedule = NoiseSchedule().to(device)
    precision = torch.bfloat16 if gpu else torch.float32
    vae = load_vae(enc["vae"], device).to(precision)
    text = load_text_encoder(enc["text_encoder"], device).to(precision)

    def train(latents, context):
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            loss = training_loss(unet, schedule, latents.float(), context.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def online(images, captions):
        with torch.no_grad():
            latents = encode_images(vae, images.to(device))
            context = text.encode(captions)
        train(latents, context)

    loaders = {
        "online": (online, make_loader(data, args.batch_size, device=device)),
        "latents": (train, make_loader({**data, "format": "latents", "path": str(latents_dir)},
                                       args.batch_size, device=device)),
    }
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet {n_params / 1e6:.1f}M params, encoders {encoders}, {args.resolution} px, batch "
          f"{args.batch_size}, device {device}, online decoding {args.backend} "
          f"({args.workers} workers); precompute (once): "
          + ("reused" if reused else f"{precompute_rate:.1f} images/s"))
    print(f"{'data':<10}{'images/s':>12}{'q20':>10}{'q80':>10}")
    rows = []
    for name, (step, loader) in loaders.items():
        r = measure(training(step, loader, args.warmup), args.batch_size, args.steps,
                    args.windows, device)
        rows.append({"data": name, **r})
        print(f"{name:<10}{r['images_per_s']:>12.1f}{r['q20']:>10.1f}{r['q80']:>10.1f}")
    speedup = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    print(f"speed-up of precomputed latents: {speedup:.2f}x")

    result = {
        "benchmark": "training images/s: precomputed latents vs online VAE + text encoding",
        "formula": "images/s = steps * batch_size / window seconds (median, q20, q80 over windows)",
        **run_meta(device), "unet_params": n_params, "unet": unet_cfg,
        "encoders": encoders, "resolution": args.resolution, "batch_size": args.batch_size,
        "online_backend": args.backend, "workers": args.workers, "images": args.images,
        "precompute_images_per_s": precompute_rate, "rows": rows,
        "speedup": speedup,
    }
    (out / "bench_precompute.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / "bench_precompute.png", result)
    print(f"wrote {out / 'bench_precompute.json'} and {out / 'bench_precompute.png'}")


def plot(rows, path, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    med = np.array([r["images_per_s"] for r in rows])
    err = np.array([[m - r["q20"], r["q80"] - m] for m, r in zip(med, rows)]).T
    ax.bar([r["data"] for r in rows], med, yerr=err, color=["tab:gray", "tab:green"])
    ax.set_ylabel("training images / s")
    ax.set_title(f"{meta['encoders']} encoders, {meta['resolution']} px, batch "
                 f"{meta['batch_size']}, {meta['device']}: {meta['speedup']:.2f}x", fontsize=9)
    save_plot(fig, path, meta)


if __name__ == "__main__":
    main()
