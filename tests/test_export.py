"""trainer.export: what every export (train.py's too) replaces and says."""
from tiny_models import save_tiny_clip
from trainer import export
from trainer.diffusion import NoiseSchedule
from trainer.encoders import encoder_config, load_text_encoder, load_vae


def test_an_export_without_a_whole_pipeline_removes_an_earlier_ones_parts(tmp_path):
    # A resumed run with another text encoder removed model_index.json alone: vae/,
    # text_encoder/, tokenizer/ and scheduler/ stayed beside the new unet/.
    folder = tmp_path / "diffusers"
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text("{}")
    (folder / "model_index.json").write_text("{}")
    tiny = encoder_config("tiny")
    why = export.save_pipeline(folder, load_vae(tiny["vae"]), load_text_encoder(tiny["text_encoder"]), NoiseSchedule(),
                               "epsilon")
    assert "byte tokenizer" in why
    assert sorted(p.name for p in folder.iterdir()) == ["unet"]


def test_the_exports_own_probe_prompt_is_not_warned_about(tmp_path, caplog):
    # "1 of 3 texts are longer than the text encoder's 77 tokens" was said of a prompt the user
    # never wrote; a user's long prompt afterwards went unsaid (said once per encoder).
    save_tiny_clip(tmp_path / "clip", num_layers=1)
    text = load_text_encoder({"path": str(tmp_path / "clip")})
    with caplog.at_level("WARNING", logger="trainer.encoders"):
        assert export.conditioning_differs(*export.pipeline_text_parts(text), text) is None
        assert not caplog.records and text.truncated == 0
        text.encode(["a long prompt " * 20])
    assert "1 of 1 texts are longer than the text encoder's 77 tokens" in caplog.text
