"""Images from a training checkpoint: DDIM with classifier-free guidance, saved as a PNG grid.

    python -m trainer.sample --checkpoint runs/tiny --prompt "a cat" --prompt "a red bus" \
        [--steps 50 --guidance 7.5 --seed 0 --n 4 --resolution 256] --out grid.png

--checkpoint is a step folder (<out_dir>/checkpoints/step_0000100), or a checkpoints folder or
an out_dir, whose `latest` file names the newest step. The run's config.yaml in the step folder
rebuilds the UNet, VAE and text encoder; EMA weights are used when the checkpoint has them.
The grid has one row per prompt and --n images per row. train.py calls sample_images and
save_grid in-process for its periodic sample grids.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from trainer.diffusion import NoiseSchedule, ddim_sample
from trainer.encoders import decode_latents, load_text_encoder, load_vae, vae_downsampling


def save_grid(images, path, *, cols):
    """Write images (N, 3, H, W) in [-1, 1] as one PNG, `cols` per row, row-major, no padding."""
    n, c, h, w = images.shape
    if c != 3 or n % cols:
        raise ValueError(f"need (N, 3, H, W) images with N a multiple of cols={cols}, got {tuple(images.shape)}")
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    # (rows, cols, 3, H, W) -> (rows, H, cols, W, 3): each row of the grid is one strip of pixels.
    grid = pixels.view(n // cols, cols, 3, h, w).permute(0, 3, 1, 4, 2).reshape(n // cols * h, cols * w, 3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(grid.numpy())).save(path)


@torch.no_grad()
def sample_images(unet, vae, text_encoder, prompts, *, resolution, n=1, steps=50, guidance=7.5, seed=0,
                  prediction_type="epsilon", schedule=None):
    """Images (len(prompts) * n, 3, resolution, resolution) in about [-1, 1], prompt by prompt.

    unet(x, t, context) -> prediction; the same seed gives the same images. schedule: the
    training NoiseSchedule (default: SD2's).
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if n < 1:
        raise ValueError(f"images per prompt must be >= 1, got n={n}")
    f = vae_downsampling(vae)
    if resolution % f:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {f}")
    device = next(unet.parameters()).device
    context = text_encoder.encode(list(prompts)).repeat_interleave(n, dim=0).to(device)
    latents = ddim_sample(
        unet, schedule or NoiseSchedule(), context, text_encoder.empty_embedding().to(device),
        latent_shape=(vae.config.latent_channels, resolution // f, resolution // f),
        steps=steps, guidance=guidance, prediction_type=prediction_type,
        generator=torch.Generator().manual_seed(seed),
    )
    return decode_latents(vae, latents.to(vae.device))


def resolve_checkpoint(path):
    """The step folder that `path` means: itself, or what its (or its checkpoints/) `latest` names."""
    path = Path(path)
    for folder in (path, path / "checkpoints"):
        if (folder / "latest").is_file():
            path = folder / (folder / "latest").read_text().strip()
            break
    if not (path / "config.yaml").is_file():
        raise ValueError(f"{path} is not a checkpoint: no config.yaml there (and no 'latest' file naming one)")
    return path


def load_checkpoint(path, device="cpu"):
    """(unet, vae, text_encoder, config) from a checkpoint; the UNet holds the EMA weights when saved."""
    from safetensors.torch import load_file

    from trainer.unet import UNet  # written in parallel; imported only where a checkpoint is loaded

    step = resolve_checkpoint(path)
    config = yaml.safe_load((step / "config.yaml").read_text())
    weights = step / "ema.safetensors" if (step / "ema.safetensors").is_file() else step / "unet.safetensors"
    unet = UNet.from_config(config["model"]["unet"])
    unet.load_state_dict(load_file(weights))
    model = config["model"]
    vae, text_encoder = load_vae(model["vae"]), load_text_encoder(model["text_encoder"])
    return unet.to(device).eval(), vae.to(device), text_encoder.to(device), config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="step folder, checkpoints folder or out_dir")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for more rows")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=4, help="images per prompt (grid columns)")
    parser.add_argument("--resolution", type=int, help="default: the run's data.resolution")
    parser.add_argument("--out", default="grid.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    unet, vae, text_encoder, config = load_checkpoint(args.checkpoint, args.device)
    diffusion = config.get("diffusion") or {}
    resolution = args.resolution or (config.get("data") or {}).get("resolution")
    if not resolution:
        parser.error("the checkpoint's config has no data.resolution: pass --resolution")
    images = sample_images(
        unet, vae, text_encoder, args.prompt, resolution=resolution, n=args.n, steps=args.steps,
        guidance=args.guidance, seed=args.seed, prediction_type=diffusion.get("prediction_type", "epsilon"),
        schedule=NoiseSchedule.from_config(diffusion),
    )
    save_grid(images, args.out, cols=args.n)
    print(f"wrote {args.out}: {len(args.prompt)} prompts x {args.n} images at {resolution} px")


if __name__ == "__main__":
    main()
