"""What every benchmark shares outside its measuring: the fields its JSON opens with (when,
which checkout, which device and versions, so a file run by hand or copied out of its results
folder still says where it came from), the output folder, made and tried before any measuring
(a bad --out failed only when the results were written), and argparse's integer bounds."""
import argparse
import datetime
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def git_commit():
    """(commit, whether the tracked files differ from it) of this checkout; (None, None) outside git."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def device_name(device=None):
    """The GPU's name (device; default: the current GPU, if any) or the CPU's."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def run_meta(device=None):
    """{date (UTC), commit, dirty, device, torch, triton, cuda}: the opening fields of each JSON."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = git_commit()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "dirty": dirty, "device": device_name(device), "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda}


def output_dir(path):
    """path as a folder that exists and takes files: made and tried now, before any measuring."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"--out {path}: not a folder this process can write into ({e})") from None
    return out


def at_least(low):
    """An argparse type: an integer >= low ("argument --steps: must be an integer >= 1, got 0")."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


def save_plot(fig, path, meta):
    """Save fig as path (PNG) with a footer naming its run (date, commit, device, versions), so a
    plot copied out of its folder still says where its numbers came from; then close it."""
    import matplotlib.pyplot as plt

    commit = (meta.get("commit") or "no commit")[:10] + (" (dirty)" if meta.get("dirty") else "")
    fig.text(0.005, 0.003, f"{meta['date']}  {commit}  {meta['device']}  torch {meta['torch']}  "
             f"triton {meta['triton']}  cuda {meta['cuda']}", fontsize=6, color="0.4", va="bottom")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
