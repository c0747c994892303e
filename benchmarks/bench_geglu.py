"""GEGLU (h * gelu(gate), the feed-forward activation of SD2's transformer blocks) on SD2
training shapes: ck.geglu against PyTorch's gelu-then-multiply, eager and torch.compile'd.

    python benchmarks/bench_geglu.py [--out DIR] [--tiny] [--budget-s S]

Inputs are the (tokens, 2F) bf16 outputs of the feed-forward's projection: F = 4 x the block's
width, tokens = batch x latent positions (256 px at batch 32, 512 px at batch 8), and the
projection's bias, as the UNet runs them: ck.geglu adds the bias and returns its gradient;
PyTorch's code gets x with the bias already added (in the projection's GEMM) and its backward
ends with the sum of dx that torch's Linear computes for the bias gradient. Bytes moved, the
minimum: forward reads x and writes y, 3 * tokens * F * 2 bytes; forward + backward adds
reading dy and x and writing dx, 8 * tokens * F * 2 in all. GB/s and "of copy"
(of the device-to-device copy bandwidth measured here) come from the CUDA-graph time; the
eager and host times are there too (benchmarks/timers.py says what each one is).
--tiny (automatic without a GPU) runs one small shape on the CPU, wall-clock, as a smoke test.
"""
import argparse
import json
import os
import time

import torch
from tqdm import tqdm

import cckernels as ck
from bench_group_norm import copy_bandwidth
from cckernels import reference
from timers import fmt, graph_cell, time_fields, timings

# (name, tokens, F): SD2's three transformer widths 320, 640, 1280 at each resolution
SHAPES = [
    ("256px", 32 * 32 * 32, 4 * 320), ("256px", 32 * 16 * 16, 4 * 640), ("256px", 32 * 8 * 8, 4 * 1280),
    ("512px", 8 * 64 * 64, 4 * 320), ("512px", 8 * 32 * 32, 4 * 640), ("512px", 8 * 16 * 16, 4 * 1280),
]
TINY_SHAPES = [("tiny", 64, 96)]
EAGER, GRAPH = (3, 10), (3, 10)  # do_bench (warmup, rep) ms: ~10 calls of the slowest case


def implementations(tiny):
    """name -> (fn(x, bias), whether fn takes the bias); PyTorch's takes x with the bias added."""
    impls = {"ck": (ck.geglu, True), "torch": (reference.geglu, False)}
    if not tiny:  # dynamic shapes: one compile per mode for all six shapes
        impls["torch-compile"] = (torch.compile(reference.geglu, dynamic=True), False)
    return impls


def measure(name, impl, label, tokens, F, device, on_gpu):
    fn, takes_bias = impl
    x = torch.randn(tokens, 2 * F, device=device, dtype=torch.bfloat16)
    bias = torch.randn(2 * F, device=device, dtype=torch.bfloat16)
    xg, bias_g = x.clone().requires_grad_(), bias.clone().requires_grad_()
    dy = torch.randn(tokens, F, device=device, dtype=torch.bfloat16)

    def forward():
        return fn(x, bias) if takes_bias else fn(x)

    def forward_backward():  # the gradients of x and of the bias
        if takes_bias:
            return torch.autograd.grad(fn(xg, bias_g), (xg, bias_g), dy)
        dx = torch.autograd.grad(fn(xg), xg, dy)[0]
        return dx, dx.sum(0)  # torch's Linear: the bias gradient from the whole dx

    rows = []
    for mode, run, nbytes in (("fwd", forward, 3 * tokens * F * 2), ("fwd+bwd", forward_backward, 8 * tokens * F * 2)):
        with torch.set_grad_enabled(mode != "fwd"):
            run()  # compiles (torch.compile, Triton) outside the timed region
            eager, graph, why, host = timings(run, tiny=not on_gpu, eager=EAGER, graph=GRAPH)
        row = {"impl": name, "res": label, "tokens": tokens, "F": F, "mode": mode, "bytes": nbytes,
               "graph_error": why, "host_us": host,
               "backend": ck.used_backends()["geglu"] if name == "ck" else "-"}
        rows.append(row | time_fields(eager, graph, "GBps", lambda ms: nbytes / ms / 1e6))
    return rows


def add_ratios(rows, copy_gbps):
    """Fraction of copy bandwidth and speed-up over eager torch, from the graph time where
    there is one, else the eager time."""
    def ms(r):
        return r["graph_ms"] or r["ms"]

    base = {(r["tokens"], r["F"], r["mode"]): ms(r) for r in rows if r["impl"] == "torch"}
    for r in rows:
        r["of_copy"] = (r["graph_GBps"] or r["GBps"]) / copy_gbps
        r["speedup_vs_torch"] = base[(r["tokens"], r["F"], r["mode"])] / ms(r)


def print_table(rows):
    print(f"{'res':6} {'tokens x F':>14} {'mode':8} {'impl':14} {'eager ms':>9} {'graph ms (20-80)':>26} "
          f"{'host us':>8} {'GB/s':>7} {'of copy':>8} {'x torch':>8}")
    for r in rows:
        print(f"{r['res']:6} {r['tokens']:>8}x{r['F']:<5} {r['mode']:8} {r['impl']:14} {r['ms']:9.4f} "
              f"{graph_cell(r):>26} {r['host_us']:8.1f} {fmt(r['graph_GBps'] or r['GBps'], '7.0f')} "
              f"{r['of_copy']:8.0%} {r['speedup_vs_torch']:7.2f}x")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cases = list(dict.fromkeys((r["res"], r["tokens"], r["F"]) for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 1.3 * len(cases)), 7), squeeze=False)
    width = 0.8 / len(impls)
    for ax, mode in zip(axes[:, 0], ("fwd", "fwd+bwd")):
        for i, impl in enumerate(impls):
            mine = {(r["res"], r["tokens"], r["F"]): r["of_copy"] for r in rows if r["impl"] == impl and r["mode"] == mode}
            ax.bar([j + i * width for j, c in enumerate(cases) if c in mine], [mine[c] for c in cases if c in mine],
                   width, label=impl, color=f"C{i}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"{res}\n{tokens}x{F}" for res, tokens, F in cases], fontsize=7)
        ax.set_ylabel("fraction of copy bandwidth")
        ax.set_title(f"GEGLU {mode}, bf16 (higher is better)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/local")
    p.add_argument("--tiny", action="store_true", help="one small shape on the CPU (automatic without a GPU)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new shape after this many seconds")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if on_gpu else "cpu")
    shapes = SHAPES if on_gpu else TINY_SHAPES
    copy_gbps = copy_bandwidth(device, on_gpu)
    impls = implementations(not on_gpu)
    rows, skipped = [], []
    t0 = time.perf_counter()
    for label, tokens, F in tqdm(shapes, desc="shapes"):
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            skipped.append(f"{label} {tokens}x{F}")
            continue
        for name, impl in impls.items():
            rows += measure(name, impl, label, tokens, F, device, on_gpu)
    add_ratios(rows, copy_gbps)
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(f"{device_name}: copy bandwidth {copy_gbps:.0f} GB/s")
    print_table(rows)
    if skipped:
        print(f"skipped for the time budget: {', '.join(skipped)}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "geglu.json"), "w") as f:
        json.dump({"device": device_name, "copy_GBps": copy_gbps, "torch": torch.__version__, "rows": rows,
                   "skipped": skipped}, f, indent=2)
    plot(rows, os.path.join(args.out, "geglu.png"))
    print(f"wrote {args.out}/geglu.json and geglu.png")
    return rows


if __name__ == "__main__":
    main()
