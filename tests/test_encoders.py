import sys

import pytest
import torch

from tiny_models import TINY_OPEN_CLIP, needs_open_clip, save_tiny_clip, tiny_open_clip_arch

from trainer.encoders import (
    MAX_LENGTH,
    OPEN_CLIP_EXAMPLES,
    ByteTokenizer,
    decode_latents,
    encode_images,
    encoder_config,
    load_open_clip_tower,
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


def test_clip_skip_is_the_penultimate_layer_then_final_layer_norm(tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    full = save_tiny_clip(tmp_path / "clip", num_layers=3)
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
    model = save_tiny_clip(tmp_path / "pipe" / "tokenizer", num_layers=1)
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


def _text_encoder(kind, tmp_path):
    if kind == "byte":
        return load_text_encoder(encoder_config("tiny")["text_encoder"])
    if kind == "clip":
        save_tiny_clip(tmp_path / "clip", num_layers=1)
        return load_text_encoder({"path": str(tmp_path / "clip")})
    return load_text_encoder(TINY_OPEN_CLIP)


@pytest.mark.parametrize("kind", ["byte", "clip", pytest.param("open_clip", marks=needs_open_clip)])
def test_texts_longer_than_77_tokens_are_counted_and_said_once(kind, tmp_path, caplog):
    text = _text_encoder(kind, tmp_path)
    texts = ["x " * k for k in range(100)]
    lengths = text._lengths(texts)
    assert lengths == sorted(lengths) and lengths[0] == 2 and lengths[-1] > MAX_LENGTH
    # The lengths are the tokenizer's own: the end token sits where they say.
    ids = text.tokenizer(texts)
    eos = int(ids[0, 1])
    for row, n in zip(ids, lengths):
        if n <= MAX_LENGTH:
            assert row[n - 1] == eos and row[n - 2] != eos
    cut = next(i for i, n in enumerate(lengths) if n > MAX_LENGTH)
    fits, longer = texts[cut - 1], texts[cut]  # the longest text that fits, the shortest that does not
    with caplog.at_level("WARNING", logger="trainer.encoders"):
        text.encode(["a cat", fits])
        assert text.truncated == 0 and not caplog.records
        text.encode([fits, longer, longer + "y"])
        assert text.truncated == 2 and "2 of 3 texts are longer than the text encoder's 77 tokens" in caplog.text
        text.encode([longer])
    assert text.truncated == 3 and len(caplog.records) == 1


# --- OpenCLIP ----------------------------------------------------------------------------------

@needs_open_clip
def test_open_clip_tiny_text_encoder():
    state = torch.get_rng_state()
    text = load_text_encoder(TINY_OPEN_CLIP)
    assert torch.equal(state, torch.get_rng_state())
    prompts = ["a photo of a cat", "ein Hund", "x " * 100]
    emb = text.encode(prompts)
    assert emb.shape == (3, MAX_LENGTH, 32) and emb.dtype == torch.float32 and text.dim == 32
    assert not emb.requires_grad and not torch.allclose(emb[0], emb[1])
    assert torch.equal(emb, load_text_encoder(TINY_OPEN_CLIP).encode(prompts))
    assert not torch.allclose(emb, load_text_encoder({**TINY_OPEN_CLIP, "init_seed": 1}).encode(prompts))
    assert torch.equal(text.empty_embedding(), text.encode([""]))
    # open_clip's BPE tokenizer: start and end tokens, zeros after; long captions end in the end token.
    ids = text.tokenizer(["a photo of a cat", "", "x " * 100])
    assert ids.shape == (3, MAX_LENGTH) and ids[1, :3].tolist() == [49406, 49407, 0]
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and ids[2, -1] == 49407
    # SD2's default, the penultimate block: the last block and the pooled projection are dropped.
    assert text.clip_skip == 1 and len(text.model.transformer.resblocks) == 2
    assert text.model.text_projection is None and not any(p.requires_grad for p in text.parameters())
    assert len(load_text_encoder({**TINY_OPEN_CLIP, "clip_skip": 0}).model.transformer.resblocks) == 3


@needs_open_clip
@pytest.mark.parametrize("arch", ["ViT-H-14", "ViT-B-32-quickgelu"])
def test_open_clip_penultimate_is_sd2_diffusers_conditioning(arch):
    """SD2's conditioning two ways: our OpenCLIP encoder's penultimate block (through ln_final),
    and a transformers CLIPTextModel holding the tower's blocks but the last, which is how SD2's
    diffusers text_encoder/ stores OpenCLIP ViT-H (export.open_clip_text_model: the fused in_proj
    split into q, k, v). Also clip_skip=0 against all blocks."""
    from trainer.export import open_clip_text_model

    cfg = {**TINY_OPEN_CLIP, "open_clip": arch}
    prompts = ["a photo of a cat", "", "the quick brown fox jumps over the lazy dog " * 4]
    penultimate, full = load_text_encoder(cfg), load_text_encoder({**cfg, "clip_skip": 0})
    ids = penultimate.tokenizer(prompts)
    with torch.no_grad():
        sd2 = open_clip_text_model(penultimate.model)(ids).last_hidden_state
        every_block = open_clip_text_model(full.model)(ids).last_hidden_state
    torch.testing.assert_close(penultimate.encode(prompts), sd2)
    torch.testing.assert_close(full.encode(prompts), every_block)
    assert not torch.allclose(sd2, every_block, atol=1e-2)
    config = open_clip_text_model(penultimate.model).config
    assert (config.num_hidden_layers, config.hidden_act) == (2, "quick_gelu" if "quickgelu" in arch else "gelu")


@needs_open_clip
def test_open_clip_tokenizer_as_transformers_clip_tokenizer():
    """The exported tokenizer gives open_clip's ids (start, BPE, end, zeros after), except where
    diffusers' own SD2 tokenizer differs from open_clip's too: "!" is its pad token, and it does
    not straighten curly quotes (open_clip's ftfy does)."""
    from trainer.export import open_clip_tokenizer

    text = load_text_encoder(TINY_OPEN_CLIP)
    tokenizer = open_clip_tokenizer(text.tokenizer)
    prompts = ["a photo of a cat", "", "Hello, world. 1234 café naïve 'quotes' (x) #tag", "don't stop's",
               "the quick brown fox jumps over the lazy dog " * 4]
    ids = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, text.tokenizer(prompts)) and tokenizer.model_max_length == MAX_LENGTH
    sd2_like = tokenizer(["wow!", "\u201cquoted\u201d"], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
    assert not torch.equal(sd2_like, text.tokenizer(["wow!", "\u201cquoted\u201d"]))


@needs_open_clip
def test_open_clip_towers_a_clip_text_model_cannot_hold_say_so():
    from trainer.export import open_clip_text_model

    layer_scale = load_open_clip_tower({**TINY_OPEN_CLIP, "config": {**TINY_OPEN_CLIP["config"], "ls_init_value": 0.1}})
    with pytest.raises(ValueError, match="no place for: .*ls_1"):
        open_clip_text_model(layer_scale)
    no_mask = load_open_clip_tower({**TINY_OPEN_CLIP, "config": {**TINY_OPEN_CLIP["config"], "no_causal_mask": True}})
    with pytest.raises(ValueError, match="no causal mask"):
        open_clip_text_model(no_mask)


@needs_open_clip
@pytest.mark.parametrize("layout", ["text tower", "CLIP", "CLIP safetensors", "training checkpoint", "CustomTextCLIP"])
def test_open_clip_checkpoint_loads_by_path(tmp_path, layout):
    """An OpenCLIP checkpoint file gives the tower its text weights; the vision tower is skipped."""
    import open_clip
    from safetensors.torch import save_file

    arch = tiny_open_clip_arch()
    vision = {"image_size": 32, "patch_size": 16, "layers": 1, "width": 32, "head_width": 16}
    torch.manual_seed(1)
    if layout == "text tower":
        source = model = load_open_clip_tower({"open_clip": arch, "config": {}, "init_seed": 1})
    elif layout == "CustomTextCLIP":
        model = open_clip.CustomTextCLIP(arch["embed_dim"], vision, arch["text_cfg"])
        source = model.text
    else:
        source = model = open_clip.CLIP(arch["embed_dim"], vision, arch["text_cfg"])
    state = model.state_dict()
    path = tmp_path / ("model.safetensors" if "safetensors" in layout else "model.bin")
    if layout == "CLIP safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    elif layout == "training checkpoint":  # as open_clip's training saves: nested, DDP's key prefix
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state, path)
    tower = load_open_clip_tower({"open_clip": arch, "path": str(path)})
    want = source.state_dict()  # a CLIP's holds the vision tower too, which the tower lacks
    assert all(torch.equal(v, want[k]) for k, v in tower.state_dict().items())
    text = load_text_encoder({"open_clip": arch, "path": str(path)})
    assert text.encode(["a cat"]).shape == (1, MAX_LENGTH, 32)


@needs_open_clip
def test_open_clip_bad_configs(tmp_path):
    with pytest.raises(ValueError, match=r"unknown OpenCLIP model 'ViT-Q-99'.*ViT-H-14"):
        load_text_encoder({"open_clip": "ViT-Q-99", "config": {}})
    with pytest.raises(ValueError, match="unknown OpenCLIP model"):
        load_text_encoder({"open_clip": {"text_cfg": {}}, "config": {}})  # no embed_dim
    # Hugging Face text towers and tokenizers (downloads) are refused before anything is built.
    for arch in ("xlm-roberta-base-ViT-B-32", "ViT-B-16-SigLIP", "ViT-H-14-worldwide"):
        with pytest.raises(ValueError, match="not supported"):
            load_text_encoder({"open_clip": arch, "config": {}})
    with pytest.raises(ValueError, match=r"keys \['norm_kwargs'\] are not supported"):
        load_text_encoder({**TINY_OPEN_CLIP, "config": {"norm_kwargs": {"eps": 1e-6}}})
    with pytest.raises(ValueError, match="context_length must be 77"):
        load_text_encoder({**TINY_OPEN_CLIP, "config": {**TINY_OPEN_CLIP["config"], "context_length": 64}})
    with pytest.raises(ValueError, match="vocab_size must be >= 49408"):
        load_text_encoder({**TINY_OPEN_CLIP, "config": {**TINY_OPEN_CLIP["config"], "vocab_size": 1000}})
    with pytest.raises(ValueError, match="dict of OpenCLIP text_cfg keys"):
        load_text_encoder({"open_clip": "ViT-H-14", "config": "tiny"})
    with pytest.raises(ValueError, match=r"clip_skip must be an int in \[0, 3\)"):
        load_text_encoder({**TINY_OPEN_CLIP, "clip_skip": 3})
    with pytest.raises(ValueError, match="exactly one of 'path' \\(a local file\\)"):
        load_text_encoder({**TINY_OPEN_CLIP, "path": str(tmp_path)})
    for missing in (tmp_path / "nope.bin", tmp_path):
        with pytest.raises(ValueError, match="is not a file"):
            load_text_encoder({"open_clip": "ViT-H-14", "path": str(missing)})
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_text_encoder({"open_clip": tiny_open_clip_arch(), "path": str(tmp_path / "junk.bin")})
    # A checkpoint of another size: the architecture named does not fit it.
    torch.save(load_open_clip_tower(TINY_OPEN_CLIP).state_dict(), tmp_path / "h14.bin")
    with pytest.raises(ValueError, match="does not hold OpenCLIP model's text tower"):
        load_text_encoder({"open_clip": tiny_open_clip_arch(embed_dim=8), "path": str(tmp_path / "h14.bin")})


@needs_open_clip
@pytest.mark.parametrize("arch", OPEN_CLIP_EXAMPLES)
def test_open_clip_examples_are_accepted(arch):
    """The names shown when one is unknown all build (narrowed to stay cheap)."""
    text = load_text_encoder({"open_clip": arch, "config": {"width": 16, "heads": 1, "layers": 2}})
    assert text.encode(["a"]).shape == (1, MAX_LENGTH, 16)


def test_open_clip_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    with pytest.raises(ImportError, match=r"cckernels\[openclip\]"):
        load_text_encoder(TINY_OPEN_CLIP)


@needs_open_clip
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_open_clip_half_precision(device, dtype):
    """Cast like precompute casts its encoders (.to(dtype)): outputs in that dtype, close to fp32."""
    prompts = ["a photo of a cat", ""]
    want = load_text_encoder(TINY_OPEN_CLIP).encode(prompts)
    got = load_text_encoder(TINY_OPEN_CLIP, device).to(dtype).encode(prompts)
    assert got.dtype == dtype and got.device.type == device
    err = (got.float().cpu() - want).abs().mean() / want.abs().mean()
    assert err < (0.02 if dtype == torch.bfloat16 else 0.005), err
