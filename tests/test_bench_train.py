"""Smoke test of benchmarks/bench_train.py's tiny mode, and the recipe swaps it relies on."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cckernels as ck
from trainer.config import load as load_config
from trainer.unet import LayerNorm
import scripts

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def bench():
    return scripts.load("benchmarks/bench_train.py")


def tiny_unet(bench, recipe):
    torch.manual_seed(0)
    return bench.build_unet(load_config(ROOT / "configs" / "tiny.yaml")["model"]["unet"], recipe, "cpu")


def test_baseline_and_plain_swaps_keep_the_output(bench, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the torch backend is the reference here
    torch.manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 77, 32)
    ours = tiny_unet(bench, bench.Recipe(attention="ours", qkv="fused", group_norm="ours", layer_norm="ours", geglu="ours"))
    expected = ours(x, t, ctx)
    for attention, qkv in (("materialized", "separate"), ("sdpa", "fused")):
        model = tiny_unet(bench, bench.Recipe(attention=attention, qkv=qkv, group_norm="torch"))
        assert all(m.fused == (qkv == "fused") for m in model.modules() if isinstance(m, bench.Attention))
        assert any(isinstance(m, bench.TorchGroupNormSiLU) for m in model.modules())
        assert not any(isinstance(m, ck.nn.GroupNorm) for m in model.modules())
        assert not any(m.fused for m in model.modules() if isinstance(m, LayerNorm))
        torch.testing.assert_close(model(x, t, ctx), expected, rtol=1e-5, atol=1e-5)


def test_plain_norms_count_and_keep_state_dict(bench):
    unet = tiny_unet(bench, bench.Recipe(group_norm="ours", layer_norm="ours"))
    state = unet.state_dict()
    n_group = sum(isinstance(m, ck.nn.GroupNorm) for m in unet.modules())
    assert bench.plain_group_norm(unet) == n_group > 0
    assert not any(isinstance(m, ck.nn.GroupNorm) for m in unet.modules())
    for key, value in unet.state_dict().items():
        assert torch.equal(value, state[key])
    assert unet.state_dict().keys() == state.keys()
    plain = tiny_unet(bench, bench.Recipe(layer_norm="torch"))
    norms = [m for m in plain.modules() if isinstance(m, LayerNorm)]
    assert norms and not any(m.fused for m in norms)


def test_tiny_run_writes_table_json_and_plot(bench, tmp_path, monkeypatch, capsys):
    # Timing Triton's interpreter says nothing: "ours" runs the torch backend on the CPU here.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("CCKERNELS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rows = bench.main(["--tiny", "--steps", "1", "--warmup", "0", "--out", str(out)])
    saved = json.loads((out / "bench_train.json").read_text())
    assert (out / "bench_train.png").stat().st_size > 0
    assert {"date", "commit", "dirty", "device", "torch", "triton"} <= set(saved)  # run_info.run_meta
    names = [name for name, _ in bench.LADDER] + [bench.GRAPHED[0]] + list(bench.PLAIN_ROWS)
    assert [r["name"] for r in saved["rows"]] == names
    by_name = {r["name"]: r for r in saved["rows"]}
    for name, row in by_name.items():
        if row.get("status", "").startswith("skipped: DALI"):
            continue  # DALI is an optional dependency
        if name == bench.GRAPHED[0]:
            assert row["status"] == "skipped: CUDA graphs need a GPU" and row["recipe"] == {
                **by_name["+ our DDP"]["recipe"], "graphs": True}
            continue
        assert "images_per_s" in row, (name, row.get("status"))
        assert row["images_per_s"] > 0 and row["tflops"] > 0
        assert row["host_ms"] > 0 and all(h <= t for h, t in zip(row["host_s"], row["step_s"]))
    assert by_name["baseline"]["speedup_vs_baseline"] == 1.0
    assert by_name["baseline"]["backends"] == {"attention": "materialized", "group_norm": "torch.nn+silu",
                                               "layer_norm": "torch", "geglu": "torch", "weights": "fp32"}
    assert by_name["+ our LayerNorm"]["backends"]["layer_norm"] == "torch"  # TRITON_INTERPRET unset: the reference
    assert by_name["+ our GroupNorm+SiLU"]["backends"]["group_norm"] == "torch"  # each row's own calls
    assert by_name["+ bf16 weights"]["backends"]["weights"] == by_name["+ our DDP"]["backends"]["weights"] == "bf16"
    assert by_name["+ larger micro-batch"]["batch"] == 2 * by_name["baseline"]["batch"]
    assert by_name["+ fused AdamW+EMA, scheduled EMA"]["step_s_ema"]
    assert by_name[bench.PLAIN[0]]["step_s_ema"]  # plain PyTorch's EMA on the same schedule
    assert "step_s_ema" not in by_name["baseline"]  # the baseline's runs every step
    assert by_name[bench.PLAIN[0]]["recipe"]["compile"] is True
    plain_max = by_name[bench.PLAIN_MAX[0]]
    assert plain_max["recipe"] == {**by_name[bench.PLAIN[0]]["recipe"], "batch": "max"}
    assert by_name[bench.PLAIN_CONTIGUOUS[0]]["recipe"] == {**by_name[bench.PLAIN[0]]["recipe"], "channels_last": False}
    assert plain_max["batch"] == 2 * by_name["baseline"]["batch"]
    fastest_plain = max(by_name[n]["images_per_s"] for n in bench.PLAIN_ROWS)
    assert by_name["baseline"]["speedup_vs_plain_pytorch"] == by_name["baseline"]["images_per_s"] / fastest_plain
    assert by_name["+ torch.compile"]["recipe"] == {**by_name["+ larger micro-batch"]["recipe"], "compile": True}
    assert len(rows) == len(names)
    assert "host ms" in capsys.readouterr().out
    # run_gpu.sh's summary of a run cut before the final table: the table from the JSON
    assert bench.main(["--print-table", str(out / "bench_train.json")]) == saved["rows"]
    assert "baseline" in capsys.readouterr().out


def test_profile_writes_the_op_tables_of_the_rows_named(bench, tmp_path, monkeypatch):
    # The scheduled EMA starts after the profiled steps: they profile the steps the timed window had.
    # A row not named in --rows profiles one step, kernels only (its busy column), and writes no table.
    from trainer.ema import ScheduledEMA

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("CCKERNELS_CACHE", str(tmp_path / "cache"))
    events, start, profile_steps = [], ScheduledEMA._start, bench.profile_steps
    monkeypatch.setattr(ScheduledEMA, "_start", lambda self: events.append("ema start") or start(self))
    monkeypatch.setattr(bench, "profile_steps", lambda *a: (profile_steps(*a), events.append("profiled"))[0])
    out = tmp_path / "out"
    ema_row = "+ fused AdamW+EMA, scheduled EMA"
    rows = bench.main(["--tiny", "--steps", "1", "--warmup", "0", "--out", str(out), "--rows", ema_row, "--profile"])
    assert [r["name"] for r in rows if "images_per_s" in r] == ["baseline", ema_row]
    assert events == ["profiled", "profiled", "ema start"]
    table = (out / "bench_train-profile" / "fused-AdamW-EMA-scheduled-EMA.txt").read_text()
    assert "aten::" in table and "host: top 30 by self CPU time, 2 steps" in table
    assert not (out / "bench_train-profile" / "baseline.txt").exists()  # runs always, not named


def test_op_tables_names_the_rows_whose_tables_are_written(bench, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("CCKERNELS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    bench.main(["--tiny", "--steps", "1", "--warmup", "0", "--out", str(out), "--rows", "+ our attention",
                "--profile", "--op-tables", "baseline"])
    assert sorted(p.name for p in (out / "bench_train-profile").iterdir()) == ["baseline.txt"]


def test_profile_without_a_table_runs_its_steps(bench):
    steps = []
    assert bench.profile_steps(lambda: steps.append(1), 1, False, None, 1.0) == {}  # no GPU: no busy share
    assert steps == [1]


def test_busy_time_counts_overlapping_kernels_once(bench):
    assert bench.covered([]) == 0
    assert bench.covered([(5, 7), (0, 2), (1, 3), (3, 4), (6, 6.5)]) == 3 + 1 + 2  # [0, 3], [3, 4], [5, 7]


def test_gpu_time_rates_are_the_rates_the_busy_share_allows(bench, tmp_path, capsys):
    rows = [{"name": "baseline", "images_per_s": 100.0, "gpu_busy": 0.5},
            {"name": "+ our attention", "images_per_s": 90.0, "gpu_busy": 0.3},
            {"name": "+ channels_last", "images_per_s": 95.0}]  # not profiled
    assert bench.gpu_time_rates(rows) == {"baseline": (200.0, 1.0), "+ our attention": (300.0, 1.5)}
    assert bench.gpu_time_rates(rows[1:]) == {"+ our attention": (300.0, None)}  # no baseline to compare
    full = [dict(r, batch=32, step_ms=1.0, step_ms_q20=1.0, step_ms_q80=1.0, backends={}, speedup_vs_baseline=1.0,
                 speedup_vs_plain_pytorch=None, mfu_measured_peak=0.1, mfu_h100_nominal=0.1) for r in rows]
    bench.print_table(full)
    table = capsys.readouterr().out
    assert "300.0 (1.50x base)" in table and "GPU-time img/s" in table
    bench.plot(full, tmp_path / "plot.png", {**bench.run_meta("cpu"), "resolution": 256, "world": 1})
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_a_run_cut_short_keeps_json_and_plot_of_the_rows_done(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("CCKERNELS_CACHE", str(tmp_path / "cache"))
    calls = []

    def measure(recipe, name, rows, shared):  # two rows measured, then the time limit's kill
        calls.append(name)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return {"batch": 4, "images_per_s": 10.0 * len(calls), "step_s": [0.1]}

    monkeypatch.setattr(bench, "measure", measure)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--tiny", "--out", str(out)])
    saved = json.loads((out / "bench_train.json").read_text())
    by_name = {r["name"]: r for r in saved["rows"]}
    assert calls[:2] == ["baseline", "+ our DDP"]  # the headline rows come first
    assert by_name["+ our DDP"]["speedup_vs_baseline"] == 2.0
    assert by_name["+ our attention"]["status"].startswith("not measured")
    assert (out / "bench_train.png").stat().st_size > 0


def test_rows_are_measured_headline_first_then_latents_against_online(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("CCKERNELS_CACHE", str(tmp_path / "cache"))
    calls = []
    headline = list(bench.HEADLINE)  # then the #9 pair, then the graphs row (skipped on a CPU)

    def measure(recipe, name, rows, shared):  # stopped after the rows this test looks at
        calls.append(name)
        if len(calls) == len(headline) + 3:
            raise KeyboardInterrupt
        return {"batch": 4, "images_per_s": 10.0, "step_s": [0.1]}

    monkeypatch.setattr(bench, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--tiny", "--out", str(tmp_path / "out")])
    assert calls[:len(headline)] == headline
    above = "+ DALI decoding" if "+ DALI decoding" in calls else "+ bf16 weights"
    assert calls[len(headline):len(headline) + 2] == [above, "+ precomputed latents"]
    assert calls[len(headline) + 2] == "+ our attention"  # then the ladder in order


def test_max_batch_sets_the_larger_micro_batch_without_the_row_above(bench, tmp_path, monkeypatch):
    # A follow-up call on a GPU: a compiled plain-PyTorch row at the batch its eager twin fitted,
    # without compiling the base-batch row above it too (here the baseline is the row above, and
    # sizing from it would give 2 x 4).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("CCKERNELS_CACHE", str(tmp_path / "cache"))
    rows = bench.main(["--tiny", "--steps", "1", "--warmup", "0", "--out", str(tmp_path / "out"),
                       "--max-batch", "8", "--rows", bench.PLAIN_MAX[0]])
    by_name = {r["name"]: r for r in rows if "images_per_s" in r}
    assert set(by_name) == {"baseline", bench.PLAIN_MAX[0]}
    assert by_name["baseline"]["batch"] == 4 and by_name[bench.PLAIN_MAX[0]]["batch"] == 8


def test_the_larger_batch_grows_the_previous_peak_by_the_measured_memory_per_image(bench):
    gib = 2**30
    # the third H200 run's plain PyTorch row at batch 32: peak 37.2 GiB, persistent 22.8
    prev = {"batch": 32, "peak_bytes": 37.2 * gib, "persistent_bytes": 22.8 * gib}
    old_rule = bench.max_batch(prev, 32, 125 * gib)  # (peak - persistent) / batch an image
    measured = bench.max_batch({**prev, "bytes_per_image": 0.28 * gib}, 32, 125 * gib)
    assert old_rule == 224  # what that run picked, at 0.45 GiB an image
    assert measured == 344  # 32 + (125 - 37.2) / 0.28, down to a multiple of 8
    assert bench.max_batch({**prev, "bytes_per_image": 0.0}, 32, 125 * gib) == old_rule  # no probe: the old rule
    assert bench.max_batch(prev, 32, 30 * gib) == 32  # never below the base batch


def test_memory_per_image_is_the_peak_difference_of_one_and_two_batches(bench, monkeypatch):
    # The CUDA memory statistics stand in: a peak of 1000 bytes an image plus 5000 that do not
    # grow with the batch, read after each forward+backward.
    unet = tiny_unet(bench, bench.Recipe())
    seen = []
    unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 5000 + 1000 * seen[-1])
    batch, side = 3, 8

    def batches():
        while True:
            yield (torch.randn(batch, unet.config["in_channels"], side, side),
                   torch.randn(batch, 77, unet.config["cross_attention_dim"]))

    per_image = bench.memory_per_image(unet, bench.diffusion.NoiseSchedule(), batches(),
                                       torch.autocast("cpu", enabled=False), batch, "cpu")
    assert seen == [3, 6] and per_image == 1000
    assert all(p.grad is None for p in unet.parameters())  # the probe leaves no grads behind


@pytest.mark.parametrize("argv, match", [
    (["--rows", "+ our attn"], r"no row named '\+ our attn'; the rows: 'baseline', '\+ our attention'"),
    (["--op-tables", "basline"], r"no row named 'basline'"),
    (["--steps", "0"], r"argument --steps: must be an integer >= 1, got '0'"),
    (["--warmup", "-1"], r"argument --warmup: must be an integer >= 0, got '-1'"),
    (["--resolution", "100"], r"argument --resolution: must be a multiple of 8"),
])
def test_bad_arguments_fail_before_anything_is_measured(bench, argv, match, capsys):
    # A misspelt --rows name was skipped as "not in --rows": a GPU call measured the baseline alone.
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert re.search(match, capsys.readouterr().err)


def test_a_failed_row_fails_the_run(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--tiny", "--rows", "baseline",
                          "--steps", "1", "--warmup", "0", "--vae", str(tmp_path / "no-vae"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "CCKERNELS_CACHE": str(tmp_path)})
    assert run.returncode == 1 and "1 rows failed: baseline" in run.stderr, run.stderr[-2000:]
    assert json.loads((tmp_path / "bench_train.json").read_text())["rows"][0]["status"].startswith("failed:")
