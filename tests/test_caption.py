import json

import pytest
import torch
from test_data import encode, make_folder, smooth_image

from trainer import caption
from trainer.data import build_index, make_loader


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    """A tiny random BLIP-2 (ViT, Q-Former, OPT) with a word-level tokenizer, saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              BlipImageProcessor, PreTrainedTokenizerFast)

    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>"] + "a photo of cat dog red sky tree".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer,
                               num_query_tokens=4)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = Blip2Config(
        vision_config=dict(small, image_size=32, patch_size=8),
        qformer_config=dict(small, vocab_size=len(words), encoder_hidden_size=32),
        # init_std / initializer_range 1: logits large enough that greedy decoding of a random
        # model says words, not only BOS again.
        text_config=dict(model_type="opt", vocab_size=len(words), hidden_size=32, ffn_dim=64,
                         num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=32,
                         max_position_embeddings=64, init_std=1.0, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0),
        num_query_tokens=4, image_token_index=words.index("<image>"), initializer_range=1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Blip2ForConditionalGeneration(config)
    path = tmp_path_factory.mktemp("models") / "tiny-blip2"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def dataset(root):
    """Images with captions from metadata.jsonl rows (root and a subfolder's), a .txt file, and
    none; plus an unreadable file."""
    make_folder(root, 4, captions="jsonl")
    (root / "sub").mkdir()
    (root / "sub" / "a.jpg").write_bytes(encode(smooth_image(7, 40, 40)))
    (root / "sub" / "metadata.jsonl").write_text(json.dumps(
        {"file_name": "a.jpg", "text": "from sub", "license": "CC-BY", "extra": 1}) + "\n")
    (root / "b.jpg").write_bytes(encode(smooth_image(8, 30, 50)))
    (root / "b.txt").write_text("from txt")
    (root / "c.png").write_bytes(encode(smooth_image(9, 36, 36), "PNG"))
    (root / "broken.jpg").write_bytes(b"nope")
    return root


def rows(root):
    out = {}
    for jsonl in sorted(root.rglob("metadata.jsonl")):
        prefix = jsonl.parent.relative_to(root).as_posix()
        for line in jsonl.read_text().splitlines():
            row = json.loads(line)
            out[row["file_name"] if prefix == "." else f"{prefix}/{row['file_name']}"] = row
    return out


def test_caption_round_trip_keeps_original_captions(blip, tmp_path):
    root, cache = dataset(tmp_path / "d"), str(tmp_path / "cache")
    before = {s.name: s.caption for s in build_index(root, cache_dir=cache).samples}
    assert caption.caption_folder(root, blip, batch_size=3, max_new_tokens=4, cache_dir=cache) == 7
    assert (root / "caption_skipped_files.txt").read_text().startswith("broken.jpg\t")  # every one listed
    after = rows(root)
    assert set(after) == set(before)
    for name, row in after.items():
        assert row["synthetic_model"] == "tiny-blip2" and isinstance(row["synthetic_text"], str)
    # Originals kept alongside; the new rows (b.jpg's, c.png's) hold no copy of the .txt caption.
    assert {n: r["text"] for n, r in after.items() if "text" in r} == {
        n: c for n, c in before.items() if n not in ("b.jpg", "c.png")}
    assert set(after["b.jpg"]) == set(after["c.png"]) == {"file_name", "synthetic_text", "synthetic_model"}
    assert any(row["synthetic_text"] for row in after.values())
    assert after["sub/a.jpg"]["extra"] == 1 and after["sub/a.jpg"]["license"] == "CC-BY"
    assert (root / "b.txt").read_text() == "from txt"
    assert {s.name: s.caption for s in build_index(root, cache_dir=cache).samples} == before
    synthetic = build_index(root, cache_dir=cache, caption_field="synthetic_text")
    assert {s.name: s.caption for s in synthetic.samples} == {
        n: r["synthetic_text"] for n, r in after.items()}
    loader = make_loader({"path": str(root), "backend": "pil", "workers": 0, "resolution": 16,
                          "caption_field": "synthetic_text"}, 7, cache_dir=cache)
    _, captions = next(iter(loader))
    assert sorted(captions) == sorted(r["synthetic_text"] for r in after.values())
    # Everything is captioned by this model: a rerun has nothing to do.
    assert caption.caption_folder(root, blip, cache_dir=cache) == 0
    # The .txt file is still the caption: an edit to it counts.
    (root / "b.txt").write_text("edited")
    assert {s.name: s.caption for s in build_index(root, cache_dir=cache).samples}["b.jpg"] == "edited"


def test_caption_resumes(blip, tmp_path, monkeypatch):
    root, cache = dataset(tmp_path / "d"), str(tmp_path / "cache")
    calls, generate = [], caption.generate_captions

    def dies_on_second_batch(model, processor, images, max_new_tokens):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(images))
        return generate(model, processor, images, max_new_tokens)

    monkeypatch.setattr(caption, "generate_captions", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        caption.caption_folder(root, blip, batch_size=2, cache_dir=cache)  # saves every 8 batches, and at Ctrl-C
    assert sum("synthetic_text" in r for r in rows(root).values()) == 2
    monkeypatch.setattr(caption, "generate_captions", generate)
    assert caption.caption_folder(root, blip, batch_size=2, cache_dir=cache) == 5
    assert all("synthetic_text" in r for r in rows(root).values())


def test_caption_bad_model_path(tmp_path):
    root = make_folder(tmp_path / "d", 1)
    with pytest.raises(ValueError, match="is not a directory"):
        caption.caption_folder(root, tmp_path / "nowhere", cache_dir=str(tmp_path / "c"))
