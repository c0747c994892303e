import json
import math

import matplotlib.axes
from PIL import Image

from trainer import metrics


def _write(path, steps, skipped=()):
    with open(path, "a") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "grad_norm": 1.0, "lr": 1e-4,
                                "images_per_s": 10.0 + step, "data_wait": 0.1, "skipped": step in skipped}) + "\n")


def test_a_resumed_runs_repeated_steps_keep_their_last_record(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    _write(jsonl, range(1, 6))
    _write(jsonl, [4, 5, 6])  # resumed from step 3's checkpoint
    records = metrics.read(jsonl)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert len(jsonl.read_text().splitlines()) == 8


def test_plot_from_the_command_line(tmp_path, capsys):
    _write(tmp_path / "metrics.jsonl", range(1, 40), skipped={7})
    metrics.main([str(tmp_path)])
    assert "wrote" in capsys.readouterr().out
    with Image.open(tmp_path / "metrics.png") as image:
        assert image.size == (800, 600)
    assert not list(tmp_path.glob("*.tmp.png"))
    (tmp_path / "empty.jsonl").write_text("")
    assert metrics.plot(tmp_path / "empty.jsonl", tmp_path / "empty.png") is None
    assert not (tmp_path / "empty.png").exists()


def test_a_skipped_steps_loss_is_null_and_spoils_no_running_mean(tmp_path, monkeypatch):
    line = metrics.record(step=2, loss=float("nan"), grad_norm=float("inf"), skipped=True)
    assert json.loads(line, parse_constant=lambda c: 1 / 0) == {"step": 2, "loss": None, "grad_norm": None, "skipped": True}
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(metrics.record(step=s, loss=math.nan if s == 5 else 1.0, grad_norm=1.0, images_per_s=1.0,
                                            data_wait=0.0, skipped=s == 5) for s in range(1, 61)))
    assert math.isnan(metrics.read(jsonl)[4]["loss"])
    plotted = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **k: plotted.append((a, k)) or real_plot(self, *a, **k))
    metrics.plot(jsonl, tmp_path / "m.png")
    smooth = next(a[1] for a, k in plotted if k.get("label", "").startswith("running mean"))
    assert smooth == [1.0] * 60  # the NaN is left out of every window holding it


def test_a_resume_from_an_earlier_checkpoint_drops_the_abandoned_records_from_the_plot(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    _write(jsonl, range(1, 31))
    _write(jsonl, range(21, 26))  # latest set back to step 20's checkpoint: 26-30 were abandoned
    with open(jsonl, "a") as f:
        f.write('{"step": 26}\n{"step": "27", "loss": 1.0}\n')  # no loss, no int step: passed over
    assert [r["step"] for r in metrics.read(jsonl)] == list(range(1, 26))
    assert len(jsonl.read_text().splitlines()) == 37  # the file keeps every line


def test_the_plot_takes_the_format_of_its_suffix_and_makes_its_folder(tmp_path, capsys):
    _write(tmp_path / "metrics.jsonl", range(1, 5))
    metrics.main([str(tmp_path), "--out", str(tmp_path / "new" / "m.svg")])
    assert (tmp_path / "new" / "m.svg").read_text().lstrip().startswith("<?xml")
    assert not list((tmp_path / "new").glob(".*"))
