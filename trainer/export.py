r"""The run as a diffusers pipeline folder: StableDiffusionPipeline.from_pretrained(out_dir / "diffusers").

train.py exports at the end of every run (save_export): the UNet to diffusers/unet/; where the
text encoder can be written as transformers' CLIPTextModel and CLIPTokenizer (one loaded from
a local folder, with clip_skip its last blocks dropped; or an OpenCLIP tower, converted as
diffusers stores SD2's), save_pipeline adds vae/, text_encoder/, tokenizer/, scheduler/ (DDIM
on the run's noise schedule and prediction type, SD2's settings) and model_index.json beside
it, after checking that the pipeline's text encoder conditions on a few prompts as the run did.
A checkpoint exports the same way from the command line:

    python -m trainer.export runs/tiny/checkpoints/step_0000100 exported [--weights ema|trained]

CHECKPOINT is a step folder, or a checkpoints folder or an out_dir (their latest), loaded as
trainer.sample loads it (--weights: ema where the checkpoint has EMA weights, else trained).
OUT is a new or empty folder, or an earlier export, which is replaced.
"""
import argparse
import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch

from trainer.diffusion import NoiseSchedule
from trainer.encoders import (MAX_LENGTH, ClipTokenizer, CLIPTextEncoder, OpenCLIPTextEncoder, clip_text_transformer,
                              vae_downsampling)
from trainer.sample import WEIGHTS_FILES, load_checkpoint, weights_described
from trainer.unet import CONFIG_NAME, save_safetensors

# What save_pipeline writes beside unet/.
PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")

# Prompts the exported text encoder must encode as the run's did (the empty one is guidance's;
# the last is cut at 77 tokens).
PROBE_PROMPTS = ["a photo of a cat", "", "An oil painting of a lighthouse at dusk, waves, 4k, " * 6]


def pipeline_text_model(text_encoder):
    """The CLIPTextModel whose last block's output (after the final LayerNorm) is what
    text_encoder.encode gives: with clip_skip k, a copy without its last k blocks (as SD2's
    diffusers text encoder is OpenCLIP's tower without its last block)."""
    model, k = text_encoder.model, text_encoder.clip_skip
    if k:
        model = copy.deepcopy(model)
        del clip_text_transformer(model).encoder.layers[-k:]
        model.config.num_hidden_layers -= k
    return model


def open_clip_text_model(tower):
    """An open_clip TextTransformer as a transformers CLIPTextModel on its device: every block
    it holds (OpenCLIPTextEncoder prunes those after the one it reads), the fused attention
    in_proj split into q, k and v, ln_final as the final LayerNorm, as diffusers stores SD2's
    OpenCLIP ViT-H. ValueError where the tower has parts a CLIPTextModel has not."""
    from open_clip.transformer import QuickGELU
    from transformers import CLIPTextConfig, CLIPTextModel

    blocks = tower.transformer.resblocks
    gelu = blocks[0].mlp.gelu
    if getattr(tower, "attn_mask", None) is None or getattr(tower, "cls_emb", None) is not None:
        raise ValueError("its OpenCLIP tower has no causal mask or a class token, which CLIPTextModel has not")
    if not isinstance(gelu, QuickGELU) and not (isinstance(gelu, torch.nn.GELU) and gelu.approximate == "none"):
        raise ValueError(f"its OpenCLIP tower's activation is {gelu}, not GELU or QuickGELU")
    state = tower.state_dict()
    config = CLIPTextConfig(
        vocab_size=tower.vocab_size, hidden_size=tower.width, num_attention_heads=tower.heads,
        num_hidden_layers=len(blocks), intermediate_size=blocks[0].mlp.c_fc.out_features,
        max_position_embeddings=state["positional_embedding"].shape[0], layer_norm_eps=tower.ln_final.eps,
        hidden_act="quick_gelu" if isinstance(gelu, QuickGELU) else "gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0)  # open_clip's BPE: start, end, pad
    # CLIPTextModel's parameter -> the tower's key (or, for q, k and v, a third of in_proj's)
    source = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    thirds = {}
    for i in range(len(blocks)):
        for kind in ("weight", "bias"):
            source |= {f"encoder.layers.{i}.{ours}.{kind}": f"transformer.resblocks.{i}.{name}.{kind}"
                       for ours, name in names.items()}
            thirds |= {f"encoder.layers.{i}.self_attn.{p}_proj.{kind}": (f"transformer.resblocks.{i}.attn.in_proj_{kind}", j)
                       for j, p in enumerate("qkv")}
    unused = {k for k in state if not k.startswith("text_projection")}  # the pooled token's, never read
    unused -= set(source.values()) | {fused for fused, _ in thirds.values()}
    if unused:
        raise ValueError(f"its OpenCLIP tower has weights a CLIPTextModel has no place for: {sorted(unused)[:4]}")
    model = CLIPTextModel(config).eval().requires_grad_(False)
    params = dict(clip_text_transformer(model).named_parameters())
    missing = set(params) - set(source) - set(thirds)
    if missing:  # a transformers version that lays CLIPTextModel out otherwise
        raise ValueError(f"this transformers' CLIPTextModel has parameters the conversion does not fill: {sorted(missing)[:4]}")
    with torch.no_grad():
        for name, param in params.items():
            if name in thirds:
                fused, j = thirds[name]
                param.copy_(state[fused].chunk(3)[j])
            else:
                param.copy_(state[source[name]])
    return model.to(next(tower.parameters()).device)


def open_clip_tokenizer(tokenizer):
    """open_clip's SimpleTokenizer as a transformers CLIPTokenizer: the same BPE vocabulary and
    merges (CLIP's), its start and end tokens under transformers' names, prompts padded with
    id 0 ("!") after the end token, as open_clip pads them."""
    from transformers import CLIPTokenizer

    special = {tokenizer.sot_token_id: "<|startoftext|>", tokenizer.eot_token_id: "<|endoftext|>"}
    vocab = {special.get(i, token): i for token, i in tokenizer.encoder.items()}
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer.from_pretrained(folder, pad_token="!", model_max_length=MAX_LENGTH, local_files_only=True)


def pipeline_text_parts(text_encoder):
    """(CLIPTextModel, CLIPTokenizer) for a StableDiffusionPipeline to encode prompts as
    text_encoder.encode does; ValueError saying why where there are none."""
    if isinstance(text_encoder, OpenCLIPTextEncoder):
        return open_clip_text_model(text_encoder.model), open_clip_tokenizer(text_encoder.tokenizer)
    if not isinstance(text_encoder, CLIPTextEncoder):
        raise ValueError(f"the text encoder is {type(text_encoder).__name__}, not transformers' CLIPTextModel or OpenCLIP")
    if not isinstance(text_encoder.tokenizer, ClipTokenizer):
        raise ValueError("the text encoder's tokenizer is the byte tokenizer of randomly initialized encoders, not CLIP's")
    tokenizer = copy.copy(text_encoder.tokenizer.tokenizer)
    tokenizer.model_max_length = MAX_LENGTH  # the pipeline pads prompts to it
    return pipeline_text_model(text_encoder), tokenizer


def conditioning_differs(model, tokenizer, text_encoder):
    """Why the pipeline's text encoder (model, tokenizer: as StableDiffusionPipeline calls
    them) would condition PROBE_PROMPTS otherwise than the run's text_encoder, or None."""
    ids = tokenizer(PROBE_PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    if not torch.equal(ids, text_encoder.tokenizer(PROBE_PROMPTS).cpu()):
        return "its transformers tokenizer splits prompts otherwise than the run's"
    with torch.no_grad():
        ours = text_encoder.encode_ids(ids).float()  # no warning about the probe's long prompt
        theirs = model(ids.to(ours.device)).last_hidden_state.float()
    error = ((theirs - ours).abs().max() / ours.abs().max()).item()
    if not error <= 1e-2:  # fp32 both sides: ~1e-6 apart; a wrong conversion is tens of percent off
        return f"its transformers text model's output differs from the run's encoder by {error:.1e} of its largest value"
    return None


def save_text_parts(folder, text_model, tokenizer):
    """folder/text_encoder/ and folder/tokenizer/ as SD2's pipeline holds them, which
    transformers 4 and 5 both load. transformers 5 saves a CLIPTextModel's weights without the
    "text_model." prefix (transformers 4 then loads none of them and starts from random weights,
    with a warning) and a tokenizer as tokenizer.json alone (4's CLIPTokenizer, the class
    model_index.json names, needs vocab.json and merges.txt): both are written here too."""
    from safetensors.torch import load_file

    text_model.save_pretrained(folder / "text_encoder", max_shard_size="100GB")  # one weights file
    weights = folder / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    if not all(k.startswith("text_model.") for k in state):
        save_safetensors({f"text_model.{k}": v for k, v in state.items()}, weights)
    tokenizer.save_pretrained(folder / "tokenizer")
    files = folder / "tokenizer"
    bpe = json.loads((files / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    if not (files / "vocab.json").exists():
        (files / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False), encoding="utf-8")
    if not (files / "merges.txt").exists():
        merges = (m if isinstance(m, str) else " ".join(m) for m in bpe["merges"])
        (files / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")
    # how this process loaded it, not how a user's should
    settings = json.loads((files / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ("local_files_only", "is_local"):
        settings.pop(key, None)
    text = json.dumps(settings, indent=2, ensure_ascii=False) + "\n"
    (files / "tokenizer_config.json").write_text(text, encoding="utf-8")


def save_pipeline(folder, vae, text_encoder, schedule, prediction_type):
    """PIPELINE_PARTS beside folder/unet/, in place of an earlier export's. Returns None, or
    why the text encoder cannot be written (then none are, and an earlier export's are gone)."""
    import diffusers

    for name in PIPELINE_PARTS:  # an earlier export's (another text encoder, say) are not this one's
        part = folder / name
        if part.is_dir():
            shutil.rmtree(part)
        else:
            part.unlink(missing_ok=True)
    try:
        text_model, tokenizer = pipeline_text_parts(text_encoder)
        why = conditioning_differs(text_model, tokenizer, text_encoder)
    except ValueError as e:
        why = str(e)
    if why is not None:
        return why
    vae.save_pretrained(folder / "vae")
    save_text_parts(folder, text_model, tokenizer)
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start, beta_end=schedule.beta_end,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        prediction_type=prediction_type)
    scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return None


def save_export(folder, unet, vae, text_encoder, schedule, prediction_type, state_dict=None):
    """folder/unet/ (state_dict: the weights to write instead of the UNet's own) and, where the
    text encoder allows, the rest of the pipeline; returns save_pipeline's answer."""
    unet.save_diffusers(folder / "unet", state_dict)
    return save_pipeline(folder, vae, text_encoder, schedule, prediction_type)


def is_export(folder):
    """Whether folder holds an export's files alone: unet/ and perhaps PIPELINE_PARTS."""
    names = {p.name for p in folder.iterdir()}
    return (folder / "unet" / CONFIG_NAME).is_file() and names <= {"unet", *PIPELINE_PARTS}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="step folder, checkpoints folder or out_dir")
    parser.add_argument("out", help="the folder to write: new, empty, or an earlier export")
    parser.add_argument("--weights", choices=WEIGHTS_FILES,
                        help="the UNet's weights; default: ema where the checkpoint has them, else trained")
    args = parser.parse_args(argv)
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    if not checkpoint.exists():
        parser.error(f"{checkpoint}: no such file or folder")
    if (checkpoint / "model_index.json").is_file():
        parser.error(f"{checkpoint} is a diffusers pipeline already")
    if out.exists() and not out.is_dir():
        parser.error(f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        parser.error(f"{out} holds files other than an earlier export's (unet/, {', '.join(PIPELINE_PARTS)}): "
                     "give a new or empty folder")

    try:  # what a checkpoint or the disk can get wrong, in one line
        loaded = load_checkpoint(checkpoint, weights=args.weights)
        # as train.py exports: the default resolution of diffusers' pipelines is the run's
        latent_size = loaded.config["data"]["resolution"] // vae_downsampling(loaded.vae)
        loaded.unet.config["sample_size"] = loaded.unet.sample_size = latent_size
        why_not = save_export(out, loaded.unet, loaded.vae, loaded.text_encoder, NoiseSchedule(),
                              loaded.config["diffusion"]["prediction_type"])
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"{parser.prog}: error: {e}") from None
    what = (f"a diffusers UNet in {out / 'unet'} (no whole pipeline: {why_not})" if why_not
            else f"a diffusers pipeline (StableDiffusionPipeline.from_pretrained) in {out}")
    print(f"wrote {what}, with {weights_described(loaded)}")


if __name__ == "__main__":
    main()
