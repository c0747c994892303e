"""The run as a diffusers pipeline folder: StableDiffusionPipeline.from_pretrained(out_dir / "diffusers").

train.py writes the UNet to diffusers/unet/ at the end of every run; where the text encoder
can be written as transformers' CLIPTextModel and CLIPTokenizer (one loaded from a local
folder; with clip_skip, its last blocks dropped), save_pipeline adds vae/, text_encoder/,
tokenizer/, scheduler/ (DDIM on the run's noise schedule and prediction type, SD2's settings)
and model_index.json beside it.
"""
import copy
import json

from trainer.encoders import MAX_LENGTH, ClipTokenizer, CLIPTextEncoder, clip_text_transformer


def unexportable(text_encoder):
    """Why text_encoder has no transformers form for a pipeline, or None."""
    if not isinstance(text_encoder, CLIPTextEncoder):
        return f"the text encoder is {type(text_encoder).__name__}, not transformers' CLIPTextModel"
    if not isinstance(text_encoder.tokenizer, ClipTokenizer):
        return "the text encoder's tokenizer is the byte tokenizer of randomly initialized encoders, not CLIP's"
    return None


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


def save_pipeline(folder, vae, text_encoder, schedule, prediction_type):
    """vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json beside folder/unet/.
    Returns None, or why the text encoder cannot be written (then nothing is)."""
    import diffusers

    why = unexportable(text_encoder)
    if why is not None:
        (folder / "model_index.json").unlink(missing_ok=True)  # an earlier run's pipeline is not this one
        return why
    vae.save_pretrained(folder / "vae")
    pipeline_text_model(text_encoder).save_pretrained(folder / "text_encoder")
    tokenizer = text_encoder.tokenizer.tokenizer
    tokenizer.model_max_length = MAX_LENGTH  # the pipeline pads prompts to it
    tokenizer.save_pretrained(folder / "tokenizer")
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
