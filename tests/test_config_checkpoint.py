import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from trainer import checkpoint, config


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  unet: {sample_size: 8, block_out_channels: [32, 64]}\ntrain: {steps: 7, weight_decay: 1e-3}\n")
    return path


def test_yaml_then_overrides(cfg_file):
    cfg = config.load(cfg_file, ["train.lr=3e-4", "resume=false", "model.unet.sample_size=16", "data.format=latents"])
    assert cfg["train"]["steps"] == 7 and cfg["train"]["lr"] == 3e-4 and cfg["resume"] is False
    assert cfg["model"]["unet"] == {"sample_size": 16, "block_out_channels": [32, 64]}
    assert cfg["train"]["weight_decay"] == 1e-3
    assert cfg["data"]["format"] == "latents" and cfg["data"]["backend"] == "pil"


def test_an_encoder_source_override_replaces_the_sources_it_cannot_go_with():
    # tiny.yaml's {preset: tiny} plus model.vae.path=DIR was {preset, path}: refused as two sources.
    cfg = config.load(None, ["model.vae.path=/models/vae", "model.text_encoder.open_clip=ViT-H-14",
                             "model.text_encoder.path=/models/open_clip.bin"])
    assert cfg["model"]["vae"] == {"path": "/models/vae"}
    assert cfg["model"]["text_encoder"] == {"open_clip": "ViT-H-14", "path": "/models/open_clip.bin"}
    cfg = config.load(None, ["model.text_encoder.config={hidden_size: 64}", "model.text_encoder.init_seed=3"])
    assert cfg["model"]["text_encoder"] == {"config": {"hidden_size": 64}, "init_seed": 3}
    cfg = config.load(None, ["model.vae.path=/models/vae", "model.vae.preset=tiny"])  # the last word counts
    assert cfg["model"]["vae"] == {"preset": "tiny"}


def test_unknown_override_lists_valid_keys(cfg_file):
    with pytest.raises(ValueError, match=r"unknown config key 'train.step' \(did you mean train.steps.*valid keys: .*data.path"):
        config.load(cfg_file, ["train.step=3"])
    with pytest.raises(ValueError, match="is not key=value"):
        config.load(cfg_file, ["train.steps"])
    with pytest.raises(ValueError, match=r"^override 'train.betas=\[0.9,': while parsing a flow node \(line 1, "
                                         r"column 6\): expected the node content, but found '<stream end>' "
                                         r"\(line 1, column 6\)$"):  # one line, as train.py says it
        config.load(cfg_file, ["train.betas=[0.9,"])


def test_unknown_yaml_key_and_bad_choice(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian: {steps: 3}\n")
    with pytest.raises(ValueError, match="unknown config key 'trian'"):
        config.load(bad)
    bad.write_text("data: {backend: opencv}\n")
    with pytest.raises(ValueError, match="data.backend must be one of dali, pil, got 'opencv'"):
        config.load(bad)


def test_a_config_on_top_of_its_base(tmp_path):
    cfg = config.load(config.ROOT / "configs" / "sd2-base-512.yaml", ["train.lr=3e-5"])
    base = config.load(config.ROOT / "configs" / "sd2-base.yaml")
    assert cfg["model"]["unet"] == base["model"]["unet"] and cfg["data"]["backend"] == base["data"]["backend"]
    assert cfg["data"]["resolution"] == 512 and cfg["model"]["init_from"] == "runs/sd2-base"
    assert cfg["train"]["lr"] == 3e-5 and cfg["train"]["warmup_steps"] == base["train"]["warmup_steps"]
    assert "base" not in cfg
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="config bases form a cycle: a.yaml -> b.yaml -> a.yaml"):
        config.load(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"missing.yaml not found \(the base of .*c.yaml\)"):
        config.load(tmp_path / "c.yaml")
    with pytest.raises(FileNotFoundError, match=rf"config {tmp_path} is a folder, not a YAML file$"):
        config.load(tmp_path)  # --config given the configs' folder: it said "not found"


@pytest.mark.parametrize("text, match", [
    ("- train\n", r"a.yaml must be a mapping of config keys, got a list"),
    ("hello\n", r"a.yaml must be a mapping of config keys, got a str"),
    ("base: [b.yaml]\n", r"a.yaml: base must name one file, got \['b.yaml'\]"),
    ("train: 5\n", r"a.yaml: train must be a mapping of its keys \(train.steps, train.batch_size, .*\), got 5"),
    ("base: b.yaml\n", r"config .*b.yaml: unknown config key 'train.stpes' \(did you mean train.steps"),
    ("train:\n  steps: 5\n  steps: 6\n", r"a.yaml: key 'steps' is written twice \(line 3, column 3\)$"),
    ("train:\n  betas: [0.9,\n", r"config .*a.yaml: while parsing a flow node \(line 3, column 1\): "
                                r"expected the node content, but found '<stream end>' \(line 3, column 1\)$"),
])
def test_malformed_config_files_are_named(tmp_path, text, match):
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text("train: {stpes: 5}\n")
    with pytest.raises(ValueError, match=match):  # all ValueErrors: train.py says them in one line
        config.load(tmp_path / "a.yaml")


def test_a_section_with_its_keys_commented_out_is_empty(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  steps: 5\nema:\n  # decay: 0.9\n")
    assert config.load(tmp_path / "a.yaml")["ema"] == config.DEFAULTS["ema"]


def test_a_model_unet_on_top_of_its_base_replaces_it_and_says_so(tmp_path, caplog):
    (tmp_path / "a.yaml").write_text(f"base: {config.DEFAULT_CONFIG}\nmodel:\n  unet:\n    sample_size: 16\n")
    with caplog.at_level("WARNING", logger="trainer.config"):
        assert config.load(tmp_path / "a.yaml")["model"]["unet"] == {"sample_size": 16}
    assert "model.unet replaces the base config's whole, so its attention_head_dim, block_out_channels" in caplog.text


@pytest.mark.parametrize("value", ["inductr", '"true"'])
def test_a_misspelt_compile_backend_is_a_config_error(cfg_file, value):
    with pytest.raises(ValueError, match=r"model.compile='(inductr|true)' is not a torch.compile backend"):
        config.load(cfg_file, [f"model.compile={value}"])


@pytest.mark.parametrize("override", ["checkpoint.every=0", "train.log_every=-1", "train.steps=2.5",
                                      "train.batch_size=true"])
def test_bad_integer_names_key_and_value(cfg_file, override):
    key, value = override.split("=")
    with pytest.raises(ValueError, match=rf"{key} must be an integer >= \d, got {value.replace('true', 'True')}"):
        config.load(cfg_file, [override])


@pytest.mark.parametrize("override, match", [
    ("resume=maybe", "resume must be true or false, got 'maybe'"),
    ("model.compile=1", "model.compile must be true or false or a torch.compile backend, got 1"),
    ("train.lr=abc", r"train.lr must be a number in \[0, inf\), got 'abc'"),
    ("ema.decay=true", r"ema.decay must be a number in \[0, 1\], got True"),
    ("ema.decay=1.5", r"ema.decay must be a number in \[0, 1\], got 1.5"),
    ("train.grad_clip=null", r"train.grad_clip must be a number in \(0, inf\], got None"),
    ("train.grad_clip=-1", r"train.grad_clip must be a number in \(0, inf\], got -1"),
    ("train.weight_decay=-0.1", r"train.weight_decay must be a number in \[0, inf\)"),
    ("diffusion.caption_dropout=2", r"diffusion.caption_dropout must be a number in \[0, 1\]"),
    ("diffusion.min_snr_gamma=0", r"diffusion.min_snr_gamma must be a number in \(0, inf\)"),
    ("sample.guidance=.nan", r"sample.guidance must be a number in \[0, inf\), got nan"),
    ("train.betas=[0.9,1.0]", r"train.betas must be a number in \[0, 1\), got 1.0"),
    ("train.betas=0.9", r"train.betas must be a list of two numbers in \[0, 1\), got 0.9"),
    ("data.resolution=0", r"data.resolution=0; expected an integer >= 1"),
    ("data.random_flip=maybe", r"data.random_flip='maybe'; expected true or false"),
    ("sample.prompts=[]", r"sample.prompts must be a non-empty list of strings, got \[\]"),
    ("sample.prompts=a cat", r"sample.prompts must be a non-empty list of strings, got 'a cat'"),
    ("sample.prompts=[a, 2]", r"sample.prompts must be a non-empty list of strings, got \['a', 2\]"),
    ("sample.steps=1001", r"sample.steps: number of sampling steps must be an int in \[1, 500\], got 1001"),
    # sampling would start at t=1000, past the schedule (IndexError at the run's last sample grid)
    ("sample.steps=1000", r"sample.steps: .*\[1, 500\], got 1000: with SD2's leading spacing"),
    ("sample.steps=501", r"sample.steps: .*got 501: .* start at t=501, not at pure noise \(t=999\)"),
])
def test_switches_and_numbers_name_key_and_value(cfg_file, override, match):
    with pytest.raises(ValueError, match=match):
        config.load(cfg_file, [override])
    assert config.load(cfg_file, ["train.lr=1", "resume=false"])["train"]["lr"] == 1  # an integer is a number
    assert config.load(cfg_file, ["sample.steps=500"])["sample"]["steps"] == 500
    assert config.load(cfg_file, ["train.grad_clip=.inf", "diffusion.min_snr_gamma=5"])["train"]["grad_clip"] == math.inf
    # Every number key has its interval.
    assert {k for k in config.VALID_KEYS if type(config.get(config.DEFAULTS, k)) is float} <= set(config.NUMBER_RANGES)
    assert config.load(cfg_file, ["model.compile=aot_eager"])["model"]["compile"] == "aot_eager"


def _save(out_dir, step, value, keep=2):
    checkpoint.begin(out_dir, step)
    checkpoint.save_rank_rng(out_dir, step, rank=0)
    sd = {"w": torch.full((3,), float(value))}
    return checkpoint.commit(
        out_dir, step, unet=sd, ema=sd, optimizer={"lr": value, "ema": {"steps": step}}, state={"step": step},
        config=config.DEFAULTS, keep=keep
    )


def test_checkpoint_round_trip_and_latest(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    torch.manual_seed(3)
    path = _save(tmp_path, 10, 1.0)
    expected_next = torch.rand(2)
    assert checkpoint.latest(tmp_path) == path == checkpoint.resolve(tmp_path)
    ckpt = checkpoint.load(path)
    assert torch.equal(ckpt["unet"]["w"], torch.ones(3)) and ckpt["state"] == {"step": 10}
    assert ckpt["optimizer"]["lr"] == 1.0 and ckpt["config"]["seed"] == config.DEFAULTS["seed"]
    mode = os.umask(0o022)
    os.umask(mode)
    for name in ("unet.safetensors", "ema.safetensors", "state.json"):  # safetensors wrote 0600
        assert (path / name).stat().st_mode & 0o777 == 0o666 & ~mode, name
    checkpoint.set_rng_state(ckpt["rng"])
    assert torch.equal(torch.rand(2), expected_next)


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path):
    good = _save(tmp_path, 10, 1.0)
    checkpoint.begin(tmp_path, 20)  # a run killed here, after starting to write step 20
    (checkpoint.tmp_path(tmp_path, 20) / "unet.safetensors").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path) == good
    assert checkpoint.load(checkpoint.latest(tmp_path))["state"]["step"] == 10
    assert _save(tmp_path, 20, 2.0).name == "step_0000020"  # the next save clears the debris


def test_resolve_takes_a_checkpoints_folder_not_a_runs_other_folders(tmp_path):
    path = _save(tmp_path, 10, 1.0)
    assert checkpoint.resolve(tmp_path / "checkpoints") == path == checkpoint.resolve(path)
    (tmp_path / "diffusers" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*diffusers"):
        checkpoint.resolve(tmp_path / "diffusers")


def test_a_latest_pointer_to_a_missing_checkpoint_is_an_error(tmp_path):
    shutil.rmtree(_save(tmp_path, 10, 1.0))
    with pytest.raises(FileNotFoundError, match="latest names 'step_0000010', which is missing or incomplete") as e:
        checkpoint.latest(tmp_path)
    # trainer.sample says it too: resume=false is advice for training only
    assert "(or, to train, start over with resume=false" in str(e.value)


def test_an_earlier_run_set_aside(tmp_path):
    assert checkpoint.set_aside_earlier_run(tmp_path) is None
    _save(tmp_path, 10, 1.0)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("the user's")
    earlier = checkpoint.set_aside_earlier_run(tmp_path)
    assert earlier.parent == tmp_path / "earlier_runs" and {p.name for p in earlier.iterdir()} == {"checkpoints", "metrics.jsonl"}
    assert checkpoint.latest(earlier).name == "step_0000010" and checkpoint.latest(tmp_path) is None
    assert (tmp_path / "notes.txt").read_text() == "the user's"
    _save(tmp_path, 20, 2.0)
    second = checkpoint.set_aside_earlier_run(tmp_path)
    assert second != earlier and checkpoint.latest(second).name == "step_0000020"


def test_keeps_only_the_newest(tmp_path, caplog):
    with caplog.at_level("INFO", logger="trainer.checkpoint"):
        for step in (1, 2, 3):
            _save(tmp_path, step, step, keep=2)
    names = sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).glob("step_*"))
    assert names == ["step_0000002", "step_0000003"]
    assert "step_0000001 (checkpoint.keep=2 keeps the newest)" in caplog.text  # said, not silent


def test_a_run_resumed_from_an_earlier_checkpoint_keeps_its_own(tmp_path):
    # Pruning by name deleted the rewound run's new checkpoints for the abandoned step_8 and left
    # `latest` naming a deleted folder.
    for step in (4, 8):
        _save(tmp_path, step, step, keep=0)
    (checkpoint.checkpoint_dir(tmp_path) / "latest").write_text("step_0000004\n")
    for step in (5, 6):
        _save(tmp_path, step, step, keep=1)
    names = sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).glob("step_*"))
    assert names == ["step_0000006", "step_0000008"] and checkpoint.latest(tmp_path).name == "step_0000006"


def test_checkpoints_without_a_latest_pointer_resume_from_the_newest(tmp_path):
    for step in (10, 20):
        _save(tmp_path, step, step, keep=0)
    (checkpoint.checkpoint_dir(tmp_path) / "latest").unlink()  # copied without it, or a crash before it
    checkpoint.begin(tmp_path, 30)  # incomplete ones do not count
    assert checkpoint.latest(tmp_path).name == "step_0000020"


@pytest.mark.parametrize("content, match", [(b"", "names '', which is missing"),
                                             (b"\xff\xfe\x00", "latest cannot be read")])
def test_a_damaged_latest_pointer_says_so(tmp_path, content, match):
    _save(tmp_path, 10, 1.0)
    (checkpoint.checkpoint_dir(tmp_path) / "latest").write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        checkpoint.latest(tmp_path)


def _flip_byte(file, at=-1):
    """Bit rot: one byte of `file` changed in place, its size the same."""
    data = bytearray(file.read_bytes())
    data[at] ^= 0xFF
    file.write_bytes(bytes(data))


def _truncate(file):
    """A copy or a write cut short."""
    file.write_bytes(file.read_bytes()[:20])


def test_checksums_record_every_file_and_find_damage(tmp_path):
    path = _save(tmp_path, 10, 1.0)
    recorded = json.loads((path / checkpoint.CHECKSUMS).read_text())
    assert sorted(recorded) == ["config.yaml", "ema.safetensors", "optimizer.pt", "rng_rank0.pt", "state.json",
                                "unet.safetensors"]
    assert all(recorded[name]["bytes"] == (path / name).stat().st_size for name in recorded)
    assert checkpoint.verify(path) is True
    # a flipped byte in a tensor's data loads as another weight: only the checksum tells
    _flip_byte(path / "unet.safetensors")
    with pytest.raises(checkpoint.Damaged, match=r"step_0000010/unet.safetensors does not hold the bytes written "
                                                 r"\(its sha256 differs.*: the checkpoint is damaged; take an earlier one"):
        checkpoint.load(path)
    checkpoint.verify(path, ["ema.safetensors", "config.yaml"])  # sampling checks only the files it reads
    path = _save(tmp_path, 20, 2.0)
    _truncate(path / "optimizer.pt")
    with pytest.raises(checkpoint.Damaged, match=r"optimizer.pt holds 20 bytes, not the \d+ written \(truncated"):
        checkpoint.load(path)
    path = _save(tmp_path, 30, 3.0)
    (path / "ema.safetensors").unlink()
    with pytest.raises(checkpoint.Damaged, match=r"step_0000030/ema.safetensors is missing"):
        checkpoint.load(path)
    path = _save(tmp_path, 40, 4.0)
    (path / checkpoint.CHECKSUMS).write_text('{"unet.safetensors": 3}')
    with pytest.raises(checkpoint.Damaged, match="checksums.json holds no valid checksums"):
        checkpoint.load(path)
    _truncate(path / checkpoint.CHECKSUMS)
    with pytest.raises(checkpoint.Damaged, match="checksums.json cannot be read"):
        checkpoint.load(path)


def test_a_checkpoint_without_checksums_loads_unverified(tmp_path, caplog):
    # written before checkpoints recorded checksums
    path = _save(tmp_path, 10, 1.0)
    (path / checkpoint.CHECKSUMS).unlink()
    with caplog.at_level("INFO", logger="trainer.checkpoint"):
        assert checkpoint.load_newest_intact(tmp_path)["state"] == {"step": 10}
    assert f"{path} holds no checksums.json (written before checkpoints recorded checksums): its files load " \
           "unverified" in caplog.text
    # what cannot be read is still named, in one line
    (path / "config.yaml").write_text("a: [\n")
    with pytest.raises(checkpoint.Damaged, match=r"config.yaml cannot be read \(\w+Error: [^\n]*\): the checkpoint is "
                                                 r"damaged; take an earlier one$"):
        checkpoint.load(path)
    path = _save(tmp_path, 20, 2.0)
    (path / checkpoint.CHECKSUMS).unlink()
    (path / "ema.safetensors").unlink()  # the EMA had started (start_step 0): it would restart silently
    with pytest.raises(checkpoint.Damaged, match="ema.safetensors is missing, though that run's EMA had started"):
        checkpoint.load(path)


def test_a_resume_falls_back_past_damaged_checkpoints(tmp_path, caplog):
    steps = [_save(tmp_path, step, step, keep=0) for step in (10, 20, 30, 40)]
    (checkpoint.checkpoint_dir(tmp_path) / "latest").write_text("step_0000030\n")  # a rewound run: 40 is not its past
    _flip_byte(steps[2] / "optimizer.pt", at=-30)
    _truncate(steps[1] / "unet.safetensors")
    with caplog.at_level("INFO", logger="trainer.checkpoint"):
        assert checkpoint.load_newest_intact(tmp_path)["state"] == {"step": 10}
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [f"checkpoint step_0000030 is damaged: {steps[2] / 'optimizer.pt'} does not hold the bytes written "
                    "(its sha256 differs: corrupted on the disk or in a copy; edited on purpose? then delete "
                    f"{steps[2] / 'checksums.json'})",
                    f"checkpoint step_0000020 is damaged: {steps[1] / 'unet.safetensors'} holds 20 bytes, not the "
                    f"{steps[0].joinpath('unet.safetensors').stat().st_size} written (truncated: a copy or a write "
                    "cut short?)",
                    "falling back to step_0000010, the newest intact checkpoint (the damaged ones are left as they are "
                    "until this run writes those steps again)"]
    with caplog.at_level("INFO", logger="trainer.checkpoint"):  # and says so when it does
        _save(tmp_path, 20, 20, keep=0)
    assert f"{steps[1]} replaces the one of that step written before (this run resumed from an earlier step)" \
        in caplog.text
    assert checkpoint.load(steps[1])["state"] == {"step": 20}
    _truncate(steps[1] / "unet.safetensors")
    (checkpoint.checkpoint_dir(tmp_path) / "latest").write_text("step_0000030\n")
    _flip_byte(steps[0] / "state.json", at=2)
    with pytest.raises(ValueError) as e:
        checkpoint.load_newest_intact(tmp_path)
    message = str(e.value)
    assert message.startswith(f"no intact checkpoint to resume from in {checkpoint.checkpoint_dir(tmp_path)}: "
                              f"{steps[2] / 'optimizer.pt'} does not hold")
    assert f"; {steps[1] / 'unet.safetensors'} holds 20 bytes" in message and "\n" not in message
    assert message.endswith(f"; {steps[0] / 'state.json'} does not hold the bytes written (its sha256 differs: "
                            "corrupted on the disk or in a copy; edited on purpose? then delete "
                            f"{steps[0] / 'checksums.json'}). Restore them from a copy, or start over with "
                            "resume=false (which sets them aside)")
    assert checkpoint.load_newest_intact(tmp_path / "elsewhere") is None


def test_a_failed_write_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    good = _save(tmp_path, 10, 1.0)
    (checkpoint.checkpoint_dir(tmp_path) / "step_0000005.tmp").mkdir()  # a crash's debris, of another step

    save = torch.save

    def disk_full(obj, path):
        if Path(path).name == "optimizer.pt":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4280704 vs 4280592")
        save(obj, path)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match=r"writing the checkpoint of step 20 .* failed .*is the disk full\? the one .*latest names is intact"):
        _save(tmp_path, 20, 2.0)
    assert not list(checkpoint.checkpoint_dir(tmp_path).glob("*.tmp"))
    assert checkpoint.latest(tmp_path) == good and checkpoint.load(good)["state"]["step"] == 10


def test_init_weights_of_a_pipeline_folder_and_its_prediction_type(tmp_path):
    weights = tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")  # only found here, not read
    assert checkpoint.init_weights(tmp_path / "pipe" / "unet") == (weights, None)  # a bare UNet folder
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert checkpoint.init_weights(tmp_path / "pipe") == (weights, None)  # no scheduler config
    (tmp_path / "pipe" / "scheduler").mkdir()
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": "v_prediction"}')
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "unet", weights):
        assert checkpoint.init_weights(path) == (weights, "v_prediction")
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text("{}")  # diffusers' default
    assert checkpoint.init_weights(tmp_path / "pipe") == (weights, "epsilon")
