"""Stand-ins shared by the diffusion, encoder and sampling tests: a tiny randomly initialized
diffusers UNet2DConditionModel called as model(x, t, context) -> tensor, like trainer.unet.UNet;
a tiny randomly initialized OpenCLIP text tower (SD2's ViT-H-14 narrowed, 3 blocks); a tiny
CLIP text model saved with a real tokenizer."""

import importlib.util
import json
import string

import pytest
import torch

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)


class StandInUNet(torch.nn.Module):
    def __init__(self, config=TINY_UNET, seed=0):
        super().__init__()
        from diffusers import UNet2DConditionModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.unet = UNet2DConditionModel(**config)

    @classmethod
    def from_config(cls, config):
        return cls(config)

    @property
    def config(self):
        return self.unet.config

    def forward(self, x, t, context):
        return self.unet(x, t, encoder_hidden_states=context).sample


# Width 32 = the tiny UNet's cross_attention_dim; OpenCLIP's BPE tokenizer needs its 49408 tokens.
TINY_OPEN_CLIP = {"open_clip": "ViT-H-14", "config": {"width": 32, "heads": 2, "layers": 3}}


def tiny_open_clip_arch(embed_dim=16):
    """The tiny tower as an inline open_clip model config, which a checkpoint `path` can name."""
    return {"embed_dim": embed_dim, "text_cfg": {"context_length": 77, "vocab_size": 49408, **TINY_OPEN_CLIP["config"]}}


# CI installs the openclip extra, so these run there.
needs_open_clip = pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                                     reason="open_clip_torch is not installed (pip install '.[openclip]')")


def save_tiny_clip(folder, num_layers):
    """A tiny CLIP text model and a real CLIPTokenizer over a letters-only vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase)]:
        vocab[token] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_attention_heads=2,
                            num_hidden_layers=num_layers, max_position_embeddings=77, hidden_act="gelu",
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPTextModel(config).eval()
    model.save_pretrained(folder)
    return model
