import hashlib
import json
import sys
import types

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from tiny_models import TINY_UNET, StandInUNet
from trainer import config as run_config
from trainer import sample
from trainer.encoders import encoder_config, load_text_encoder, load_vae
from trainer.sample import label_font, label_lines, load_checkpoint, main, sample_images, save_grid


@pytest.fixture(scope="module")
def encoders():
    tiny = encoder_config("tiny")
    return load_vae(tiny["vae"]), load_text_encoder(tiny["text_encoder"])


def test_save_grid_layout(tmp_path):
    # 2 rows x 3 columns of flat-colored 4x5 images: pixel blocks land where the layout says.
    values = torch.linspace(-1, 1, 6)
    images = values.view(6, 1, 1, 1).expand(6, 3, 4, 5).clone()
    path = save_grid(images, tmp_path / "sub" / "grid.png", rows=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 4, 3 * 5, 3) and grid.dtype == np.uint8
    for i, v in enumerate(values.tolist()):
        row, col = divmod(i, 3)
        assert (grid[row * 4:(row + 1) * 4, col * 5:(col + 1) * 5] == round((v + 1) * 127.5)).all()
    with pytest.raises(ValueError, match="multiple of rows"):
        save_grid(images, tmp_path / "bad.png", rows=4)
    # labelled: a white band with dark text above each row, the images below it as before
    images = values.view(6, 1, 1, 1).expand(6, 3, 60, 50).clone()
    grid = np.asarray(Image.open(save_grid(images, tmp_path / "labelled.png", rows=2, labels=["a cat", "a dog"])))
    assert grid.shape == (2 * (14 + 60), 3 * 50, 3)
    for row in range(2):
        band, block = grid[row * 74:row * 74 + 14], grid[row * 74 + 14:(row + 1) * 74, :50]
        assert (band.min(-1) < 100).any() and (band[:, -2:] == 255).all()  # text, before the right edge
        assert (block == round((values[3 * row].item() + 1) * 127.5)).all()
    # a prompt too long for one line takes two in every row's band; a newline or none is no error
    for labels in (["a cat", "a very long prompt " * 20], ["a\ncat", ""]):
        grid = np.asarray(Image.open(save_grid(images, tmp_path / "labelled.png", rows=2, labels=labels)))
        band = 28 if len(labels[1]) > 100 else 14
        assert grid.shape == (2 * (band + 60), 3 * 50, 3)
        for row in range(2):
            text = grid[row * (band + 60):row * (band + 60) + band]
            assert (text.min(-1) < 100).any() and (text[:, -2:] == 255).all()
    with pytest.raises(ValueError, match="one label per row"):
        save_grid(images, tmp_path / "bad.png", rows=2, labels=["a cat"])


def test_labels_take_one_line_or_two_cut_with_an_ellipsis():
    # A newline made PIL refuse to measure the label, in trainer.sample and at the end of a run.
    font = label_font(12)
    assert label_lines("a\n cat\t on  a mat ", 150, font) == ["a cat on a mat"]
    assert label_lines("", 150, font) == label_lines(" \n", 150, font) == ["(empty prompt)"]
    long = "a very long prompt about a lighthouse at dusk " * 10
    first, second = label_lines(long, 150, font)
    assert long.startswith(first + " ") and second.endswith("…")  # cut between words, then short
    assert all(font.getlength(line) <= 150 for line in (first, second))
    assert label_lines("a cat sitting on a mat", 150, font) == ["a cat sitting on a mat"]
    assert " ".join(label_lines("a cat sitting on a mat", 80, font)) == "a cat sitting on a mat"  # two lines, whole


def test_sample_images_shapes_and_determinism(encoders):
    vae, text = encoders
    unet = StandInUNet()
    kwargs = dict(resolution=64, n=2, steps=2, guidance=3.0)
    a = sample_images(unet, vae, text, ["a cat", "a dog"], **kwargs)
    assert a.shape == (4, 3, 64, 64) and torch.isfinite(a).all()
    assert torch.equal(a, sample_images(unet, vae, text, ["a cat", "a dog"], **kwargs))
    assert not torch.equal(a, sample_images(unet, vae, text, ["a cat", "a dog"], seed=1, **kwargs))
    # Default resolution: the UNet's latent sample_size (8) times the VAE's 8x.
    v = sample_images(unet, vae, text, ["a cat"], steps=2, prediction_type="v_prediction")
    assert v.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="multiple of the VAE"):
        sample_images(unet, vae, text, ["a cat"], resolution=60)
    with pytest.raises(ValueError, match="list of strings"):
        sample_images(unet, vae, text, "a cat", resolution=64)


@pytest.mark.gpu
def test_sampling_on_a_gpu_runs_the_unet_in_bf16(encoders):
    # fp32 attention is the accuracy path, slow on GPUs: sampling runs the UNet as training does.
    from trainer.unet import UNet

    vae, text = (m.to("cuda") for m in encoders)
    unet = UNet.from_config(TINY_UNET).cuda()
    seen = []
    unet.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    images = sample_images(unet, vae, text, ["a cat"], resolution=64, steps=2)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """An out_dir in train.py's checkpoint layout, with trainer.unet.UNet standing in as the
    diffusers UNet (so this runs before the real UNet lands)."""
    from trainer.unet import CONFIG_NAME

    monkeypatch.setitem(sys.modules, "trainer.unet", types.SimpleNamespace(UNet=StandInUNet, CONFIG_NAME=CONFIG_NAME))
    tiny = encoder_config("tiny")
    config = {"model": {"unet": dict(TINY_UNET), **tiny}, "diffusion": {"prediction_type": "epsilon"},
              "data": {"resolution": 64}}
    for step, ema_seed in (("step_0000001", None), ("step_0000002", 7)):
        folder = tmp_path / "checkpoints" / step
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        (folder / "state.json").write_text(json.dumps({"step": int(step[5:])}))
        save_file(StandInUNet(seed=0).state_dict(), folder / "unet.safetensors")
        if ema_seed is not None:
            save_file(StandInUNet(seed=ema_seed).state_dict(), folder / "ema.safetensors")
    (tmp_path / "checkpoints" / "latest").write_text("step_0000002\n")
    return tmp_path


def test_load_checkpoint_prefers_ema_and_follows_latest(run_dir):
    ema = StandInUNet(seed=7).state_dict()
    step = run_dir / "checkpoints" / "step_0000002"
    for path in (run_dir, run_dir / "checkpoints", step):
        loaded = load_checkpoint(path)
        assert all(torch.equal(v, ema[k]) for k, v in loaded.unet.state_dict().items())
        assert loaded.folder == step and loaded.weights == "ema"
    assert not loaded.unet.training and loaded.text_encoder.dim == 32 and loaded.config["data"]["resolution"] == 64
    plain = load_checkpoint(run_dir / "checkpoints" / "step_0000001")  # no EMA saved there
    assert torch.equal(plain.unet.unet.conv_in.weight, StandInUNet(seed=0).unet.conv_in.weight)
    assert plain.weights == "trained"
    trained = load_checkpoint(run_dir, weights="trained")
    assert trained.weights == "trained" and torch.equal(trained.unet.unet.conv_in.weight, plain.unet.unet.conv_in.weight)
    with pytest.raises(ValueError, match="step_0000001 holds no EMA weights .*the run's EMA starts at step"):
        load_checkpoint(run_dir / "checkpoints" / "step_0000001", weights="ema")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(run_dir / "checkpoints" / "step_0000003")


def test_cli_writes_a_grid(run_dir, capsys):
    out = run_dir / "grid.png"
    main(["--checkpoint", str(run_dir), "--prompt", "a cat", "--prompt", "a red bus", "--n", "3",
          "--steps", "2", "--out", str(out)])
    assert Image.open(out).size == (3 * 64, 2 * (14 + 64))  # each row under its prompt
    step = run_dir / "checkpoints" / "step_0000002"
    assert f"2 prompts x 3 images at 64 px, with the EMA weights of {step}" in capsys.readouterr().out
    main(["--checkpoint", str(run_dir), "--prompt", "a cat", "--n", "1", "--steps", "2", "--out", str(out),
          "--weights", "trained"])
    assert f"1 prompt x 1 image at 64 px, with the trained weights of {step}" in capsys.readouterr().out


def _cli_error(capsys, args):
    """The error trainer.sample ends with: a usage error's last line, or SystemExit's message."""
    with pytest.raises(SystemExit) as exit:
        main(["--prompt", "a cat", "--steps", "1", "--n", "1", *args])
    err = capsys.readouterr().err
    return exit.value.code if isinstance(exit.value.code, str) else err.splitlines()[-1]


def test_cli_says_what_is_wrong_with_a_checkpoint_in_one_line(run_dir, capsys, monkeypatch):
    # Each was a traceback, some after minutes of loading.
    step1, step2 = run_dir / "checkpoints" / "step_0000001", run_dir / "checkpoints" / "step_0000002"
    (run_dir / "empty").mkdir()
    (run_dir / "diffusers" / "unet").mkdir(parents=True)
    (run_dir / "diffusers" / "unet" / "config.json").write_text("{}")
    out = ["--out", str(run_dir / "grid.png")]
    cases = [
        (["--checkpoint", str(run_dir / "empty")], "no checkpoint at"),
        (["--checkpoint", str(run_dir / "diffusers" / "unet")], "holds a diffusers UNet without the rest of a pipeline"),
        (["--checkpoint", str(run_dir / "diffusers")], "holds a diffusers UNet without the rest of a pipeline"),
        (["--checkpoint", str(step1), "--weights", "ema"], "step_0000001 holds no EMA weights"),
        (["--checkpoint", str(run_dir), "--device", "foo"], "--device foo: "),
        (["--checkpoint", str(run_dir), "--resolution", "60"], "resolution 60 is not a multiple of the VAE's"),
    ]
    for args, message in cases:
        assert message in _cli_error(capsys, [*args, *out]), args
    monkeypatch.setattr(sys.modules["trainer.unet"], "UNet", None)  # the resolution was checked before the UNet
    assert "resolution 60 is not" in _cli_error(capsys, ["--checkpoint", str(run_dir), "--resolution", "60", *out])
    monkeypatch.setattr(sys.modules["trainer.unet"], "UNet", StandInUNet)
    # damaged checkpoints: each file named, and no advice meant for training alone
    (step2 / "ema.safetensors").write_bytes((step2 / "ema.safetensors").read_bytes()[:20])
    (step1 / "unet.safetensors").unlink()
    message = _cli_error(capsys, ["--checkpoint", str(run_dir), *out])
    assert f"{step2 / 'ema.safetensors'} cannot be read (SafetensorError" in message and "damaged" in message
    assert f"{step1 / 'unet.safetensors'} cannot be read" in _cli_error(capsys, ["--checkpoint", str(step1), *out])
    (step2 / "config.yaml").unlink()
    assert f"{step2 / 'config.yaml'} cannot be read" in _cli_error(capsys, ["--checkpoint", str(step2), *out])
    (step2 / "state.json").unlink()  # said to hold a diffusers UNet without a pipeline
    message = _cli_error(capsys, ["--checkpoint", str(step2), *out])
    assert message.endswith(f": error: {step2} is an incomplete checkpoint: no state.json, which is written last (its "
                            "writing was cut short, or files were removed since); take another step folder")
    message = _cli_error(capsys, ["--checkpoint", str(run_dir), *out])  # latest names step 2
    assert f"{run_dir / 'checkpoints' / 'latest'} names 'step_0000002', which is missing or incomplete" in message
    assert "(or, to train, start over with resume=false" in message


def test_cli_names_a_file_that_differs_from_its_checksum(run_dir, capsys):
    # The fixture writes checkpoints as train.py did before checksums (loaded unverified);
    # here step 2 gets the checksums.json train.py writes now.
    step = run_dir / "checkpoints" / "step_0000002"
    names = ["config.yaml", "ema.safetensors", "state.json", "unet.safetensors"]
    (step / "checksums.json").write_text(json.dumps({n: {"bytes": (step / n).stat().st_size, "sha256": hashlib.sha256(
        (step / n).read_bytes()).hexdigest()} for n in names}))
    data = (step / "ema.safetensors").read_bytes()
    (step / "ema.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # bit rot: it loaded silently
    out = ["--out", str(run_dir / "grid.png")]
    message = _cli_error(capsys, ["--checkpoint", str(run_dir), *out])
    assert message.endswith(f": error: {step / 'ema.safetensors'} does not hold the bytes written (its sha256 differs: "
                            f"corrupted on the disk or in a copy; edited on purpose? then delete {step / 'checksums.json'}"
                            "): the checkpoint is damaged; take an earlier one")
    assert load_checkpoint(step, weights="trained").weights == "trained"  # its intact files still load
    config = (step / "config.yaml").read_bytes()
    (step / "config.yaml").write_bytes(config[:5])  # checked before it is parsed: named as cut short
    message = _cli_error(capsys, ["--checkpoint", str(step), "--weights", "trained", *out])
    assert message.endswith(f": error: {step / 'config.yaml'} holds 5 bytes, not the {len(config)} written (truncated: "
                            "a copy or a write cut short?): the checkpoint is damaged; take an earlier one"), message


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps: number of sampling steps must be an int in [1, 500], got 0"),
    (["--steps", "501"], "got 501: with SD2's leading spacing more steps take every timestep and start at t=501"),
    (["--steps", "1000"], "got 1000: with SD2's leading spacing"),
    (["--n", "0"], "--n must be >= 1"),
    (["--guidance", "nan"], "--guidance must be a finite number >= 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**64)"),
    (["--resolution", "0"], "--resolution must be a positive number"),
    (["--out", "grid"], "--out grid: not an image file name"),
    (["--checkpoint", "/no/such/run"], "--checkpoint /no/such/run: no such file or folder"),
])
def test_cli_refuses_bad_arguments_before_loading_anything(run_dir, capsys, monkeypatch, args, message):
    monkeypatch.setattr(sample, "load_checkpoint", lambda *a, **k: pytest.fail("loaded the models"))
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(run_dir), "--prompt", "a cat", *args])
    assert message in capsys.readouterr().err


def test_cli_refuses_an_out_it_cannot_write_before_loading_anything(run_dir, capsys, monkeypatch):
    # Found only at the save, after the models loaded and sampled: .psd (PIL reads it, writes
    # none: KeyError 'PSD'), a folder under a file, a folder.
    monkeypatch.setattr(sample, "load_checkpoint", lambda *a, **k: pytest.fail("loaded the models"))
    (run_dir / "file.png").write_bytes(b"")
    (run_dir / "folder.png").mkdir()
    for out, message in ((run_dir / "grid.psd", "not an image file name PIL can write"),
                         (run_dir / "file.png" / "grid.png", "cannot be written (NotADirectoryError"),
                         (run_dir / "folder.png", "cannot be written (IsADirectoryError")):
        with pytest.raises(SystemExit):
            main(["--checkpoint", str(run_dir), "--prompt", "a cat", "--out", str(out)])
        assert f"--out {out}: {message}" in capsys.readouterr().err
    with pytest.raises(pytest.fail.Exception, match="loaded the models"):  # a new folder is made
        main(["--checkpoint", str(run_dir), "--prompt", "a cat", "--out", str(run_dir / "new" / "grid.png")])
    assert (run_dir / "new").is_dir()


def test_a_diverged_checkpoint_is_refused(run_dir):
    step = run_dir / "checkpoints" / "step_0000002"
    state = load_file(step / "ema.safetensors")
    state["unet.conv_in.weight"][0] = float("nan")
    save_file(state, step / "ema.safetensors")
    with pytest.raises(ValueError, match=r"1 of the UNet's tensors hold NaN or inf \(unet.conv_in.weight\): the run diverged"):
        load_checkpoint(run_dir)


def test_a_diffusers_pipeline_folder_samples_as_the_same_parts_do(tmp_path, capsys):
    # SD2-style layout: model_index.json, unet/, vae/, text_encoder/ + tokenizer/, scheduler/.
    from tiny_models import save_tiny_clip
    from trainer.unet import UNet

    pipe = tmp_path / "pipe"
    unet = UNet.from_config(run_config.load()["model"]["unet"])  # configs/tiny.yaml's
    unet.save_diffusers(pipe / "unet")
    vae = load_vae(encoder_config("tiny")["vae"])
    vae.save_pretrained(pipe / "vae")
    save_tiny_clip(pipe / "tokenizer", num_layers=1).save_pretrained(pipe / "text_encoder")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))

    loaded, vae2, text, config, folder, weights = load_checkpoint(pipe)
    assert folder == pipe and weights is None
    assert config == {"data": {"resolution": 64}, "diffusion": {"prediction_type": "v_prediction"}}
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in loaded.state_dict().items())
    expected = sample_images(unet.eval(), vae2, text, ["a cat"], resolution=64, steps=2,
                             prediction_type="v_prediction")
    out = tmp_path / "grid.png"
    main(["--checkpoint", str(pipe), "--prompt", "a cat", "--n", "1", "--steps", "2", "--out", str(out)])
    got = torch.from_numpy(np.array(Image.open(out))[14:]).permute(2, 0, 1)[None].float() / 127.5 - 1  # below the label
    assert (got - expected.clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6  # the grid's 8-bit rounding
    assert f"1 prompt x 1 image at 64 px, with the UNet of {pipe}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="is a diffusers pipeline, with one UNet"):
        load_checkpoint(pipe, weights="ema")
