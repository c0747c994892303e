import json
import string

import pytest
import torch

from trainer.encoders import (
    MAX_LENGTH,
    ByteTokenizer,
    decode_latents,
    encode_images,
    encoder_config,
    load_text_encoder,
    load_vae,
    vae_downsampling,
)


@pytest.fixture(scope="module")
def tiny():
    return encoder_config("tiny")


def _images(b=2, h=64, w=48):
    return torch.rand(b, 3, h, w) * 2 - 1


def test_tiny_vae_round_trip_shapes_and_scaling(tiny):
    vae = load_vae(tiny["vae"])
    assert vae_downsampling(vae) == 8 and vae.config.latent_channels == 4
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    x = _images()
    z = encode_images(vae, x)
    assert z.shape == (2, 4, 8, 6)
    scale = tiny["vae"]["config"]["scaling_factor"]
    with torch.no_grad():
        torch.testing.assert_close(z, vae.encode(x).latent_dist.mean * scale)
        torch.testing.assert_close(decode_latents(vae, z), vae.decode(z / scale).sample)
    assert decode_latents(vae, z).shape == x.shape
    # A draw from the posterior is reproducible with a generator.
    a = encode_images(vae, x, sample=True, generator=torch.Generator().manual_seed(0))
    b = encode_images(vae, x, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, z)


def test_random_init_is_seeded_and_leaves_global_rng_alone(tiny):
    state = torch.get_rng_state()
    a, b = load_vae(tiny["vae"]), load_vae(tiny["vae"])
    assert torch.equal(state, torch.get_rng_state())
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    c = load_vae({**tiny["vae"], "init_seed": 1})
    assert not torch.equal(a.encoder.conv_in.weight, c.encoder.conv_in.weight)


def test_vae_from_local_folders(tiny, tmp_path):
    vae = load_vae(tiny["vae"])
    vae.save_pretrained(tmp_path / "model")
    vae.save_pretrained(tmp_path / "pipeline" / "vae")  # a diffusers pipeline folder
    x = _images(1, 32, 32)
    for path in (tmp_path / "model", tmp_path / "pipeline"):
        torch.testing.assert_close(encode_images(load_vae({"path": str(path)}), x), encode_images(vae, x))


def test_vae_bad_input(tiny, tmp_path):
    vae = load_vae(tiny["vae"])
    with pytest.raises(ValueError, match="not a multiple"):
        encode_images(vae, _images(1, 60, 64))
    with pytest.raises(ValueError, match="images must be"):
        encode_images(vae, torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="latents must be"):
        decode_latents(vae, torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="exactly one of"):
        load_vae({"path": str(tmp_path), **tiny["vae"]})
    with pytest.raises(ValueError, match="not a directory"):
        load_vae({"path": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="unknown encoder config"):
        encoder_config("nope")


def test_byte_tokenizer():
    tok = ByteTokenizer()
    ids = tok(["ab", "", "é", "x" * 200])
    assert ids.shape == (4, MAX_LENGTH) and ids.dtype == torch.long
    assert ids[0, :5].tolist() == [tok.BOS, 97, 98, tok.EOS, tok.PAD]
    assert ids[1, :3].tolist() == [tok.BOS, tok.EOS, tok.PAD]
    assert ids[2, :4].tolist() == [tok.BOS, 0xC3, 0xA9, tok.EOS]  # UTF-8 bytes of é
    assert ids[3, 0] == tok.BOS and ids[3, -1] == tok.EOS and (ids[3, 1:-1] == ord("x")).all()
    assert int(ids.max()) < tok.vocab_size


def test_tiny_text_encoder(tiny):
    text = load_text_encoder(tiny["text_encoder"])
    emb = text.encode(["a photo of a cat", "ein Hund"])
    assert emb.shape == (2, MAX_LENGTH, 32) and text.dim == 32 and not emb.requires_grad
    assert torch.equal(emb, load_text_encoder(tiny["text_encoder"]).encode(["a photo of a cat", "ein Hund"]))
    assert not torch.allclose(emb[0], emb[1])
    empty = text.empty_embedding()
    assert empty.shape == (1, MAX_LENGTH, 32) and torch.equal(empty, text.encode([""]))
    with pytest.raises(ValueError, match="list of strings"):
        text.encode("a cat")
    with pytest.raises(ValueError, match="vocab_size"):
        load_text_encoder({"config": {**tiny["text_encoder"]["config"], "vocab_size": 100}})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        load_text_encoder({"config": {**tiny["text_encoder"]["config"], "max_position_embeddings": 16}})
    with pytest.raises(ValueError, match="clip_skip"):
        load_text_encoder({**tiny["text_encoder"], "clip_skip": 2})


def _save_tiny_clip(folder, num_layers):
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


def test_clip_skip_is_the_penultimate_layer_then_final_layer_norm(tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    full = _save_tiny_clip(tmp_path / "clip", num_layers=3)
    prompts = ["a cat", "the quick brown fox"]
    ids = CLIPTokenizer.from_pretrained(tmp_path / "clip")(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = full(ids, output_hidden_states=True)
        norm = getattr(full, "text_model", full).final_layer_norm
        penultimate = norm(out.hidden_states[-2])

    last = load_text_encoder({"path": str(tmp_path / "clip")})
    torch.testing.assert_close(last.encode(prompts), out.last_hidden_state)
    skip = load_text_encoder({"path": str(tmp_path / "clip"), "clip_skip": 1})
    torch.testing.assert_close(skip.encode(prompts), penultimate)
    # SD2's diffusers weights are OpenCLIP's tower with its last layer dropped: the same thing.
    truncated = CLIPTextModel.from_pretrained(tmp_path / "clip", num_hidden_layers=2).eval()
    with torch.no_grad():
        torch.testing.assert_close(truncated(ids).last_hidden_state, penultimate)


def test_text_encoder_from_a_pipeline_folder(tmp_path):
    model = _save_tiny_clip(tmp_path / "pipe" / "tokenizer", num_layers=1)
    model.save_pretrained(tmp_path / "pipe" / "text_encoder")
    text = load_text_encoder({"path": str(tmp_path / "pipe")})
    emb = text.encode(["a dog"])
    assert emb.shape == (1, MAX_LENGTH, 32)
    # The tokenizer pads to 77 with the end token, as SD's pipelines call it.
    assert text.tokenizer(["a dog"])[0, :6].tolist() == [0, 28, 5, 16, 34, 1]


def test_sd2_sized_configs():
    sd2 = encoder_config("sd2")
    text, vae = sd2["text_encoder"]["config"], sd2["vae"]["config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (1024, 23, 16)
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["scaling_factor"] == 0.18215
