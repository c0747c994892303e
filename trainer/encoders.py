"""The frozen encoders of latent diffusion: the VAE (images <-> latents) and the text encoder.

Both come from a config section holding either `path` (a local folder: the model's own folder
or a diffusers pipeline folder with vae/, text_encoder/, tokenizer/; nothing is downloaded) or
`config` (a diffusers AutoencoderKL / transformers CLIPTextConfig dict, randomly initialized
from `init_seed`, default 0, so training, sampling and precompute rebuild the same weights).
A text encoder section with `open_clip: NAME` (an open_clip architecture such as ViT-H-14,
SD2's) is an OpenCLIP text tower instead (needs the `openclip` extra): `path` is a local
checkpoint file (open_clip_pytorch_model.bin / .safetensors) and `config` a dict of text_cfg
keys replacing NAME's (`config: {}` is NAME's tower, randomly initialized); see
load_open_clip_tower, and load_text_encoder for the layer each kind returns (SD2's by default).
Ready-made sections: configs/encoders/tiny.yaml (CPU tests, the tiny default run) and
configs/encoders/sd2.yaml (SD2 sizes, for benchmarks without weights on disk).

    vae = load_vae(cfg["model"]["vae"])
    latents = encode_images(vae, images)          # images in [-1, 1], (B, 3, H, W)
    text = load_text_encoder(cfg["model"]["text_encoder"])
    emb = text.encode(["a photo of a cat"])       # (1, 77, dim)
"""

import inspect
import logging
from pathlib import Path

import torch
import yaml

MAX_LENGTH = 77  # CLIP's context length; SD's cross-attention always sees 77 tokens.
ENCODER_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "encoders"
log = logging.getLogger("trainer.encoders")


def encoder_config(name):
    """The {"vae": ..., "text_encoder": ...} sections of configs/encoders/<name>.yaml."""
    path = ENCODER_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in ENCODER_CONFIGS.glob("*.yaml"))
        raise ValueError(f"unknown encoder config {name!r}; known: {known}")
    return yaml.safe_load(path.read_text())


def resolve_preset(cfg, what):
    """{preset: NAME, ...} -> the `what` section of configs/encoders/NAME.yaml, other keys on top."""
    if isinstance(cfg, dict) and "preset" in cfg:
        rest = {k: v for k, v in cfg.items() if k != "preset"}
        return {**encoder_config(cfg["preset"])[what], **rest}
    return cfg


def _source(cfg, what, file=False):
    # Exactly one of path / config, so a run never silently trains with random weights.
    kind = "file" if file else "directory"
    if not isinstance(cfg, dict) or ("path" in cfg) == ("config" in cfg):
        raise ValueError(
            f"{what} config needs exactly one of 'path' (a local {kind}), 'config' (random init) "
            f"or 'preset' (configs/encoders/NAME.yaml), got {cfg!r}"
        )
    if "path" in cfg and not (Path(cfg["path"]).is_file() if file else Path(cfg["path"]).is_dir()):
        raise ValueError(f"{what} path {cfg['path']!r} is not a {kind}")
    return cfg.get("path")


def _seeded_init(cfg, build):
    # Random init on CPU from a fixed seed, without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.get("init_seed", 0))
        return build()


def _frozen(module):
    return module.eval().requires_grad_(False)


# --- VAE ----------------------------------------------------------------------------------------

def load_vae(cfg, device="cpu"):
    """A frozen diffusers AutoencoderKL from cfg = {path} or {config[, init_seed]}, on device."""
    from diffusers import AutoencoderKL

    cfg = resolve_preset(cfg, "vae")
    path = _source(cfg, "vae")
    if path is None:
        vae = _seeded_init(cfg, lambda: AutoencoderKL.from_config(cfg["config"]))
    else:
        sub = "vae" if (Path(path) / "vae").is_dir() else None
        vae = AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True)
    return _frozen(vae).to(device)


def vae_downsampling(vae):
    """Pixels per latent along each side: every encoder block but the last halves the size."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_resolution(resolution, vae, name="resolution"):
    """ValueError, calling it `name`, unless resolution (pixels; None: a default, which fits) is
    a multiple of the VAE's downsampling."""
    f = vae_downsampling(vae)
    if resolution is not None and resolution % f:
        raise ValueError(f"{name} {resolution} is not a multiple of the VAE's downsampling factor {f}")


def _scale_shift(vae):
    # Latents are normalized to roughly unit variance so the diffusion noise schedule fits them:
    # SD's VAE has scaling_factor 0.18215 and no shift; some AutoencoderKLs also set shift_factor.
    return vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0


@torch.no_grad()
def encode_images(vae, images, *, sample=False, generator=None):
    """Images (B, 3, H, W) in [-1, 1], H and W multiples of the downsampling factor, to
    normalized latents (B, C, H/f, W/f).

    The encoder outputs a Gaussian per latent. By default its mean: deterministic (precompute
    stores what a fresh encode gives) and, for trained VAEs like SD's, whose posterior std is
    tiny, practically the same as a draw; a randomly initialized VAE's posterior std is about 1
    and would drown the image. sample=True draws instead (generator makes it reproducible)."""
    f = vae_downsampling(vae)
    if images.ndim != 4 or images.shape[1] != vae.config.in_channels:
        raise ValueError(f"images must be (B, {vae.config.in_channels}, H, W), got {tuple(images.shape)}")
    if images.shape[2] % f or images.shape[3] % f:
        raise ValueError(f"image size {tuple(images.shape[2:])} is not a multiple of the VAE's factor {f}")
    posterior = vae.encode(images.to(vae.dtype)).latent_dist
    latents = posterior.sample(generator=generator) if sample else posterior.mean
    scale, shift = _scale_shift(vae)
    return (latents - shift) * scale


@torch.no_grad()
def decode_latents(vae, latents):
    """Normalized latents (B, C, h, w) to images (B, 3, h*f, w*f), roughly in [-1, 1] (unclamped)."""
    if latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
        raise ValueError(f"latents must be (B, {vae.config.latent_channels}, h, w), got {tuple(latents.shape)}")
    scale, shift = _scale_shift(vae)
    return vae.decode(latents.to(vae.dtype) / scale + shift).sample


# --- Text encoder -------------------------------------------------------------------------------

class ByteTokenizer:
    """A tokenizer that needs no files: UTF-8 bytes (ids 0..255) framed by BOS and EOS, truncated
    and padded to 77 tokens. Used with randomly initialized text encoders, whose vocabulary
    means nothing anyway, because CLIP's BPE files cannot be downloaded here."""

    BOS, EOS, PAD = 256, 257, 258
    vocab_size = 259

    def __call__(self, texts):
        ids = torch.full((len(texts), MAX_LENGTH), self.PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            body = list(text.encode("utf-8"))[: MAX_LENGTH - 2]
            ids[i, : len(body) + 2] = torch.tensor([self.BOS, *body, self.EOS])
        return ids

    def lengths(self, texts):
        return [len(text.encode("utf-8")) + 2 for text in texts]


class ClipTokenizer:
    """transformers' CLIPTokenizer called the way SD's pipelines call it: pad to 77, truncate."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts):
        return self.tokenizer(
            texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids

    def lengths(self, texts):
        return [len(ids) for ids in self.tokenizer(texts, verbose=False).input_ids]


class TextEncoder(torch.nn.Module):
    """A frozen text model plus its tokenizer: encode(list[str]) -> (B, 77, dim).

    clip_skip=k takes the hidden state k blocks before the last, then the final LayerNorm, as
    diffusers' clip_skip does. SD2 conditions on the penultimate block of OpenCLIP ViT-H (24
    blocks; clip_skip=1, as Stable Diffusion's FrozenOpenCLIPEmbedder with layer="penultimate").
    Its diffusers weights already drop the last block (23), so with them the final output is
    that penultimate block and clip_skip stays 0. Subclasses give `dim`, `_hidden(ids)` and
    `_lengths(texts)` (tokens before the cut at 77). `truncated` counts the texts cut so far.
    """

    def __init__(self, model, tokenizer, clip_skip, num_layers):
        super().__init__()
        if not (isinstance(clip_skip, int) and 0 <= clip_skip < num_layers):
            raise ValueError(f"clip_skip must be an int in [0, {num_layers}), got {clip_skip!r}")
        self.model = _frozen(model)
        self.tokenizer = tokenizer
        self.clip_skip = clip_skip
        self.truncated = 0

    @torch.no_grad()
    def encode(self, texts):
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"encode takes a list of strings, got {texts!r}")
        texts = list(texts)
        cut = [t for t, n in zip(texts, self._lengths(texts)) if n > MAX_LENGTH]
        if cut and not self.truncated:
            # As SD's pipelines do, the end is dropped; said once, with the first such text.
            log.warning("%d of %d texts are longer than the text encoder's %d tokens: their ends are dropped "
                        "(e.g. %r; not said again)", len(cut), len(texts), MAX_LENGTH, _shortened(cut[0]))
        self.truncated += len(cut)
        return self.encode_ids(self.tokenizer(texts))

    @torch.no_grad()
    def encode_ids(self, ids):
        """encode for token ids (B, 77) from self.tokenizer, without its word about texts cut
        short (nor their count): the export's probe prompts are none of the user's."""
        return self._hidden(ids.to(next(self.model.parameters()).device))

    def empty_embedding(self):
        """The empty caption's embedding (1, 77, dim): the unconditional input of guidance."""
        return self.encode([""])


def _shortened(text, n=100):
    return text if len(text) <= n else text[:n] + "..."


class CLIPTextEncoder(TextEncoder):
    """A transformers CLIPTextModel (e.g. SD2's diffusers text_encoder/)."""

    def __init__(self, model, tokenizer, clip_skip=0):
        super().__init__(model, tokenizer, clip_skip, model.config.num_hidden_layers)

    @property
    def dim(self):
        return self.model.config.hidden_size

    def _hidden(self, ids):
        if self.clip_skip == 0:
            return self.model(ids).last_hidden_state
        # hidden_states holds the embeddings then each layer's output, before the final LayerNorm.
        hidden = self.model(ids, output_hidden_states=True).hidden_states[-(self.clip_skip + 1)]
        return clip_text_transformer(self.model).final_layer_norm(hidden)

    def _lengths(self, texts):
        return self.tokenizer.lengths(texts)


def clip_text_transformer(model):
    """A CLIPTextModel's transformer (embeddings, encoder.layers, final_layer_norm): transformers
    < 5 nests it under .text_model; 5 puts its parts on the model itself."""
    return getattr(model, "text_model", model)


class OpenCLIPTextEncoder(TextEncoder):
    """An open_clip TextTransformer (its causal attention mask included) and its BPE tokenizer,
    which pads with 0 after the end token, as open_clip.tokenize does for SD2."""

    def __init__(self, tower, tokenizer, clip_skip=1):
        blocks = len(tower.transformer.resblocks)
        super().__init__(tower, tokenizer, clip_skip, blocks)
        # The blocks after the one read, and the projection of the pooled token, are never used.
        self.model.prune_intermediate_layers(indices=[blocks - 1 - clip_skip])

    @property
    def dim(self):
        return self.model.width

    def _hidden(self, ids):
        # The last block left (indices=1: the last one), through ln_final.
        out = self.model.forward_intermediates(ids, indices=1, normalize_intermediates=True,
                                               intermediates_only=True, output_fmt="NLC")
        return out["text_intermediates"][0]

    def _lengths(self, texts):
        return [len(self.tokenizer.encode(t)) + 2 for t in texts]  # + start and end tokens


def load_text_encoder(cfg, device="cpu"):
    """A TextEncoder on device from cfg = {path[, tokenizer_path]} or {config[, init_seed]}, plus
    clip_skip (default 0), or from cfg = {open_clip: NAME, path or config[, init_seed]}, plus
    clip_skip (default 1: SD2's penultimate block).

    path: a CLIPTextModel folder with its tokenizer files (or tokenizer_path naming them), or a
    diffusers pipeline folder (text_encoder/ and tokenizer/). config: a CLIPTextConfig dict,
    paired with the ByteTokenizer (its vocab_size must be >= 259; the special ids are set to
    the tokenizer's). With open_clip, see load_open_clip_tower.
    """
    cfg = resolve_preset(cfg, "text_encoder")
    if isinstance(cfg, dict) and "open_clip" in cfg:
        tower = load_open_clip_tower(cfg)  # first: it says how to install open_clip when missing
        from open_clip import SimpleTokenizer

        # What open_clip.get_tokenizer gives every tower accepted (no HF tokenizer, no tokenizer_kwargs).
        tokenizer = SimpleTokenizer(context_length=MAX_LENGTH)
        if tower.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"text_encoder vocab_size must be >= {tokenizer.vocab_size} (OpenCLIP's BPE "
                             f"tokenizer), got {tower.vocab_size}")
        return OpenCLIPTextEncoder(tower, tokenizer, clip_skip=cfg.get("clip_skip", 1)).to(device)

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = _source(cfg, "text_encoder")
    if path is None:
        ids = dict(bos_token_id=ByteTokenizer.BOS, eos_token_id=ByteTokenizer.EOS, pad_token_id=ByteTokenizer.PAD)
        config = CLIPTextConfig(**{**cfg["config"], **ids})
        if config.vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(f"text_encoder vocab_size must be >= {ByteTokenizer.vocab_size}, got {config.vocab_size}")
        if config.max_position_embeddings < MAX_LENGTH:
            raise ValueError(
                f"text_encoder max_position_embeddings must be >= {MAX_LENGTH}, got {config.max_position_embeddings}"
            )
        model = _seeded_init(cfg, lambda: CLIPTextModel(config))
        tokenizer = ByteTokenizer()
    else:
        root = Path(path)
        pipeline = (root / "text_encoder").is_dir()
        model_dir = root / "text_encoder" if pipeline else root
        tokenizer_dir = cfg.get("tokenizer_path") or (root / "tokenizer" if pipeline else root)
        model = CLIPTextModel.from_pretrained(model_dir, local_files_only=True)
        tokenizer = ClipTokenizer(CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
    return CLIPTextEncoder(model, tokenizer, clip_skip=cfg.get("clip_skip", 0)).to(device)


# --- OpenCLIP text tower ------------------------------------------------------------------------

# Architectures of open_clip.list_models() whose text tower fits (shown when a name is unknown).
OPEN_CLIP_EXAMPLES = ("ViT-H-14", "ViT-bigG-14", "ViT-L-14", "ViT-B-32", "ViT-H-14-quickgelu")


def load_open_clip_tower(cfg):
    """A frozen open_clip TextTransformer on the CPU, built alone (no vision tower), from
    cfg = {open_clip: ARCH, path: checkpoint file} or {open_clip: ARCH, config: {text_cfg keys}}.

    ARCH is a built-in open_clip architecture name (e.g. ViT-H-14, SD2's) or a model config dict
    like open_clip's model_configs/*.json ({embed_dim, text_cfg[, quick_gelu]}; vision_cfg is not
    needed). Its text_cfg, with `config`'s keys on top (`config: {}`: none), sizes the tower,
    which must be open_clip's own text transformer over 77 tokens (read by its bundled BPE
    tokenizer): towers of Hugging Face models are refused, their tokenizers being downloads.
    path: a full CLIP checkpoint (its vision tower is never read into memory), or the text
    tower's own state dict.
    """
    try:
        import open_clip
        from open_clip.transformer import QuickGELU, TextTransformer
    except ImportError as e:
        raise ImportError("text_encoder.open_clip needs open_clip_torch: pip install 'cckernels[openclip]'") from e

    arch = cfg["open_clip"]
    if isinstance(arch, str) and arch in open_clip.list_models():
        model_cfg = open_clip.get_model_config(arch)
    elif isinstance(arch, dict) and isinstance(arch.get("text_cfg"), dict) and "embed_dim" in arch:
        model_cfg = arch
    else:
        raise ValueError(f"unknown OpenCLIP model {arch!r}: a name such as {list(OPEN_CLIP_EXAMPLES)} "
                         f"(open_clip.list_models() has all {len(open_clip.list_models())}) or a dict "
                         f"with embed_dim and text_cfg")
    name = arch if isinstance(arch, str) else "model"
    path = _source(cfg, "text_encoder", file=True)
    if path is None and not isinstance(cfg["config"], dict):
        raise ValueError(f"text_encoder config must be a dict of OpenCLIP text_cfg keys, got {cfg['config']!r}")
    text_cfg = {**model_cfg["text_cfg"], **(cfg.get("config") or {})}
    # text_cfg keys that TextTransformer takes under the same name; the others (hf_*, tokenizer_*,
    # norm_kwargs, act_kwargs) mean a Hugging Face model or tokenizer, or wiring not done here.
    known = set(inspect.signature(TextTransformer).parameters) - {"output_dim", "act_layer", "norm_layer"}
    unsupported = sorted(set(text_cfg) - known)
    if unsupported:
        raise ValueError(f"OpenCLIP {name}'s text_cfg keys {unsupported} are not supported: only open_clip's "
                         f"own text transformer with its BPE tokenizer; its keys: {sorted(known)}")
    if text_cfg.get("context_length") != MAX_LENGTH:
        raise ValueError(f"OpenCLIP {name}: context_length must be {MAX_LENGTH}, got {text_cfg.get('context_length')}")

    act = QuickGELU if model_cfg.get("quick_gelu") else torch.nn.GELU
    # Seeded even when a checkpoint overwrites the init: building must not draw from the caller's RNG.
    tower = _seeded_init(cfg, lambda: TextTransformer(**text_cfg, output_dim=model_cfg["embed_dim"], act_layer=act))
    if path is not None:
        try:
            tower.load_state_dict(_open_clip_text_state(Path(path)))
        except RuntimeError as e:
            raise ValueError(f"text_encoder path {path!r} does not hold OpenCLIP {name}'s text tower: {e}") from e
    return _frozen(tower)


def _open_clip_text_state(path):
    """The text tower's tensors in an OpenCLIP checkpoint: a safetensors file, or a torch.save'd
    state dict (also open_clip's training checkpoints: {"state_dict": ...}, keys from DDP)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("visual.")}
        else:
            # Memory-mapped: the vision tower's tensors are never read.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as e:  # torch.load and safetensors raise many kinds on a damaged file
        raise ValueError(f"text_encoder path {str(path)!r} is not a readable checkpoint: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"text_encoder path {str(path)!r} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("text.") for k in state):  # open_clip's CustomTextCLIP nests the tower
        return {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
    # A CLIP checkpoint: the text tower's keys are at the top, beside visual.* and the logit scale.
    return {k: v for k, v in state.items() if not k.startswith(("visual.", "logit_"))}
