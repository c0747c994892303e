r"""Images from a training checkpoint: DDIM with classifier-free guidance, saved as a PNG grid.

    python -m trainer.sample --checkpoint runs/tiny --prompt "a cat" --prompt "a red bus" \
        [--steps 50 --guidance 7.5 --seed 0 --n 4 --resolution 256 --weights ema] --out grid.png

--checkpoint is a step folder (<out_dir>/checkpoints/step_0000100), or a checkpoints folder or
an out_dir (their `latest` file names the newest step). The run's config.yaml in the step folder
rebuilds the UNet, VAE and text encoder; --weights picks the UNet's: ema (the default where the
checkpoint has EMA weights) or trained (the default where it has none).
It may also be a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/,
tokenizer/: SD2's, say, to compare with a run fine-tuned from it), whose scheduler config gives
the prediction type and whose UNet's sample size the default resolution.
--steps is at most 500 (ddim_timesteps says why). --guidance at or below 1 samples without
guidance, as diffusers' pipelines do. A checkpoint whose weights hold NaN or inf (a diverged
run) is refused, naming the tensors. The arguments and --out are checked before the models
load; what is wrong with a checkpoint (a missing or damaged file, an incomplete step folder)
is one line, as is an error of the device or the sampling.
The grid has one row per prompt, written above it (label_lines), and --n images per row; the
last line says which weights made it. train.py calls sample_images and save_grid in-process
for its periodic sample grids; trainer.export loads checkpoints with load_checkpoint too.
"""

import argparse
import errno
import math
import os
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from trainer import checkpoint
from trainer import config as run_config
from trainer.diffusion import NoiseSchedule, ddim_sample, ddim_timesteps
from trainer.encoders import check_resolution, decode_latents, load_text_encoder, load_vae, vae_downsampling


def save_grid(images, path, *, rows, labels=None):
    """Write images (N, 3, H, W) in [-1, 1] as one PNG of `rows` rows (one per prompt, as
    sample_images orders them), filled row by row, no padding; `labels` (one per row: the
    prompts) are written in a white band above each row, as label_lines sets them (the bands
    of a grid are all as tall as its tallest). Returns the path."""
    n, c, h, w = images.shape
    if c != 3 or rows < 1 or n % rows:
        raise ValueError(f"need (N, 3, H, W) images with N a multiple of rows={rows}, got {tuple(images.shape)}")
    if labels is not None and len(labels) != rows:
        raise ValueError(f"need one label per row, got {len(labels)} for {rows} rows")
    cols = n // rows
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    # (rows, cols, 3, H, W) -> (rows, H, cols, W, 3): each row of the grid is one strip of pixels.
    strips = pixels.view(rows, cols, 3, h, w).permute(0, 3, 1, 4, 2).reshape(rows, h, cols * w, 3).numpy()
    if labels is not None:
        line = max(14, h // 6)  # pixels per line of text
        font = label_font(round(line * 0.75))
        texts = [label_lines(text, cols * w - 4, font) for text in labels]
        band = line * max(len(lines) for lines in texts)
        strips = [np.concatenate([_label_band(lines, cols * w, band, line, font), strip])
                  for lines, strip in zip(texts, strips)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(np.concatenate(list(strips)))).save(path)
    return path


def label_font(size):
    """DejaVu Sans, which has accented letters, where matplotlib (which ships it) is installed;
    else PIL's default font."""
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def label_lines(text, width, font):
    """A prompt as the grid writes it: its whitespace (newlines too) as single spaces, on one
    line where it fits `width` pixels in `font`, else on two, cut between words where it can
    be, the second cut short with "…" where it does not fit either; "(empty prompt)" for none."""
    text = " ".join(text.split()) or "(empty prompt)"
    if font.getlength(text) <= width:
        return [text]
    n = _fitting_length(text, width, font)
    space = text.rfind(" ", 0, n + 1)
    first = text[:space] if space > 0 else text[:n]
    rest = text[len(first):].lstrip()
    if font.getlength(rest) > width:
        rest = rest[:_fitting_length(rest, width, font, "…")].rstrip() + "…"
    return [first, rest]


def _fitting_length(text, width, font, suffix=""):
    """The length of the longest start of text that, followed by suffix, fits width pixels."""
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if font.getlength(text[:mid] + suffix) <= width:
            low = mid
        else:
            high = mid - 1
    return low


def _label_band(lines, width, height, line, font):
    """A white (height, width, 3) band with `lines` in black, `line` pixels apart."""
    band = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(band)
    for i, text in enumerate(lines):
        draw.text((2, i * line + line // 2), text, fill="black", font=font, anchor="lm")
    return np.asarray(band)


@torch.no_grad()
def sample_images(unet, vae, text_encoder, prompts, *, resolution=None, n=1, steps=50, guidance=7.5, seed=0,
                  prediction_type="epsilon", schedule=None):
    """Images (len(prompts) * n, 3, resolution, resolution) in about [-1, 1], prompt by prompt.

    unet(x, t, context) -> prediction; the same seed gives the same images. resolution: in
    pixels; by default the UNet's sample_size (a latent size, as in diffusers) times the VAE's
    downsampling. prediction_type: what the UNet was trained to predict. schedule: the training
    NoiseSchedule (default: SD2's). On a GPU the UNet runs under bf16 autocast, as in training
    (and on a CPU too when its weights are bf16).
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if n < 1:
        raise ValueError(f"images per prompt must be >= 1, got n={n}")
    f = vae_downsampling(vae)
    resolution = resolution or unet.config["sample_size"] * f
    check_resolution(resolution, vae)
    weight = next(unet.parameters())
    device = weight.device
    context = text_encoder.encode(list(prompts)).repeat_interleave(n, dim=0).to(device)
    # bf16 weights (train.precision=bf16-weights) need autocast on a CPU too
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda" or weight.dtype != torch.float32):
        latents = ddim_sample(
            unet, schedule or NoiseSchedule(), context, text_encoder.empty_embedding().to(device),
            latent_shape=(vae.config.latent_channels, resolution // f, resolution // f),
            steps=steps, guidance=guidance, prediction_type=prediction_type,
            generator=torch.Generator().manual_seed(seed),
        )
    return decode_latents(vae, latents.to(vae.device))


# The UNet weights a checkpoint may hold, by name (--weights).
WEIGHTS_FILES = {"ema": "ema.safetensors", "trained": "unet.safetensors"}


class Loaded(NamedTuple):
    """load_checkpoint's models, the config sampling reads, the folder they came from (a step
    folder or a pipeline) and which of its weights the UNet holds ("ema" or "trained"; None
    for a pipeline's one UNet)."""
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    config: dict
    folder: Path
    weights: Optional[str]


def load_checkpoint(path, device="cpu", *, weights=None, resolution=None):
    """Loaded(unet, vae, text_encoder, config, folder, weights) from a checkpoint (a step folder,
    or a checkpoints folder or out_dir: its latest) or a diffusers pipeline folder (config:
    just the keys sampling reads). weights: "ema" or "trained" (default: EMA where the
    checkpoint has them). resolution, if given, is checked against the VAE before the UNet and
    the text encoder load (minutes for SD2's). ValueError or FileNotFoundError saying what is
    wrong with the folder."""
    from trainer.unet import CONFIG_NAME, UNet  # imported only where a checkpoint is loaded

    path = Path(path)
    if weights not in (None, *WEIGHTS_FILES):
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS_FILES)}, got {weights!r}")
    if (path / "model_index.json").is_file():
        if weights is not None:
            raise ValueError(f"{path} is a diffusers pipeline, with one UNet: ema or trained weights are a "
                             "checkpoint's choice")
        vae = load_vae({"path": str(path)}, device)
        check_resolution(resolution, vae)
        unet = UNet.from_diffusers(path)
        text_encoder = load_text_encoder({"path": str(path)}, device)
        config = {"data": {"resolution": unet.config["sample_size"] * vae_downsampling(vae)},
                  "diffusion": {"prediction_type": checkpoint.pipeline_prediction_type(path) or "epsilon"}}
        return Loaded(unet.to(device).eval(), vae, text_encoder, config, path, None)
    if not (path / "state.json").is_file():
        if any((path / name).exists() for name in ("config.yaml", *WEIGHTS_FILES.values())):
            raise ValueError(f"{path} is an incomplete checkpoint: no state.json, which is written last (its writing "
                             "was cut short, or files were removed since); take another step folder")
        if (path / "unet").is_dir() or (path / CONFIG_NAME).is_file():
            raise ValueError(f"{path} holds a diffusers UNet without the rest of a pipeline (no model_index.json: "
                             "no VAE or text encoder to sample with); give the run's out_dir or a step folder of it, "
                             "or the pipeline folder around it")
    step = checkpoint.resolve(path)
    has_ema = (step / WEIGHTS_FILES["ema"]).is_file()
    weights = weights or ("ema" if has_ema else "trained")
    # Before config.yaml is read (a truncated one is named as such, not as YAML it cannot parse)
    # and before minutes of loading the encoders.
    checkpoint.verify(step, ["config.yaml", WEIGHTS_FILES[weights]])
    config = checkpoint.read(step / "config.yaml", run_config.load)
    if weights == "ema" and not has_ema:
        raise ValueError(f"{step} holds no EMA weights ({WEIGHTS_FILES['ema']}: the run's EMA starts at step "
                         f"{config['ema']['start_step']}); take its trained weights")
    vae = load_vae(config["model"]["vae"], device)
    check_resolution(resolution, vae)
    state = checkpoint.read(step / WEIGHTS_FILES[weights])
    bad = checkpoint.nonfinite(state)
    if bad:  # it would sample black images
        raise ValueError(f"{step / WEIGHTS_FILES[weights]}: {len(bad)} of the UNet's tensors hold NaN or inf "
                         f"({', '.join(bad[:3])}): the run diverged before this checkpoint; take an earlier one")
    unet = UNet.from_config(config["model"]["unet"])
    unet.load_state_dict(state)
    text_encoder = load_text_encoder(config["model"]["text_encoder"], device)
    return Loaded(unet.to(device).eval(), vae, text_encoder, config, step, weights)


def _check_writable(path):
    """OSError unless a new file can be written in path's folder (made here), path no folder."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a file where a folder must be: name it
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), e.filename) from None
    with tempfile.TemporaryFile(dir=path.parent):
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="step folder, checkpoints folder or out_dir; or a diffusers pipeline folder")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for more rows")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=4, help="images per prompt (grid columns)")
    parser.add_argument("--resolution", type=int, help="pixels; default: the run's data.resolution")
    parser.add_argument("--out", default="grid.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", choices=WEIGHTS_FILES,
                        help="a checkpoint's UNet weights; default: ema where it has them, else trained")
    args = parser.parse_args(argv)
    # checked before the models load (minutes for SD2's), and before sampling for --out
    if not Path(args.checkpoint).exists():
        parser.error(f"--checkpoint {args.checkpoint}: no such file or folder")
    try:
        ddim_timesteps(args.steps)
    except ValueError as e:
        parser.error(f"--steps: {e}")
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if not 0 <= args.guidance < math.inf:
        parser.error(f"--guidance must be a finite number >= 0 (<= 1: no guidance), got {args.guidance}")
    if not 0 <= args.seed < 2**64:
        parser.error(f"--seed must be in [0, 2**64), got {args.seed}")
    if args.resolution is not None and args.resolution < 1:
        parser.error(f"--resolution must be a positive number of pixels, got {args.resolution}")
    if Image.registered_extensions().get(Path(args.out).suffix.lower()) not in Image.SAVE:  # .psd: read only
        parser.error(f"--out {args.out}: not an image file name PIL can write (use .png or .jpg)")
    try:
        _check_writable(Path(args.out))
    except OSError as e:
        parser.error(f"--out {args.out}: cannot be written ({type(e).__name__}: {e})")
    check_device(parser, args.device)

    try:  # what a checkpoint, the device or the sampling can get wrong, in one line
        loaded = load_checkpoint(args.checkpoint, args.device, weights=args.weights, resolution=args.resolution)
        resolution = args.resolution or loaded.config["data"]["resolution"]
        images = sample_images(
            loaded.unet, loaded.vae, loaded.text_encoder, args.prompt, resolution=resolution, n=args.n,
            steps=args.steps, guidance=args.guidance, seed=args.seed,
            prediction_type=loaded.config["diffusion"]["prediction_type"],
        )
        save_grid(images, args.out, rows=len(args.prompt), labels=args.prompt)
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"{parser.prog}: error: {e}") from None
    print(f"wrote {args.out}: {plural(len(args.prompt), 'prompt')} x {plural(args.n, 'image')} at {resolution} px, "
          f"with {weights_described(loaded)}")


def check_device(parser, device):
    """A usage error unless torch takes `device` and has one of its kind here."""
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        parser.error(f"--device {device}: {e}")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch sees no CUDA device here")


def weights_described(loaded):
    """Which weights a Loaded UNet holds, for a CLI's last line: 'the EMA weights of FOLDER'."""
    if loaded.weights is None:
        return f"the UNet of {loaded.folder}"
    return f"the {'EMA' if loaded.weights == 'ema' else 'trained'} weights of {loaded.folder}"


def plural(n, noun):
    return f"{n} {noun}" + "s" * (n != 1)


if __name__ == "__main__":
    main()
