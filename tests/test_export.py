"""trainer.export: a checkpoint as a diffusers folder from the command line, and what every
export (train.py's too) replaces and says."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from scripts import ROOT
from test_train import TINY
from tiny_models import save_tiny_clip
from trainer import checkpoint, export, train
from trainer.diffusion import NoiseSchedule
from trainer.encoders import encoder_config, load_text_encoder, load_vae
from trainer.sample import WEIGHTS_FILES, load_checkpoint

pytestmark = pytest.mark.usefixtures("torch_kernels")


@pytest.fixture
def run_dir(tmp_path):
    """A tiny run of 2 steps at 32 px: step_0000002 holds trained and EMA weights."""
    train.main([*TINY, "train.steps=2", "data.resolution=32", f"out_dir={tmp_path / 'run'}"])
    return tmp_path / "run"


def test_a_checkpoint_exports_as_a_diffusers_unet_that_computes_as_ours(run_dir, tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    step = checkpoint.checkpoint_dir(run_dir) / checkpoint.step_name(2)
    out = tmp_path / "exported"
    for weights, args in (("ema", []), ("trained", ["--weights", "trained"])):  # the second over the first
        export.main([str(run_dir), str(out), *args])
        said = capsys.readouterr().out
        assert (f"wrote a diffusers UNet in {out / 'unet'} (no whole pipeline: the text encoder's tokenizer is the "
                f"byte tokenizer" in said)  # the tiny run's: no transformers form
        assert f"with the {'EMA' if weights == 'ema' else 'trained'} weights of {step}" in said
        ref = diffusers.UNet2DConditionModel.from_pretrained(out / "unet").eval()
        ours = load_checkpoint(step, weights=weights).unet
        expected = load_file(step / WEIGHTS_FILES[weights])
        assert all(torch.equal(v, expected[k]) for k, v in ref.state_dict().items()), weights
        x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
        with torch.no_grad():
            torch.testing.assert_close(ref(x, 500, encoder_hidden_states=context).sample, ours(x, 500, context),
                                       rtol=1e-4, atol=1e-4)
    assert ref.config.sample_size == 4  # data.resolution 32's latent size, as train.py exports it (config.yaml: 8)
    assert sorted(p.name for p in out.iterdir()) == ["unet"]


def test_export_refuses_what_it_cannot_write_over(run_dir, tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    for args, message in (([str(run_dir), str(tmp_path / "other")], "holds files other than an earlier export's"),
                          ([str(tmp_path / "pipe"), str(tmp_path / "x")], "is a diffusers pipeline already"),
                          ([str(tmp_path / "none"), str(tmp_path / "x")], "none: no such file or folder"),
                          ([str(run_dir), str(run_dir / "metrics.jsonl")], "is a file, not a folder")):
        with pytest.raises(SystemExit):
            export.main(args)
        assert message in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    ema = checkpoint.checkpoint_dir(run_dir) / "step_0000002" / "ema.safetensors"
    data = ema.read_bytes()
    ema.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of a weight: it loaded as another weight
    with pytest.raises(SystemExit, match=r"ema.safetensors does not hold the bytes written \(its sha256 differs"):
        export.main([str(run_dir), str(tmp_path / "empty")])
    ema.write_bytes(b"damaged")
    with pytest.raises(SystemExit, match=r"ema.safetensors holds 7 bytes, not the \d+ written \(truncated"):
        export.main([str(run_dir), str(tmp_path / "empty")])  # one line, not a traceback
    export.main([str(run_dir), str(run_dir / "diffusers"), "--weights", "trained"])  # the run's own export
    assert "with the trained weights of" in capsys.readouterr().out


def test_export_help_says_how_to_call_it():
    # It printed nothing and exited 0: there was no main.
    result = subprocess.run([sys.executable, "-m", "trainer.export", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "CHECKPOINT" in result.stdout and "--weights {ema,trained}" in result.stdout


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
