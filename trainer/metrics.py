"""A run's metrics.jsonl (a record every train.log_every steps: over the steps since the
previous record, their count `steps`, the mean loss of those taken, how many were skipped,
images/s and the share of the time spent waiting for data; the last grad norm and lr; `time`,
seconds since the epoch) and its plot, metrics.png.

    python -m trainer.metrics runs/tiny          # -> runs/tiny/metrics.png

train.py redraws the plot at every checkpoint and at the end. A resumed run appends the records
after its checkpoint again: the file keeps every line, the plot the timeline the run took (the
records a resume went back over are replaced by the resumed run's).
"""
import argparse
import itertools
import json
import math
import os
from pathlib import Path


def read(path):
    """The records of a metrics.jsonl on the run's last timeline, by step: a record whose step
    is not after the one before it starts a resumed run, whose records replace those at and
    after its step (a resume from an earlier checkpoint abandons them). A skipped step's loss
    and grad_norm, null in the file (strict JSON has no NaN), read as NaN. A line that does not
    parse (cut off by a crash or a full disk) or holds no step and loss is passed over."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not (isinstance(record, dict) and type(record.get("step")) is int and "loss" in record):
                continue
            for key in ("loss", "grad_norm"):
                if key in record and record[key] is None:
                    record[key] = math.nan
            while records and records[-1]["step"] >= record["step"]:
                records.pop()
            records.append(record)
    return records


def open_for_append(path):
    """A metrics.jsonl opened for appending, on a line of its own: after a crash cut the last
    line short, the first record of the resumed run would have joined it."""
    path = Path(path)
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    return open(path, "a", encoding="utf-8")


def record(**fields):
    """One metrics.jsonl line: non-finite numbers (a skipped step's loss) as null."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in fields.items()}) + "\n"


def plot(jsonl, png):
    """Loss (each record and a running mean), images/s and the share of the time spent waiting
    for data against the step, as a PNG written whole (a viewer never sees half a file).
    Returns png, or None with no records yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read(jsonl)
    if not records:
        return None
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    fig, (ax_loss, ax_speed) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    window = len(losses) // 20
    ax_loss.plot(steps, losses, **({"lw": 0.6, "alpha": 0.5} if window > 1 else {"marker": "."}),
                 label="loss (mean of each record's steps)")
    if window > 1:  # enough records for a running mean to say more than they do
        # from prefix sums of the finite losses and their count: one pass, where summing each
        # window anew took records x window additions at every checkpoint's redraw (~5e8 for
        # a 100k-step run logging each step); a skipped step's NaN would spoil all after it
        finite = [math.isfinite(x) for x in losses]
        total = [0.0, *itertools.accumulate(x if ok else 0.0 for x, ok in zip(losses, finite))]
        count = [0, *itertools.accumulate(finite)]
        starts = [max(0, i - window + 1) for i in range(len(losses))]
        smooth = [(total[i + 1] - total[a]) / (count[i + 1] - count[a]) if count[i + 1] > count[a] else math.nan
                  for i, a in enumerate(starts)]
        ax_loss.plot(steps, smooth, lw=1.5, label=f"running mean of {window} records")
    skipped = [r["step"] for r in records if r.get("skipped")]
    if skipped:
        ax_loss.plot(skipped, [0] * len(skipped), "rx", transform=ax_loss.get_xaxis_transform(),
                     label="skipped (non-finite)")
    ax_loss.set_ylabel("loss")
    if all(x > 0 for x in losses if math.isfinite(x)):  # a loss falls by decades; a late plateau stays readable
        ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_speed.plot(steps, [r["images_per_s"] for r in records], lw=1)
    ax_speed.set_ylabel("images/s")
    ax_speed.set_ylim(bottom=0)
    ax_speed.set_xlabel("step")
    if all("data_wait" in r for r in records):  # runs before 2026-11-27 did not record it
        ax_wait = ax_speed.twinx()
        ax_wait.plot(steps, [100 * r["data_wait"] for r in records], lw=1, color="tab:red")
        ax_wait.set_ylabel("% waiting for data", color="tab:red")
        ax_wait.set_ylim(0, 100)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp{png.suffix}")  # the suffix names the format: .png, .svg, .pdf
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)
    return png


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run's out_dir (holding metrics.jsonl) or a metrics.jsonl")
    p.add_argument("--out", default=None, help="the image (default: metrics.png next to metrics.jsonl; "
                   ".svg or .pdf for those formats)")
    args = p.parse_args(argv)
    jsonl = Path(args.run)
    jsonl = jsonl / "metrics.jsonl" if jsonl.is_dir() else jsonl
    if not jsonl.is_file():
        p.error(f"no metrics at {jsonl}")
    png = plot(jsonl, args.out or jsonl.with_name("metrics.png"))
    print(f"wrote {png}" if png else f"{jsonl} holds no records yet")


if __name__ == "__main__":
    main()
