"""What the benchmarks of the transformer blocks' per-token ops (bench_geglu, bench_layer_norm)
share: SD2's (tokens, width) shapes, the command line, the loop over shapes and implementations,
forward and forward+backward timed per case, the ratios, the table, the JSON and the plot.

A benchmark gives a `Bench`: its op's name, the name of its width column ("F", "C"), the
implementation every row is compared with, and measure(impl, fn, label, tokens, width, device,
on_gpu) -> rows, which builds the inputs and calls `time_modes`.
"""
import argparse
import dataclasses
import json
import time
from typing import Callable

import torch
from tqdm import tqdm

import cckernels as ck
from bench_group_norm import copy_bandwidth
from run_info import output_dir, run_meta, save_plot
from timers import fmt, graph_cell, print_missing_graphs, time_fields, timings

# (resolution, tokens): batch x latent positions of SD2's transformer blocks at each of their
# three widths (320, 640, 1280: listed in that order), 256 px at batch 32, 512 px at batch 8
TOKENS = [("256px", 32 * 32 * 32), ("256px", 32 * 16 * 16), ("256px", 32 * 8 * 8),
          ("512px", 8 * 64 * 64), ("512px", 8 * 32 * 32), ("512px", 8 * 16 * 16)]
WIDTHS = [320, 640, 1280] * 2
EAGER, GRAPH = (3, 10), (3, 10)  # do_bench (warmup, rep) ms: ~10 calls of the slowest case


@dataclasses.dataclass
class Bench:
    op: str  # the ck op ("geglu"): names the files, says which backend ran
    title: str  # of the plot
    width: str  # the width column's name
    baseline: str  # the implementation every row's speed-up is over
    shapes: list  # (resolution, tokens, width)
    tiny_shapes: list
    implementations: Callable  # (device, tiny) -> {name: fn}
    measure: Callable  # (name, fn, label, tokens, width, device, on_gpu) -> rows


def time_modes(bench, name, label, tokens, width, runs, on_gpu):
    """One row per (mode, fn, bytes) of `runs`: eager, CUDA-graph and host times, GB/s."""
    rows = []
    for mode, run, nbytes in runs:
        with torch.set_grad_enabled(mode != "fwd"):
            run()  # compiles (torch.compile, Triton) outside the timed region
            eager, graph, why, host = timings(run, tiny=not on_gpu, eager=EAGER, graph=GRAPH)
        row = {"impl": name, "res": label, "tokens": tokens, bench.width: width, "mode": mode, "bytes": nbytes,
               "graph_error": why, "host_us": host, "backend": ck.used_backends()[bench.op] if name == "ck" else "-"}
        rows.append(row | time_fields(eager, graph, "GBps", lambda ms: nbytes / ms / 1e6))
    return rows


def add_ratios(bench, rows, copy_gbps):
    """Fraction of copy bandwidth, from the graph time where there is one, else the eager time,
    and the speed-up over the baseline row of the same shape and mode: the graph times where
    both rows have one, else the eager times (never one of each)."""
    base = {(r["tokens"], r[bench.width], r["mode"]): r for r in rows if r["impl"] == bench.baseline}
    for r in rows:
        r["of_copy"] = (r["graph_GBps"] or r["GBps"]) / copy_gbps
        b = base[(r["tokens"], r[bench.width], r["mode"])]
        timing = "graph_ms" if r["graph_ms"] and b["graph_ms"] else "ms"
        r["speedup_vs_baseline"] = b[timing] / r[timing]


def print_table(bench, rows):
    w = bench.width
    print(f"{'res':6} {'tokens x ' + w:>14} {'mode':8} {'impl':14} {'eager ms':>9} {'graph ms (20-80)':>26} "
          f"{'host us':>8} {'GB/s':>7} {'of copy':>8} {'x ' + bench.baseline:>16}")
    for r in rows:
        print(f"{r['res']:6} {r['tokens']:>8}x{r[w]:<5} {r['mode']:8} {r['impl']:14} {r['ms']:9.4f} "
              f"{graph_cell(r):>26} {r['host_us']:8.1f} {fmt(r['graph_GBps'] or r['GBps'], '7.0f')} "
              f"{r['of_copy']:8.0%} {r['speedup_vs_baseline']:15.2f}x")


def plot(bench, rows, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cases = list(dict.fromkeys((r["res"], r["tokens"], r[bench.width]) for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 1.3 * len(cases)), 7), squeeze=False)
    bar = 0.8 / len(impls)
    for ax, mode in zip(axes[:, 0], ("fwd", "fwd+bwd")):
        for i, impl in enumerate(impls):
            mine = {(r["res"], r["tokens"], r[bench.width]): r["of_copy"] for r in rows
                    if r["impl"] == impl and r["mode"] == mode}
            ax.bar([j + i * bar for j, c in enumerate(cases) if c in mine], [mine[c] for c in cases if c in mine],
                   bar, label=impl, color=f"C{i}")
        ax.set_xticks([j + 0.4 - bar / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"{res}\n{tokens}x{width}" for res, tokens, width in cases], fontsize=7)
        ax.set_ylabel("fraction of copy bandwidth")
        ax.set_title(f"{bench.title} {mode}, bf16 (higher is better)", fontsize=9)
        ax.legend(fontsize=7)
    save_plot(fig, path, meta)


def main(bench, doc, argv=None):
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/local")
    p.add_argument("--tiny", action="store_true", help="one small shape on the CPU (automatic without a GPU)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new shape after this many seconds")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if on_gpu else "cpu")
    out = output_dir(args.out)
    copy_gbps = copy_bandwidth(device, on_gpu)
    impls = bench.implementations(device, not on_gpu)
    rows, skipped = [], []
    t0 = time.perf_counter()
    for i, (label, tokens, width) in enumerate(tqdm(bench.shapes if on_gpu else bench.tiny_shapes, desc="shapes")):
        if i and args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:  # the first always runs
            skipped.append(f"{label} {tokens}x{width}")
            continue
        for name, fn in impls.items():
            rows += bench.measure(name, fn, label, tokens, width, device, on_gpu)
    add_ratios(bench, rows, copy_gbps)
    meta = run_meta(device)
    print(f"{meta['device']}: copy bandwidth {copy_gbps:.0f} GB/s")
    print_table(bench, rows)
    print_missing_graphs(rows, lambda r: f"{r['impl']} {r['mode']}")  # their "of copy" is eager time
    if skipped:
        print(f"skipped for the time budget: {', '.join(skipped)}")
    (out / f"{bench.op}.json").write_text(json.dumps({**meta, "copy_GBps": copy_gbps, "baseline": bench.baseline,
                                                      "rows": rows, "skipped": skipped}, indent=2))
    plot(bench, rows, out / f"{bench.op}.png", meta)
    print(f"wrote {out / f'{bench.op}.json'} and {out / f'{bench.op}.png'}")
    return rows
