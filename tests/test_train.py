"""The main job, in-process on one CPU rank: resume, bad config, non-finite steps."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.multiprocessing import ProcessRaisedException

import cckernels as ck
from trainer import checkpoint, config, diffusion, train

TINY = ["train.batch_size=2", "data.workers=0", "sample.prompts=[a cat]", "sample.steps=2", "checkpoint.every=2",
        "ema.start_step=1", "train.log_every=1"]


pytestmark = pytest.mark.usefixtures("torch_kernels")


def run(out_dir, *overrides):
    train.main([*TINY, f"out_dir={out_dir}", *overrides])


def test_resumed_run_is_bit_identical_to_an_unbroken_one(tmp_path, capsys):
    run(tmp_path / "a", "train.steps=4")
    run(tmp_path / "b", "train.steps=2")
    run(tmp_path / "b", "train.steps=4")
    assert "resuming from" in capsys.readouterr().out
    a, b = checkpoint.load(checkpoint.latest(tmp_path / "a")), checkpoint.load(checkpoint.latest(tmp_path / "b"))
    assert a["state"] == b["state"] and a["state"]["step"] == 4
    assert all("ema" not in s for s in a["optimizer"]["optimizer"]["state"].values())  # stored once
    for name in ("unet", "ema"):
        assert a[name].keys() == b[name].keys()
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    assert (tmp_path / "b" / "samples" / "step_0000004.png").is_file()
    assert (tmp_path / "b" / "diffusers" / "unet" / "config.json").is_file()
    exported = load_file(tmp_path / "a" / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], a["ema"][k].to(exported[k].dtype)) for k in a["ema"])  # EMA weights exported
    metrics = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(0 <= m["data_wait"] < 1 for m in metrics)
    assert (tmp_path / "b" / "metrics.png").stat().st_size > 0


def test_the_log_lands_in_out_dir_train_log_dated_and_a_resume_appends(tmp_path, capsys):
    run(tmp_path, "train.steps=1")
    first = (tmp_path / "train.log").read_text()
    run(tmp_path, "train.steps=2")
    text = (tmp_path / "train.log").read_text()
    assert text.startswith(first) and len(text) > len(first)  # appended, not rewritten
    lines = text.splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} rank 0 [\w.]+: ", line) for line in lines), lines
    said = [line.split(": ", 1)[1] for line in lines]
    assert sum(x.startswith("starting from scratch") for x in said) == 1
    assert sum(x.startswith("resuming from") for x in said) == 1 and said[-1].startswith("done:")
    assert any(" rank 0 trainer.data: data: " in line for line in lines)  # the modules' records too
    console = capsys.readouterr().out  # short stamps there, above the progress bar
    assert re.search(r"^\d\d:\d\d:\d\d rank 0 trainer.train: resuming from ", console, re.M)


def test_resume_refuses_another_network_and_names_other_changes(tmp_path, capsys):
    # The saved config was never compared: another head count or prediction type trained on.
    run(tmp_path, "train.steps=2")
    for change, said in (("model.unet.attention_head_dim=[2,4]", r"model.unet.attention_head_dim: \[1, 2\] -> \[2, 4\]"),
                         ("diffusion.prediction_type=v_prediction", "diffusion.prediction_type: 'epsilon' -> 'v_prediction'")):
        with pytest.raises(ValueError, match=f"was trained otherwise \\({said}\\): resuming would train another"):
            run(tmp_path, "train.steps=3", change)
    with pytest.raises(ValueError, match=r"is at step 2, past train.steps=1"):
        run(tmp_path, "train.steps=1")
    capsys.readouterr()
    # a torn last metrics line (a crash, a full disk) is closed off, and skipped by the plot
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0')
    run(tmp_path, "train.steps=4", "train.lr=5e-4", "checkpoint.every=1", "sample.steps=1")
    out = capsys.readouterr().out
    assert "resuming with changed settings: train.lr: 0.001 -> 0.0005" in out and "sample.steps" not in out
    assert "loss plot" in out and "not drawn" not in out
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[2] == '{"step": 3, "loss": 1.0' and [json.loads(x)["step"] for x in lines[3:]] == [3, 4]


def test_a_resume_on_another_number_of_ranks_says_so(tmp_path, capsys):
    run(tmp_path, "train.steps=2")
    state = checkpoint.latest(tmp_path) / "state.json"
    assert json.loads(state.read_text())["world"] == 1
    state.write_text(json.dumps({**json.loads(state.read_text()), "world": 2}))  # as a 2-rank run wrote it
    (state.parent / checkpoint.CHECKSUMS).unlink()  # else a state.json changed since is a damaged one
    run(tmp_path, "train.steps=3")
    assert "resuming on 1 ranks; the checkpoint was written on 2: 2 images a step now" in capsys.readouterr().out


def test_bf16_weights_checkpoint_fp32_masters_and_resume_bit_identically(tmp_path, capsys):
    # train.precision=bf16-weights: the UNet holds bf16 weights (CPU autocast), the optimizer
    # fp32 masters. Checkpoints and the export hold the masters; a resumed run repeats an
    # unbroken one bit for bit; the checkpoint resumes under another precision too.
    bf16 = "train.precision=bf16-weights"
    run(tmp_path / "a", "train.steps=4", bf16)
    assert "bf16 weights with fp32 masters" in capsys.readouterr().out
    run(tmp_path / "b", "train.steps=2", bf16)
    run(tmp_path / "b", "train.steps=4", bf16)
    a, b = checkpoint.load(checkpoint.latest(tmp_path / "a")), checkpoint.load(checkpoint.latest(tmp_path / "b"))
    assert all("master" not in s for s in a["optimizer"]["optimizer"]["state"].values())  # unet.safetensors has them
    for name in ("unet", "ema"):
        assert all(v.dtype == torch.float32 for v in a[name].values())
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    # masters, not bf16 weights widened: most values fall between two bf16 numbers
    w = a["unet"]["conv_in.weight"]
    assert (w != w.bfloat16().float()).float().mean() > 0.9
    exported = load_file(tmp_path / "a" / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], a["ema"][k]) for k in a["ema"])  # fp32 EMA, not rounded to bf16
    run(tmp_path / "b", "train.steps=5", "train.precision=fp32")
    assert checkpoint.load(checkpoint.latest(tmp_path / "b"))["state"]["step"] == 5
    run(tmp_path / "b", "train.steps=6", bf16, "train.grad_accum=2")  # and back, accumulating
    assert "grads add up in bf16 over the 2 micro-batches" in capsys.readouterr().out


def _join_two_ranks(rank, port):
    """This spawned process as rank `rank` of a 2-rank run on this machine."""
    import os

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def _spawn_two_ranks(fn, *args):
    """fn(rank, port, *args) in two spawned processes, on a free port."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(fn, args=(port, *args), nprocs=2, start_method="spawn")


def _bf16_weights_rank(rank, port, out_dir):
    """One spawned rank of a 2-rank bf16-weights run; writes the UNet's weights after it."""
    _join_two_ranks(rank, port)
    wrapped, losses = [], []
    ddp, training_loss = train.DistributedDataParallel, train.diffusion.training_loss
    train.DistributedDataParallel = lambda model: wrapped.append(model) or ddp(model)
    train.diffusion.training_loss = lambda *a, **k: losses.append(training_loss(*a, **k)) or losses[-1]
    train.main([*TINY, "train.steps=2", "train.precision=bf16-weights", "sample.steps=1", f"out_dir={out_dir}"])
    torch.save({n: p.detach() for n, p in wrapped[0].named_parameters()}, f"{out_dir}/rank{rank}.pt")
    torch.save(torch.stack(losses).detach().float(), f"{out_dir}/losses{rank}.pt")


def test_bf16_weights_ranks_start_from_the_same_masters(tmp_path):
    # cast_params_ takes the fp32 masters before DDP broadcasts rank 0's weights: a UNet
    # initialized differently on each rank would leave each its own masters, and the first
    # optimizer step would write them back into the bf16 weights (the ranks then diverge).
    _spawn_two_ranks(_bf16_weights_rank, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    masters = checkpoint.load(checkpoint.latest(tmp_path))["unet"]  # rank 0's
    assert all(torch.equal(r1[k], masters[k].to(r1[k].dtype)) for k in r1)
    # The logged loss is the whole batch's: the mean over the ranks (rank 0's alone was logged).
    per_rank = (torch.load(tmp_path / f"losses{r}.pt") for r in (0, 1))
    logged = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
    assert logged == pytest.approx(((next(per_rank) + next(per_rank)) / 2).tolist(), rel=1e-6)


def _stalled_rank(rank, port, out_dir):
    """One rank of a 2-rank run with train.dist_timeout_s=5 whose rank 1 stalls before the first checkpoint."""
    _join_two_ranks(rank, port)
    if rank == 1:
        train.checkpoint.save_rank_rng = lambda *a: time.sleep(60)
    start = time.perf_counter()
    try:
        train.main([*TINY, "train.steps=2", "checkpoint.every=1", "train.dist_timeout_s=5", f"out_dir={out_dir}"])
    except Exception:  # any error: the test asks only when rank 0 gave up
        if rank == 0:
            (Path(out_dir) / "rank0_failed_after_s").write_text(f"{time.perf_counter() - start}")
        raise


def test_a_stalled_rank_fails_the_run_after_train_dist_timeout_s(tmp_path):
    with pytest.raises(ProcessRaisedException):
        _spawn_two_ranks(_stalled_rank, str(tmp_path))
    assert float((tmp_path / "rank0_failed_after_s").read_text()) < 50  # not gloo's 30 minutes, nor the 60 s stall


def _rank_in_its_own_folder(rank, port, root):
    """A rank of a 2-rank run whose relative out_dir resolves to another folder on each rank (two
    nodes without a shared file system)."""
    _join_two_ranks(rank, port)
    Path(root, f"node{rank}").mkdir()
    os.chdir(Path(root, f"node{rank}"))
    try:
        train.main([*TINY, "train.steps=2", "out_dir=runs/x"])
    except OSError as e:
        Path(root, f"rank{rank}_error").write_text(str(e))
        raise


def test_ranks_that_do_not_share_out_dir_fail_at_the_start(tmp_path):
    with pytest.raises(ProcessRaisedException):
        _spawn_two_ranks(_rank_in_its_own_folder, str(tmp_path))
    error = (tmp_path / "rank1_error").read_text()
    assert f"cannot see {tmp_path}/node1/runs/x/.shared_check" in error and "every node shares" in error
    assert not (tmp_path / "node0" / "runs" / "x" / "checkpoints").exists()  # before any step


def _resumed_rank(rank, port, out_dir):
    """A rank of a 2-rank resume; writes the names of the checkpoints it loaded."""
    _join_two_ranks(rank, port)
    loaded, load = [], train.checkpoint.load
    train.checkpoint.load = lambda path, rank=0: loaded.append(Path(path).name) or load(path, rank)
    train.main([*TINY, "train.steps=2", "checkpoint.every=1", "sample.steps=1", f"out_dir={out_dir}"])
    Path(out_dir, f"rank{rank}_loaded").write_text(" ".join(loaded))


def test_ranks_resume_from_the_checkpoint_rank_0_falls_back_to(tmp_path):
    # Each rank picking its own, one that saw a file damaged where rank 0 did not (another
    # node's view of a network file system) would resume from another step.
    run(tmp_path, "train.steps=2", "checkpoint.every=1")
    (checkpoint.latest(tmp_path) / "optimizer.pt").write_bytes(b"")
    _spawn_two_ranks(_resumed_rank, str(tmp_path))
    assert (tmp_path / "rank0_loaded").read_text() == "step_0000002 step_0000001"  # damaged, then the one before
    assert (tmp_path / "rank1_loaded").read_text() == "step_0000001"  # the one rank 0 picked, checked again


def test_restarts_without_their_own_store_are_warned_about(monkeypatch):
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert not train._restarts_may_fail()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert train._restarts_may_fail()
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    assert not train._restarts_may_fail()


@pytest.mark.gpu
@pytest.mark.timeout(180)  # three tiny runs with sampling (run_gpu.sh gives other tests 60 s)
def test_bf16_weights_on_gpu_with_the_default_kernels(tmp_path, monkeypatch, capsys):
    # The whole bf16-weights path on CUDA with the best backends (the CUDA GroupNorm reading
    # the fp32 GroupNorm parameters, the fused optimizer's bf16 + fp32 buckets): deterministic,
    # so 1 + 1 resumed steps repeat 2 unbroken ones bit for bit.
    monkeypatch.delenv("CCKERNELS_BACKEND")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # train.py's value, restored afterwards
    common = ("train.precision=bf16-weights", "train.deterministic=true", "model.channels_last=true")
    try:  # deterministic=true turns on deterministic algorithms for the process: off for later tests
        run(tmp_path / "a", "train.steps=2", *common)
        out = capsys.readouterr().out
        assert "bf16 weights with fp32 masters" in out and "device cuda" in out
        run(tmp_path / "b", "train.steps=1", *common)
        run(tmp_path / "b", "train.steps=2", *common)
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = (checkpoint.load(checkpoint.latest(tmp_path / n)) for n in "ab")
    for name in ("unet", "ema"):
        assert all(v.dtype == torch.float32 for v in a[name].values())
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


def test_every_checkpoint_loads_into_diffusers(tmp_path):
    """Each step folder's unet/ is a diffusers UNet: the EMA weights once there are any."""
    diffusers = pytest.importorskip("diffusers")
    run(tmp_path, "train.steps=4", "ema.start_step=3")  # step 2: no EMA yet (the raw weights), step 4: EMA
    for step, weights in ((2, "unet"), (4, "ema")):
        folder = checkpoint.checkpoint_dir(tmp_path) / checkpoint.step_name(step)
        expected = load_file(folder / f"{weights}.safetensors")
        ref = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
        got = ref.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got), step


def test_exported_unets_default_to_the_training_resolution(tmp_path, capsys):
    # sd2-base.yaml trains SD2's UNet config (sample_size 64: 512 px) at 256 px: its exports
    # made diffusers pipelines sample at 512 by default, trainer.sample on the run at 256.
    run(tmp_path, "train.steps=2", "data.resolution=32")  # the tiny UNet's sample_size is 8 (64 px)
    out = capsys.readouterr().out
    assert "sample_size 8 written as 4" in out and "with the EMA weights" in out
    run(tmp_path / "b", "train.steps=1", "ema.start_step=5")
    assert "with the trained (the EMA starts at step 5) weights" in capsys.readouterr().out
    for folder in (tmp_path / "diffusers" / "unet", checkpoint.checkpoint_dir(tmp_path) / checkpoint.step_name(2) / "unet"):
        assert json.loads((folder / "config.json").read_text())["sample_size"] == 4


def test_resume_on_a_rank_without_saved_rng_state(tmp_path, capsys):
    run(tmp_path, "train.steps=2")
    (checkpoint.latest(tmp_path) / "rng_rank0.pt").unlink()  # as for a rank added since: no file, no checksum
    sums = checkpoint.latest(tmp_path) / checkpoint.CHECKSUMS
    sums.write_text(json.dumps({k: v for k, v in json.loads(sums.read_text()).items() if k != "rng_rank0.pt"}))
    run(tmp_path, "train.steps=3")
    out = capsys.readouterr().out
    assert "holds no RNG state for this rank" in out and "resuming from" in out
    assert checkpoint.load(checkpoint.latest(tmp_path))["state"]["step"] == 3


def test_deterministic_turns_on_deterministic_algorithms(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # train.py's value, restored afterwards
    try:
        run(tmp_path, "train.steps=1", "train.deterministic=true")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_kernel_fallbacks_are_logged(tmp_path, monkeypatch, caplog):
    from cckernels import backend

    monkeypatch.setenv("CCKERNELS_BACKEND", "cuda")  # not usable on a CPU: falls back, says why
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # to torch, not the slow interpreter
    monkeypatch.setattr(backend, "_reported", set())
    run(tmp_path, "train.steps=1")
    assert any(r.name == "cckernels" and "backend cuda skipped" in r.getMessage() for r in caplog.records)


def test_resume_false_starts_over(tmp_path, capsys):
    # The earlier run goes further: its checkpoints, left beside the new run's, would outrank
    # them (resume, sample) and be kept where the new run's were pruned. They are set aside.
    run(tmp_path, "train.steps=4")
    run(tmp_path, "train.steps=2", "resume=false")
    log = capsys.readouterr().out.split("done:")[1]
    assert "starting from scratch" in log and f"resume=false: the earlier run's files in {tmp_path} moved to" in log
    assert checkpoint.load(checkpoint.latest(tmp_path))["state"]["step"] == 2
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]
    (earlier,) = (tmp_path / "earlier_runs").iterdir()
    assert checkpoint.load(checkpoint.latest(earlier))["state"]["step"] == 4
    assert {p.name for p in earlier.iterdir()} == {"checkpoints", "samples", "diffusers", "metrics.jsonl", "metrics.png"}
    # torchrun's restart of a run started with resume=false resumes it, not starting over again
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        run(tmp_path, "train.steps=3", "resume=false")
    assert "resuming from" in capsys.readouterr().out
    assert len(list((tmp_path / "earlier_runs").iterdir())) == 1


def test_unreadable_images_are_counted_in_the_log(tmp_path, caplog):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 90, 30)).save(folder / f"{i}.jpg")
        (folder / f"{i}.txt").write_text("a red square")
    (folder / "broken.jpg").write_bytes(b"not a JPEG")
    run(tmp_path / "out", "train.steps=1", f"data.path={folder}")
    assert any(r.name == "trainer.data" and "4 images" in r.getMessage() and "1 unreadable skipped (listed in" in r.getMessage()
               for r in caplog.records)
    assert (tmp_path / "out" / "skipped_files.txt").read_text().startswith("broken.jpg\t")


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'train.stepz'.*valid keys:"):
        run(tmp_path, "train.stepz=3")


def test_the_command_says_a_mistake_in_one_line_and_exits_with_2(tmp_path, capsys):
    for override, message in [("train.stepz=3", "unknown config key 'train.stepz' (did you mean train.steps"),
                              ("data.path=/no/such/folder", "data.path '/no/such/folder' does not exist")]:
        with pytest.raises(SystemExit) as exit:
            train.cli([*TINY, f"out_dir={tmp_path}", override])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith(f"train.py: error: {message}") and err.count("\n") == 1, err


def test_resume_false_with_a_missing_data_path_sets_nothing_aside_and_the_log_says_why(tmp_path, capsys):
    run(tmp_path, "train.steps=1")
    with pytest.raises(SystemExit) as exit:
        train.cli([*TINY, f"out_dir={tmp_path}", "resume=false", "data.path=/no/such/folder"])
    assert exit.value.code == 2
    assert checkpoint.latest(tmp_path) is not None and not (tmp_path / "earlier_runs").exists()  # not moved aside
    last = (tmp_path / "train.log").read_text().splitlines()[-1]
    assert last.endswith("trainer.train: stopped: train.py: error: data.path '/no/such/folder' does not exist"), last


def test_the_log_says_why_a_run_stopped(tmp_path, monkeypatch, capsys):
    def stop_at_the_first_step(exc):
        def step(*args, **kwargs):
            raise exc
        monkeypatch.setattr(diffusion, "training_loss", step)

    stop_at_the_first_step(KeyboardInterrupt())
    with pytest.raises(SystemExit) as exit:
        train.cli([*TINY, f"out_dir={tmp_path}", "train.steps=1"])
    assert exit.value.code == 130 and capsys.readouterr().err.endswith("\ninterrupted: " + train.INTERRUPTED + "\n")
    log = (tmp_path / "train.log").read_text()
    assert log.splitlines()[-1].endswith("stopped: interrupted (Ctrl-C); " + train.INTERRUPTED)
    stop_at_the_first_step(KeyError("step"))  # a bug: its traceback in the log as on the console
    with pytest.raises(KeyError):
        train.cli([*TINY, f"out_dir={tmp_path}", "train.steps=1"])
    log = (tmp_path / "train.log").read_text()
    assert "stopped by a bug: KeyError: 'step'\nTraceback (most recent call last):" in log and log.endswith("KeyError: 'step'\n")


def test_a_peer_gone_after_a_ctrl_c_is_said_as_the_ctrl_c(monkeypatch, capsys):
    # Under torchrun every rank gets the Ctrl-C; a rank waiting in a collective for a peer that
    # stopped first fails with the peer's "Connection closed" (a RuntimeError): one line, 130.
    def interrupted_in_a_collective(argv):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs here, in the main thread
        except KeyboardInterrupt:
            pass  # as C++ code that swallowed it
        raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer")

    monkeypatch.setattr(train, "main", interrupted_in_a_collective)
    with pytest.raises(SystemExit) as exit:
        train.cli([])
    err = capsys.readouterr().err
    assert exit.value.code == 130 and err.strip().startswith("interrupted: ") and "Traceback" not in err, err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_the_command_keeps_a_bugs_traceback(monkeypatch):
    def bug(argv):
        raise KeyError("step")

    monkeypatch.setattr(train, "main", bug)
    with pytest.raises(KeyError):
        train.cli([])


def _command(tmp_path, *launcher):
    """trainer/train.py with a misspelt key, as a user runs it (launcher: torchrun's, or none)."""
    script = Path(train.__file__)
    return subprocess.run([sys.executable, *launcher, str(script), "train.stepz=3", f"out_dir={tmp_path}"],
                          cwd=script.parent.parent, capture_output=True, text=True, timeout=300)


def test_a_misspelt_key_is_one_line_without_a_traceback(tmp_path):
    done = _command(tmp_path)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-3000:]
    assert done.stderr.startswith("train.py: error: unknown config key 'train.stepz'") and "valid keys: " in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_a_misspelt_key_under_torchrun_is_said_once(tmp_path):
    done = _command(tmp_path, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    output = done.stdout + done.stderr
    assert done.returncode != 0 and output.count("unknown config key 'train.stepz'") == 1, output[-3000:]
    # the one traceback left is torchrun's own, ending in its summary: rank 0 exited with 2
    assert 'train.py", line' not in output and "exitcode  : 2" in output, output[-3000:]


def _poison_losses(monkeypatch, bad_calls):
    """Make the training loss NaN on the given (0-based) calls."""
    real, calls = diffusion.training_loss, iter(range(10**6))

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        return value * float("nan") if next(calls) in bad_calls else value

    monkeypatch.setattr(diffusion, "training_loss", loss)


def test_a_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch, capsys):
    _poison_losses(monkeypatch, {1})
    run(tmp_path, "train.steps=3")
    assert "step 2: non-finite gradients (loss nan)" in capsys.readouterr().out  # numbered as metrics and checkpoints
    metrics = [json.loads(line, parse_constant=lambda c: 1 / 0) for line in open(tmp_path / "metrics.jsonl")]  # strict JSON
    assert [m["skipped"] for m in metrics] == [False, True, False] and metrics[1]["loss"] is None
    assert all(torch.isfinite(v).all() for v in checkpoint.load(checkpoint.latest(tmp_path))["unet"].values())


def test_a_diverged_run_says_so_in_its_samples_and_export(tmp_path, monkeypatch, capsys):
    # Weights gone to inf with finite gradients (lr=1e30): the run finished with black samples and
    # an unusable export, in silence.
    real = ck.FusedAdamWEMA.step

    def diverge(self, *args, **kwargs):
        real(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))

    monkeypatch.setattr(ck.FusedAdamWEMA, "step", diverge)
    run(tmp_path, "train.steps=2")
    out = capsys.readouterr().out
    assert "(warning: they hold NaN or inf, drawn black: the weights diverged)" in out
    assert "of the final UNet's tensors hold NaN or inf (conv_in.weight" in out


def test_a_metrics_record_holds_the_mean_loss_of_its_steps(tmp_path, monkeypatch):
    # It held the loss of its last step alone: one noisy sample of log_every.
    real, values = diffusion.training_loss, iter([1.0, None, 3.0, 5.0])  # None: NaN, gradients too

    def loss(*args, **kwargs):
        value, loss = next(values), real(*args, **kwargs)
        return loss * float("nan") if value is None else loss * 0 + value

    monkeypatch.setattr(diffusion, "training_loss", loss)
    run(tmp_path, "train.steps=4", "train.log_every=2")
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["steps"], r["loss"], r["skipped"]) for r in records] == [(2, 2, 1.0, 1), (4, 2, 4.0, 0)]
    assert all(abs(r["time"] - time.time()) < 600 for r in records)


def test_a_records_images_per_s_is_its_own_steps_rate(tmp_path, monkeypatch):
    # It was the mean since the process started: a slow start (compiling, CUDA graphs) weighed
    # on every later record. train.py's clock here advances only in the loss: 10 s in each of the
    # first two steps, 1 s in the next two, so the rates do not depend on the machine's load
    # (real sleeps failed under load, when a step itself took longer than the sleep).
    real, calls, now = diffusion.training_loss, [], [0.0]

    def slow_start(*args, **kwargs):
        calls.append(1)
        now[0] += 10.0 if len(calls) <= 2 else 1.0
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusion, "training_loss", slow_start)
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: now[0], time=time.time))
    run(tmp_path, "train.steps=4", "train.log_every=2")
    first, second = (json.loads(line)["images_per_s"] for line in open(tmp_path / "metrics.jsonl"))
    assert second == pytest.approx(10 * first)  # the mean since the start would be 20 / 11 of first


def test_many_non_finite_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
    _poison_losses(monkeypatch, set(range(1, 100)))
    with pytest.raises(RuntimeError, match="3 consecutive steps with non-finite"):
        run(tmp_path, "train.steps=10", "train.max_bad_steps=3")


def test_compiled_unet_trains_as_the_eager_one(tmp_path, capsys):
    # model.compile takes a torch.compile backend (aot_eager: fast, no C++ compiler); the
    # kernels are traced into its graph, the loss follows the eager run's.
    run(tmp_path / "eager", "train.steps=2")
    run(tmp_path / "compiled", "train.steps=2", "model.compile=aot_eager")
    out = capsys.readouterr().out
    assert "the UNet under torch.compile (backend=aot_eager; the first step compiles)" in out
    assert "(under torch.compile: the calls traced" in out
    eager, compiled = ([json.loads(line)["loss"] for line in open(tmp_path / name / "metrics.jsonl")]
                       for name in ("eager", "compiled"))
    assert len(compiled) == 2
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_cuda_graphs_need_a_gpu_one_micro_batch_and_an_eager_unet(tmp_path):
    with pytest.raises(ValueError, match="train.cuda_graphs=true needs a CUDA device"):
        run(tmp_path, "train.cuda_graphs=true")
    cfg = config.load(None, ["train.cuda_graphs=true", "train.grad_accum=2", "model.compile=true"])
    with pytest.raises(ValueError, match="needs train.grad_accum=1 and model.compile=false"):
        train._check_cuda_graphs(cfg, torch.device("cuda"))
    train._check_cuda_graphs(config.load(None, ["train.cuda_graphs=true"]), torch.device("cuda"))


def graphed_and_eager_unets(device):
    from tiny_models import TINY_UNET
    from trainer.graphs import graph_on_first_call
    from trainer.unet import UNet

    torch.manual_seed(0)
    eager = UNet.from_config(TINY_UNET).to(device)
    graphed = graph_on_first_call(UNet.from_config(TINY_UNET).to(device))
    graphed.load_state_dict(eager.state_dict())
    x, t, ctx = torch.randn(2, 4, 8, 8, device=device), torch.tensor([3, 700], device=device), torch.randn(2, 77, 32, device=device)
    return graphed, eager, (x, t, ctx)


def test_a_graphed_unet_runs_eagerly_where_it_does_not_train():
    # Sampling calls it under no_grad (and in training mode): no capture, the eager forward.
    graphed, eager, args = graphed_and_eager_unets("cpu")
    with torch.no_grad():
        torch.testing.assert_close(graphed(*args), eager(*args), rtol=0, atol=0)
    graphed.eval()
    torch.testing.assert_close(graphed(*args), eager(*args), rtol=0, atol=0)


def test_captures_ignore_other_threads_on_older_torch_too(monkeypatch):
    # Newer torch takes capture_error_mode; older (the GPU image's 2.11) gets torch.cuda.graph
    # swapped for the call, and back afterwards.
    import inspect

    from trainer import graphs

    default = torch.cuda.graph
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
        with graphs._thread_local_capture() as mode:
            assert mode == {"capture_error_mode": "thread_local"} and torch.cuda.graph is default
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda callables, sample_args: None)
    with pytest.raises(RuntimeError), graphs._thread_local_capture() as mode:
        assert mode == {} and torch.cuda.graph is not default and issubclass(torch.cuda.graph, default)
        raise RuntimeError("a failed capture")
    assert torch.cuda.graph is default


def test_the_capture_and_its_warm_up_choose_kernels_by_gpu_time(monkeypatch):
    # make_graphed_callables warms up, then captures: both under ck.prefer_gpu_time().
    from cckernels import backend

    preferred = []

    def fake_make_graphed_callables(module, samples, **kwargs):
        preferred.append(backend._prefer_gpu_time.get())
        module.forward = type(module).forward.__get__(module)

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make_graphed_callables)
    graphed, eager, args = graphed_and_eager_unets("cpu")
    graphed(*args)
    assert preferred == [True] and not backend._prefer_gpu_time.get()


@pytest.mark.gpu
def test_a_graphed_unet_replays_forward_and_backward(monkeypatch):
    from cckernels import backend

    monkeypatch.delenv("CCKERNELS_BACKEND")  # our kernels, captured
    graphed, eager, (x, t, ctx) = graphed_and_eager_unets("cuda")
    for m in (graphed, eager):  # channels_last: what the CUDA GroupNorm takes
        m.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    calls = []  # GroupNorm's backends in the graphed UNet's capture, then in the eager UNet's step
    for step in range(3):  # the first call captures; then replays, with new inputs each time
        x, ctx = torch.randn_like(x), torch.randn_like(ctx)
        outs = []
        for m in (graphed, eager):
            backend.reset_calls()
            with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
                outs.append(m(x, t, ctx).float())
            calls.append(set(ck.backend_calls().get("group_norm", ())))
        for out in outs:
            out.square().mean().backward()
        torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
        for p, q in zip(graphed.parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=1e-3)
            p.grad = q.grad = None
    # the capture chose by GPU time (Triton), the eager step by host time (CUDA, when built);
    # a replay dispatches nothing
    assert calls[0] == {"triton"} and calls[2] == calls[4] == set()
    assert ("cuda" in calls[1]) == ("cuda" in ck.available_backends("cuda")["group_norm"])
    with pytest.raises(ValueError, match="captured for inputs"):
        graphed(x[:1], t[:1], ctx[:1])


@pytest.mark.gpu
@pytest.mark.timeout(180)  # two tiny runs with sampling
@pytest.mark.parametrize("channels_last", [False, True])  # True: as configs/sd2-base.yaml trains
def test_cuda_graphs_train_as_the_eager_unet(tmp_path, monkeypatch, capsys, channels_last):
    # Our kernels inside the captured forward and backward; the sampling at the end runs the
    # UNet under no_grad, eagerly, after the capture.
    monkeypatch.delenv("CCKERNELS_BACKEND")
    for name in ("eager", "graphs"):
        run(tmp_path / name, "train.steps=3", f"train.cuda_graphs={name == 'graphs'}", f"model.channels_last={channels_last}")
        assert ("as CUDA graphs" in capsys.readouterr().out) == (name == "graphs")
    eager, graphed = ([json.loads(line)["loss"] for line in open(tmp_path / name / "metrics.jsonl")]
                      for name in ("eager", "graphs"))
    assert len(graphed) == 3
    torch.testing.assert_close(graphed, eager, rtol=1e-3, atol=1e-5)
    assert (tmp_path / "graphs" / "samples").is_dir()


def test_compile_mode_needs_inductor_and_cuda_graphs_one_process_without_accumulation():
    def args(compile, mode, world=1, accum=1):
        return train._compile_args({"compile": compile, "compile_mode": mode}, world, accum)

    assert args(False, "default") is None
    assert args("aot_eager", "default") == {"backend": "aot_eager"}
    assert args(True, "reduce-overhead") == {"backend": "inductor", "mode": "reduce-overhead"}
    assert args(True, "max-autotune-no-cudagraphs", world=8, accum=4)["mode"] == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="needs model.compile=true"):
        args("aot_eager", "reduce-overhead")
    with pytest.raises(ValueError, match="world size 2"):
        args(True, "reduce-overhead", world=2)
    with pytest.raises(ValueError, match="grad_accum=4"):
        args("inductor", "max-autotune", accum=4)
    with pytest.raises(ValueError, match="model.compile_mode must be one of"):
        config.load(None, ["model.compile_mode=fast"])


def test_a_new_run_starts_from_another_runs_weights(tmp_path, capsys):
    # model.init_from: the 512 px phase after a 256 px run. lr=0 keeps the weights as loaded.
    run(tmp_path / "a", "train.steps=2", "ema.start_step=0")
    a = checkpoint.load(checkpoint.latest(tmp_path / "a"))
    assert not all(torch.equal(a["unet"][k], a["ema"][k]) for k in a["unet"])
    sources = ((tmp_path / "a", a["unet"]),  # a run: its trained weights
               (a["path"], a["unet"]),  # one of its checkpoints: the same
               (tmp_path / "a" / "diffusers" / "unet", a["ema"]),  # a diffusers folder: what it holds
               (tmp_path / "a" / "diffusers", a["ema"]))  # the run's diffusers/ (not the run beside it)
    for i, (source, expected) in enumerate(sources):
        out = tmp_path / f"b{i}"
        objective = "v_prediction" if i == 0 else "epsilon"  # the first one switches: said, not refused
        run(out, "train.steps=1", "train.lr=0", "train.weight_decay=0", "data.resolution=32",
            f"model.init_from={source}", f"diffusion.prediction_type={objective}")
        log = capsys.readouterr().out
        assert "UNet weights from" in log
        assert ("trained to predict epsilon, this run trains them to predict v_prediction" in log) == (i == 0)
        assert "another UNet config" not in log  # sample_size (32 px here, 64 there) is no difference
        got = checkpoint.load(checkpoint.latest(out))["unet"]
        assert all(torch.equal(got[k], expected[k]) for k in expected), source
    # Resuming, the run's own checkpoint wins.
    run(out, "train.steps=2", f"model.init_from={tmp_path / 'a'}")
    assert "ignored: resuming" in capsys.readouterr().out


def test_init_from_a_path_without_weights_or_another_architecture_says_so(tmp_path, capsys):
    with pytest.raises(ValueError, match="neither one of our checkpoints"):
        run(tmp_path / "b", "train.steps=1", f"model.init_from={tmp_path}")
    run(tmp_path / "a", "train.steps=2")
    with pytest.raises(ValueError, match=r"does not fit model.unet: .*wrong shape"):
        run(tmp_path / "c", "train.steps=1", f"model.init_from={tmp_path / 'a'}",
            "model.unet.block_out_channels=[32,48]")
    # the same shapes, another network: said (a run's config, or a diffusers folder's config.json)
    for source in (tmp_path / "a", tmp_path / "a" / "diffusers"):
        run(tmp_path / "e", "train.steps=1", "resume=false", f"model.init_from={source}",
            "model.unet.attention_head_dim=[2,4]", "model.unet.norm_num_groups=4")
        (line,) = [x for x in capsys.readouterr().out.splitlines() if "trained with another UNet config" in x]
        assert "attention_head_dim [1, 2] there, [2, 4] here" in line and "norm_num_groups 8 there, 4 here" in line
    shutil.rmtree(checkpoint.latest(tmp_path / "a"))  # ours, damaged: said so, not "neither"
    with pytest.raises(FileNotFoundError, match="latest names 'step_0000002', which is missing"):
        run(tmp_path / "d", "train.steps=1", f"model.init_from={tmp_path / 'a'}")


def test_encoders_that_do_not_fit_the_unet_say_so(tmp_path):
    with pytest.raises(ValueError, match=r"gives 48-wide embeddings but model.unet's cross_attention_dim is 32"):
        run(tmp_path / "a", "train.steps=1", "model.text_encoder.config={vocab_size: 259, hidden_size: 48, "
            "intermediate_size: 64, num_attention_heads: 2, num_hidden_layers: 1}")
    with pytest.raises(ValueError, match=r"gives 4-channel latents but model.unet's in_channels is 8"):
        run(tmp_path / "b", "train.steps=1", "model.unet.in_channels=8")
    with pytest.raises(ValueError, match=r"data.resolution 100 is not a multiple of the VAE's downsampling factor 8"):
        run(tmp_path / "c", "train.steps=1", "data.resolution=100")


@pytest.mark.parametrize("kind", ["clip", "open_clip"])
def test_a_run_with_a_vae_folder_and_a_clip_text_encoder_ends_as_a_diffusers_pipeline(tmp_path, capsys, kind):
    diffusers = pytest.importorskip("diffusers")
    from tiny_models import TINY_OPEN_CLIP, save_tiny_clip
    from trainer import encoders

    encoders.load_vae(encoders.encoder_config("tiny")["vae"]).save_pretrained(tmp_path / "vae")
    if kind == "clip":
        save_tiny_clip(tmp_path / "clip", num_layers=2)
        text = {"path": str(tmp_path / "clip"), "clip_skip": 1}  # the pipeline's text model ends a block early
    else:  # 3 blocks, the penultimate read (SD2's): converted as diffusers stores SD2's text encoder
        pytest.importorskip("open_clip")
        text = TINY_OPEN_CLIP
    run(tmp_path / "run", "train.steps=2", f"model.vae={{path: {tmp_path / 'vae'}}}",
        f"model.text_encoder={json.dumps(text)}")
    assert "diffusers pipeline (StableDiffusionPipeline.from_pretrained)" in capsys.readouterr().out
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "diffusers")
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.tokenizer.model_max_length == 77
    prompts = ["a cat", ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, encoders.load_text_encoder(text).encode(prompts))
    assert pipe.text_encoder.config.num_hidden_layers == (1 if kind == "clip" else 2)
    # SD2's layout, which transformers 4 loads too: prefixed weights, the slow tokenizer's files
    exported = tmp_path / "run" / "diffusers"
    assert all(k.startswith("text_model.") for k in load_file(exported / "text_encoder" / "model.safetensors"))
    slow = tmp_path / "slow-tokenizer"
    slow.mkdir()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        if (exported / "tokenizer" / name).exists():
            shutil.copy(exported / "tokenizer" / name, slow / name)
    assert "local_files_only" not in json.loads((slow / "tokenizer_config.json").read_text())
    from transformers import CLIPTokenizer
    slow_ids = CLIPTokenizer.from_pretrained(slow)(prompts, padding="max_length", max_length=77, truncation=True,
                                                   return_tensors="pt").input_ids
    assert torch.equal(slow_ids, ids)
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    ema = load_file(tmp_path / "run" / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in pipe.unet.state_dict().items())
    from trainer.sample import load_checkpoint  # and trainer.sample reads it back
    assert load_checkpoint(tmp_path / "run" / "diffusers")[3]["data"]["resolution"] == 64
    # The default run's byte tokenizer has no transformers form: the UNet only, and why.
    run(tmp_path / "tiny", "train.steps=1")
    assert "no whole pipeline: the text encoder's tokenizer is the byte tokenizer" in capsys.readouterr().out
    assert not (tmp_path / "tiny" / "diffusers" / "model_index.json").exists()
    with pytest.raises(ValueError, match="holds a diffusers UNet without the rest of a pipeline"):
        load_checkpoint(tmp_path / "tiny" / "diffusers")


def test_the_export_is_written_before_the_last_sample_grid(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(train, "sample_images", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(tmp_path, "train.steps=2")
    assert (tmp_path / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert checkpoint.load(checkpoint.latest(tmp_path))["state"]["step"] == 2


def test_overrides_may_come_before_the_config_file(tmp_path):
    args = train.parse_args(["train.steps=3", "--config", "configs/tiny.yaml", "seed=1"])
    assert args.config == "configs/tiny.yaml" and args.overrides == ["train.steps=3", "seed=1"]


def test_a_second_run_in_the_same_out_dir_is_refused(tmp_path, capsys):
    with checkpoint.run_lock(tmp_path):  # as a run in another process holds it
        with pytest.raises(BlockingIOError, match=rf"another run \(pid {os.getpid()} on .*\) is writing to {tmp_path}"):
            run(tmp_path, "train.steps=1")
    assert not (tmp_path / "checkpoints").exists()
    run(tmp_path, "train.steps=1")  # released when the run ends
    run(tmp_path, "train.steps=2")
    run(tmp_path, "train.steps=2")  # a finished run, run again: it says so
    assert "nothing to train: already at train.steps=2" in capsys.readouterr().out


def test_a_resume_with_another_batch_size_goes_on_from_the_same_share_of_the_epoch(tmp_path, capsys, caplog):
    # 12 built-in images: 5 steps of 2 end at sample 10; batches of 4 go on from sample 8.
    run(tmp_path, "train.steps=5", "checkpoint.every=5")
    assert json.loads((checkpoint.latest(tmp_path) / "state.json").read_text())["data_position"] == [0, 10]
    with caplog.at_level("INFO", logger="trainer.data"):
        run(tmp_path, "train.steps=6", "train.batch_size=4")
    assert "resuming at sample 8 of 12 of epoch 0 on each rank (was 10 of 12" in caplog.text
    state = json.loads((checkpoint.latest(tmp_path) / "state.json").read_text())
    assert state["data_position"] == [1, 0] and state["samples"] == 12
    state["samples"] = 13  # as if an image had been removed since
    (checkpoint.latest(tmp_path) / "state.json").write_text(json.dumps(state))
    (checkpoint.latest(tmp_path) / checkpoint.CHECKSUMS).unlink()  # else a state.json changed since is a damaged one
    run(tmp_path, "train.steps=7", "train.batch_size=4")
    assert "the data holds 12 samples, 13 when" in capsys.readouterr().out


def test_a_later_ema_start_on_resume_says_the_started_ema_is_kept(tmp_path, capsys):
    run(tmp_path, "train.steps=2")  # TINY: the EMA starts at step 1
    run(tmp_path, "train.steps=3", "ema.start_step=3")
    assert "the EMA started before step 2 is kept, and not updated until ema.start_step=3" in capsys.readouterr().out


def test_an_out_dir_that_cannot_be_locked_trains_unguarded(tmp_path, monkeypatch, caplog):
    def no_locks(f, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(checkpoint.fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="trainer.checkpoint"):
        run(tmp_path, "train.steps=1")
    assert "cannot be locked ([Errno 37] No locks available)" in caplog.text
    assert checkpoint.load(checkpoint.latest(tmp_path))["state"]["step"] == 1


def test_a_resume_past_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path, capsys, caplog):
    # A flipped byte in a tensor's data loaded silently as another weight; a truncated file
    # stopped the resume, though the checkpoint before it was intact.
    every = "checkpoint.every=1"
    run(tmp_path, "train.steps=2", every)  # step_0000001 and step_0000002 (checkpoint.keep=2)
    first, newest = (checkpoint.checkpoint_dir(tmp_path) / checkpoint.step_name(s) for s in (1, 2))
    for file, damage in ((newest / "unet.safetensors", "flipped byte"), (newest / "optimizer.pt", "truncated")):
        data = file.read_bytes()
        file.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]) if damage == "flipped byte" else data[:len(data) // 2])
        caplog.clear()
        run(tmp_path, "train.steps=2", every)
        why = "does not hold the bytes written" if damage == "flipped byte" else f"holds {len(data) // 2} bytes, not the"
        assert f"checkpoint step_0000002 is damaged: {file} {why}" in caplog.text, damage
        assert "falling back to step_0000001, the newest intact checkpoint" in caplog.text
        assert f"resuming from {first} at step 1" in capsys.readouterr().out
        assert checkpoint.verify(newest) and checkpoint.latest(tmp_path) == newest  # written anew
    # a checkpoint written before checksums were recorded resumes, said to be unverified
    (newest / checkpoint.CHECKSUMS).unlink()
    run(tmp_path, "train.steps=3", every)
    assert f"resuming from {newest} at step 2" in capsys.readouterr().out
    assert f"{newest} holds no checksums.json" in caplog.text and "its files load unverified" in caplog.text
    last = checkpoint.latest(tmp_path)
    assert last.name == "step_0000003" and checkpoint.verify(last)
    # none intact: one line naming each damaged file, nothing trained
    for step in (newest, last):
        (step / "optimizer.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^no intact checkpoint to resume from in .*: {re.escape(str(last))}/"
                                         rf"optimizer.pt holds 0 bytes, .*; {re.escape(str(newest))}/optimizer.pt "
                                         r"cannot be read \([^\n]*start over with resume=false \(which sets them "
                                         r"aside\)$"):
        run(tmp_path, "train.steps=4", every)
    assert not (checkpoint.checkpoint_dir(tmp_path) / checkpoint.step_name(4)).exists()
