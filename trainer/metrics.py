"""A run's metrics.jsonl (a record every train.log_every steps: the mean loss of the steps taken
since the previous record, how many were skipped, the last grad norm and lr, the run's
images/s and share of time waiting for data) and its plot, metrics.png.

    python -m trainer.metrics runs/tiny          # -> runs/tiny/metrics.png

train.py redraws the plot at every checkpoint and at the end. A resumed run appends the steps
after its checkpoint again; the plot keeps the last record of each step.
"""
import argparse
import itertools
import json
import math
import os
from pathlib import Path


def read(path):
    """The records of a metrics.jsonl, one per step (the last written), by step. A skipped step's
    loss and grad_norm, null in the file (strict JSON has no NaN), read as NaN. A line that does
    not parse (cut off by a crash or a full disk) is passed over."""
    by_step = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                for key in ("loss", "grad_norm"):
                    if key in record and record[key] is None:
                        record[key] = math.nan
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


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
    ax_loss.legend()
    ax_speed.plot(steps, [r["images_per_s"] for r in records], lw=1)
    ax_speed.set_ylabel("images/s (run mean)")
    ax_speed.set_xlabel("step")
    if all("data_wait" in r for r in records):  # runs before 2026-11-27 did not record it
        ax_wait = ax_speed.twinx()
        ax_wait.plot(steps, [100 * r["data_wait"] for r in records], lw=1, color="tab:red")
        ax_wait.set_ylabel("% waiting for data", color="tab:red")
        ax_wait.set_ylim(0, 100)
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)
    return png


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run's out_dir (holding metrics.jsonl) or a metrics.jsonl")
    p.add_argument("--out", default=None, help="the PNG (default: metrics.png next to metrics.jsonl)")
    args = p.parse_args(argv)
    jsonl = Path(args.run)
    jsonl = jsonl / "metrics.jsonl" if jsonl.is_dir() else jsonl
    if not jsonl.is_file():
        p.error(f"no metrics at {jsonl}")
    png = plot(jsonl, args.out or jsonl.with_name("metrics.png"))
    print(f"wrote {png}" if png else f"{jsonl} holds no records yet")


if __name__ == "__main__":
    main()
