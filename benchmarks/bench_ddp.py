"""Step time of trainer.ddp against torch's DDP at equal bucket size, and how much of the
all-reduce time each hides behind the backward.

    python benchmarks/bench_ddp.py [--out DIR] [--bucket-mb 25] [--width 1024 --depth 8 --batch 64]
    python benchmarks/bench_ddp.py --tiny       # seconds on a CPU, for the smoke test

Backend: NCCL with one process per GPU when there are >= 2 GPUs, else 2 gloo processes on the
CPU (one thread each). Model: `depth` Linear(width, width) + GELU layers, fp32, so the grads
are 4 * depth * (width^2 + width) bytes. Per implementation (ours and torch's DDP, each with
fp32 and with bf16 gradient communication: our grad_dtype=torch.bfloat16, torch's
bf16_compress_hook), same model, data and bucket size:
  t_step   forward + backward through the wrapper, all-reduces included
  t_bwd    forward + backward of the bare model, no communication
  t_comm   the wrapper's gradient buckets (our bucket sizes, in the communicated dtype)
           all-reduced back to back with nothing else running
  hidden = (t_bwd + t_comm - t_step) / t_comm: the share of the all-reduce time overlapped by
           the backward (1 = all hidden; 0 = none; below 0 = extra cost such as bucket copies)
  bus GB/s = 2 (W - 1) / W * bucket bytes / t_comm (what a ring all-reduce moves per rank)
Times are per step: the median and 20/80 quantiles over `--reps` repetitions of `--steps`
steps, each repetition timed by the slowest rank. Implementations take turns within each
repetition so drift on a shared machine hits them alike. triton.testing.do_bench is not
used: it picks its iteration count per process from a timing estimate, and ranks that issue
different numbers of collectives hang.
Writes bench_ddp.json and bench_ddp.png to --out (default benchmarks/results/local).
"""

import argparse
import copy
import datetime
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from run_info import at_least, device_name, output_dir, run_meta, save_plot


def make_model(width, depth, seed):
    torch.manual_seed(seed)
    return nn.Sequential(*[layer for _ in range(depth) for layer in (nn.Linear(width, width), nn.GELU())])


def wrap(impl, dtype, model, bucket_mb):
    """impl: "ours" or "torch"; dtype: "fp32" or "bf16", the dtype grads are communicated in."""
    from trainer.ddp import DistributedDataParallel

    if impl == "ours":
        return DistributedDataParallel(model, bucket_cap_mb=bucket_mb,
                                       grad_dtype=torch.bfloat16 if dtype == "bf16" else None)
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
    if dtype == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
        ddp.register_comm_hook(None, bf16_compress_hook)
    return ddp


def unavailable_runs():
    """{run name: why} for the runs this torch cannot make: torch DDP's bf16 hook refuses a
    torch built without CUDA."""
    return {} if torch.version.cuda else {"torch bf16": "torch DDP's bf16_compress_hook needs a CUDA build of torch"}


def timed(run, steps, sync, device):
    """Seconds per call of run() over `steps` calls, as the slowest rank saw them."""
    dist.barrier()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    sync()
    elapsed = torch.tensor([(time.perf_counter() - t0) / steps], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def _measure(rank, device, args, sync):
    """{run name: seconds per step, one per repetition}, bucket sizes: the timed part of a rank."""
    base = make_model(args.width, args.depth, seed=0).to(device)
    torch.manual_seed(1 + rank)  # each rank its own data
    x = torch.randn(args.batch, args.width, device=device)

    def step(model):
        def run():
            for p in model.parameters():
                p.grad = None
            model(x).pow(2).mean().backward()
        return run

    wrapped = {f"{impl} {dtype}": wrap(impl, dtype, copy.deepcopy(base), args.bucket_mb)
               for impl in ("ours", "torch") for dtype in ("fp32", "bf16") if f"{impl} {dtype}" not in args.unavailable}
    buckets = wrapped["ours fp32"]._buckets
    comm_buffers = {dtype: [torch.randn(b.buffer.numel(), device=device, dtype=dt) for b in buckets]
                    for dtype, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    def comm(dtype):
        def run():
            works = [dist.all_reduce(buf, async_op=True) for buf in comm_buffers[dtype]]
            for w in works:
                w.wait()
        return run

    runs = {"bare": step(base), "comm fp32": comm("fp32"), "comm bf16": comm("bf16")}
    runs.update({name: step(m) for name, m in wrapped.items()})
    for run in runs.values():  # warm-up: allocations, torch's bucket rebuild after its first step
        run()
        run()
    seconds = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, run in runs.items():
            seconds[name].append(timed(run, args.steps, sync, device))
    return seconds, [b.buffer.numel() for b in buckets]


def _worker(rank, world, backend, store_path, args, out_path):
    torch.set_num_threads(1)  # CPU: one core per rank
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        # The DDP models die with _measure's frame, before the process group: torch 2.11 can
        # hang at exit when torch DDP's reducer outlives its (destroyed) gloo group.
        seconds, bucket_numels = _measure(rank, device, args, sync)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out_path).write_text(json.dumps({"seconds": seconds, "n_buckets": len(bucket_numels),
                                              "bucket_numels": bucket_numels}))


def _stats(seconds):
    q20, med, q80 = np.quantile(seconds, [0.2, 0.5, 0.8])
    return {"ms": med * 1e3, "q20_ms": q20 * 1e3, "q80_ms": q80 * 1e3}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/local")
    p.add_argument("--tiny", action="store_true", help="a tiny model, few steps: seconds on a CPU")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="gradient bucket size (default 25)")
    p.add_argument("--width", type=at_least(1), default=None, help="default: 1024 on CPU, 4096 on GPUs")
    p.add_argument("--depth", type=at_least(1), default=8, help="default 8")
    p.add_argument("--batch", type=at_least(1), default=None, help="rows per rank; default: 64 on CPU, 4096 on GPUs")
    p.add_argument("--steps", type=at_least(1), default=5, help="steps per timed repetition (default 5)")
    p.add_argument("--reps", type=at_least(1), default=10, help="timed repetitions (default 10)")
    args = p.parse_args(argv)
    if not args.bucket_mb > 0:
        p.error(f"argument --bucket-mb: must be > 0, got {args.bucket_mb}")
    gpus = torch.cuda.device_count()
    backend, world = ("nccl", gpus) if gpus >= 2 and dist.is_nccl_available() else ("gloo", 2)
    args.width = args.width or (4096 if backend == "nccl" else 1024)
    args.batch = args.batch or (4096 if backend == "nccl" else 64)
    if args.tiny:  # its own sizes: the other size options are not for tiny mode
        args.width, args.depth, args.batch, args.steps, args.reps, args.bucket_mb = 64, 4, 8, 2, 3, 0.02
    args.unavailable = unavailable_runs()
    for name, why in args.unavailable.items():
        print(f"{name}: not measured ({why})")
    out = output_dir(args.out)

    with tempfile.TemporaryDirectory() as tmp:
        # Not forked from here: CUDA cannot run in a forked child, nor autograd once the parent
        # ran torch.compile (as a test process may have). NCCL ranks are spawned; gloo ranks
        # forked from a fresh server process (spawned ones at times abort in gloo's threads
        # while the interpreter shuts down).
        mp.start_processes(_worker, args=(world, backend, f"{tmp}/store", args, f"{tmp}/rank0.json"),
                           nprocs=world, start_method="spawn" if backend == "nccl" else "forkserver")
        raw = json.loads(Path(f"{tmp}/rank0.json").read_text())

    sec = raw["seconds"]
    grad_bytes = 4 * args.depth * (args.width ** 2 + args.width)
    bare = np.median(sec["bare"])
    rows = []
    for dtype, itemsize in (("fp32", 4), ("bf16", 2)):
        t_comm = np.median(sec[f"comm {dtype}"])
        wire = 2 * (world - 1) / world * sum(raw["bucket_numels"]) * itemsize
        for impl in ("ours", "torch"):
            if f"{impl} {dtype}" in args.unavailable:
                continue
            t_step = np.median(sec[f"{impl} {dtype}"])
            rows.append({"impl": impl, "grad_comm": dtype, "step": _stats(sec[f"{impl} {dtype}"]),
                         "bwd": _stats(sec["bare"]), "comm": _stats(sec[f"comm {dtype}"]),
                         "hidden": (bare + t_comm - t_step) / t_comm, "bus_GBps": wire / t_comm / 1e9})
    for row in rows:
        torch_row = next((r for r in rows if r["impl"] == "torch" and r["grad_comm"] == row["grad_comm"]), None)
        row["speedup_vs_torch"] = torch_row["step"]["ms"] / row["step"]["ms"] if torch_row else None

    device = device_name("cuda" if backend == "nccl" else "cpu")
    print(f"{backend}, {world} ranks on {device}; MLP {args.depth} x Linear({args.width}) "
          f"({grad_bytes / 2**20:.1f} MiB fp32 grads), batch {args.batch}/rank, "
          f"buckets of {args.bucket_mb} MB ({raw['n_buckets']} buckets)")
    print(f"{'impl':<7}{'grads':>6}{'step ms':>10}{'q20':>9}{'q80':>9}{'bwd ms':>9}{'comm ms':>9}"
          f"{'hidden':>8}{'bus GB/s':>10}{'vs torch':>9}")
    for r in rows:
        print(f"{r['impl']:<7}{r['grad_comm']:>6}{r['step']['ms']:>10.2f}{r['step']['q20_ms']:>9.2f}"
              f"{r['step']['q80_ms']:>9.2f}{r['bwd']['ms']:>9.2f}{r['comm']['ms']:>9.2f}"
              f"{r['hidden']:>8.2f}{r['bus_GBps']:>10.2f}"
              + (f"{r['speedup_vs_torch']:>9.2f}" if r["speedup_vs_torch"] else f"{'-':>9}"))

    result = {
        "benchmark": "DDP forward+backward step: trainer.ddp vs torch DDP, and hidden all-reduce share",
        "formulas": {"hidden": "(t_bwd + t_comm - t_step) / t_comm",
                     "bus_GBps": "2 (W - 1) / W * bucket bytes / t_comm",
                     "grad_bytes": "4 * depth * (width^2 + width)"},
        **run_meta(), "backend": backend, "world_size": world, "device": device, "width": args.width, "depth": args.depth,
        "batch_per_rank": args.batch, "bucket_mb": args.bucket_mb, "n_buckets": raw["n_buckets"],
        "grad_bytes": grad_bytes, "steps": args.steps, "reps": args.reps, "rows": rows,
        "not_measured": args.unavailable, "seconds": sec,
    }
    (out / "bench_ddp.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / "bench_ddp.png", f"{backend} x{world}, {device}, {grad_bytes / 2**20:.2f} MiB grads", result)
    print(f"wrote {out / 'bench_ddp.json'} and {out / 'bench_ddp.png'}")
    return result


def plot(rows, path, title, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_h) = plt.subplots(1, 2, figsize=(9, 4))
    labels = [f"{r['impl']}\n{r['grad_comm']}" for r in rows]
    x = np.arange(len(rows))
    for k, (key, name) in enumerate((("step", "step"), ("bwd", "fwd+bwd, no comm"), ("comm", "comm alone"))):
        med = np.array([r[key]["ms"] for r in rows])
        err = np.array([[r[key]["ms"] - r[key]["q20_ms"], r[key]["q80_ms"] - r[key]["ms"]] for r in rows]).T
        ax_t.bar(x + (k - 1) * 0.27, med, 0.27, yerr=err, label=name)
    ax_t.set_xticks(x)
    ax_t.set_xticklabels(labels)
    ax_t.set_ylabel("ms per step (median, 20/80 %)")
    ax_t.legend(fontsize=8)
    ax_h.bar(x, [r["hidden"] for r in rows], color="tab:green")
    ax_h.axhline(0, color="black", lw=0.8)
    ax_h.set_xticks(x)
    ax_h.set_xticklabels(labels)
    ax_h.set_ylabel("all-reduce time hidden by backward")
    fig.suptitle(title, fontsize=9)
    save_plot(fig, path, meta)


if __name__ == "__main__":
    main()
