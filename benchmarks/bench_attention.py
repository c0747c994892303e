"""Attention benchmark: our Triton kernel against every PyTorch SDPA backend, on SD2 shapes.

    python benchmarks/bench_attention.py [--out benchmarks/results/local] [--tiny]

Shapes are those of the SD2 UNet (head dim 64; 5/10/20/20 heads at the 320/640/1280-channel
levels and the mid block), bf16, at both training resolutions:
  512 px (64x64 latents): self-attention L = 4096, 1024, 256, 64, batch 8 per GPU
  256 px (32x32 latents): self-attention L = 1024, 256, 64, 16, batch 32 per GPU
and cross-attention of the same queries against Lk = 77 text tokens. The batches are realistic
per-GPU training micro-batches (MosaicML's SD2 run: 2048 images on 128 A100s = 16 per GPU at
256 px; an 80 GB H100 takes twice that, and 512 px has 4x the pixels); change them with
--batch-256 / --batch-512.

FLOPs: forward 4 * B * H * Lq * Lk * D (two matmuls); backward 2.5x the forward (five
matmuls, one of them the recomputed scores); forward+backward 3.5x. The same count for both
of our backward variants, so their TFLOP/s compare directly: "triton atomic-dQ" (5 matmuls,
dQ accumulated with fp32 atomics) and "triton deterministic" (7 matmuls, no atomics), chosen
with CCKERNELS_DETERMINISTIC for each fwd+bwd row; the forward is the same kernel ("triton").
The cross-attention shapes (77 keys, bf16, head dim 64) on sm90 take neither: whatever the
flag, one kernel gives dQ, dK and dV (STORE_DQ in cckernels/triton/attention.py). Their second
row is "triton 4 waves" instead: that kernel with its query loop split for about 4 programs
an SM instead of 1 (CCKERNELS_ATTENTION_SPLIT_WAVES=4), each split adding fp32 dK/dV partials
to write and sum.

Peers, each only when it runs: torch SDPA with each of its flash, efficient and cuDNN backends
(forced with torch.nn.attention.sdpa_kernel, fed the transposed BLHD views a UNet passes),
flash-attn and xformers (BLHD, as ours), and the plain-PyTorch reference that materializes the
scores.

Every row, ours and the peers' alike, is timed three ways (benchmarks/timers.py): "eager ms",
the call as a training step makes it (below about 1 ms this is mostly the host's time to
enqueue the call, not the GPU's); "graph ms", the same call captured in a CUDA graph and
replayed, the GPU's time alone; "host us", the host's time to enqueue one call. Times are
medians with 20/80 % quantiles of triton.testing.do_bench (L2 flushed before each call).
TFLOP/s in the table come from the graph time; the JSON keeps both ("tflops" eager,
"graph_tflops"), as it keeps both speed-ups. A backend that cannot be captured gets no graph
time, and its reason in "graph_error". The shapes run in the order above (512 px first), and
--budget-s starts no shape after that many seconds. --tiny (automatic without a GPU) runs the
same code on tiny fp32 shapes in seconds, Triton in its interpreter, without the graph timing.
"""
import argparse
import contextlib
import json
import os
import time

import torch
import torch.nn.functional as F
from run_info import at_least, output_dir, run_meta, save_plot
from timers import fmt, graph_cell, host_times, print_host_times, print_missing_graphs, time_fields, timings

HEADS = {0: 5, 1: 10, 2: 20, 3: 20}  # UNet level -> heads of dim 64 (SD2)
# fwd+bwd rows of the "triton" backend, one per backward variant: name -> (the environment it
# runs in, whether it runs for short keys, whether for long ones). The first is the default
# variant (DETERMINISTIC_BY_DEFAULT), the one "ours x" compares. Short keys (one key block:
# cross-attention's 77) take one kernel whatever CCKERNELS_DETERMINISTIC says, so instead of an
# atomic-dQ row they get one whose dK/dV query loop is split for 4 programs an SM instead of
# 1 (CCKERNELS_ATTENTION_SPLIT_WAVES): whether more programs pay for their partial sums.
TRITON_BACKWARDS = {
    "triton deterministic": ({"CCKERNELS_DETERMINISTIC": "1"}, True, True),
    "triton atomic-dQ": ({"CCKERNELS_DETERMINISTIC": "0"}, False, True),
    "triton 4 waves": ({"CCKERNELS_DETERMINISTIC": "1", "CCKERNELS_ATTENTION_SPLIT_WAVES": "4"}, True, False),
}
# do_bench (warmup, rep) milliseconds of each timing: 25 ms of repetitions is 15 calls of the
# slowest case (L=4096 forward+backward, ~1.6 ms on the H200) and hundreds of the short ones
# (do_bench's default is 100 ms), so that the GPU visit's budget reaches the shorter lengths
EAGER, GRAPH = (5, 25), (5, 25)


def sd2_shapes(batch_256, batch_512):
    """(name, B, Lq, Lk, H, D): self- and cross-attention at every attention level."""
    shapes = []
    for px, batch, side in ((512, batch_512, 64), (256, batch_256, 32)):
        for level, heads in HEADS.items():
            L = (side >> level) ** 2
            shapes.append((f"{px}px self L={L}", batch, L, L, heads, 64))
            shapes.append((f"{px}px cross L={L}", batch, L, 77, heads, 64))
    return shapes


# self with more keys than one block (the atomic-dQ row), cross with fewer (the 4-waves row)
TINY_SHAPES = [("tiny self L=130", 1, 130, 130, 2, 32), ("tiny cross L=16", 1, 16, 7, 2, 32)]


def flops(B, Lq, Lk, H, D, backward):
    fwd = 4 * B * H * Lq * Lk * D
    return fwd * 3.5 if backward else fwd


def peers():
    """name -> fn(q, k, v) on BLHD tensors; peers that do not import are left out."""
    import cckernels as ck
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)

        return run

    fns = {
        "triton": lambda q, k, v: ck.attention(q, k, v, backend="triton"),
        "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "torch-reference": lambda q, k, v: ck.attention(q, k, v, backend="torch"),
    }
    try:
        from flash_attn import flash_attn_func

        fns["flash-attn"] = flash_attn_func
    except ImportError:
        pass
    try:
        from xformers.ops import memory_efficient_attention

        fns["xformers"] = memory_efficient_attention
    except ImportError:
        pass
    return fns


@contextlib.contextmanager
def env(values):
    """Set os.environ[name] = value for each of values for the duration of the block."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def measure(fns, shapes, device, dtype, tiny, budget_s=None, save=None):
    """Rows for every shape, backend and pass; with budget_s, no shape after the first starts
    after that many seconds. save(rows) after each shape keeps what was measured if the run is
    cut short (the first autotuning of a shape compiles dozens of configs)."""
    import cckernels as ck
    from cckernels.triton.attention import MAX_ONE_BLOCK_KEYS

    rows, t_start = [], time.perf_counter()
    for i, (name, B, Lq, Lk, H, D) in enumerate(shapes):
        if i and budget_s is not None and time.perf_counter() - t_start > budget_s:
            print(f"time budget of {budget_s:.0f} s spent: not measured: {', '.join(s[0] for s in shapes[i:])}")
            break
        q = torch.randn(B, Lq, H, D, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(B, Lk, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        dout = torch.randn_like(q)
        for backend, fn in fns.items():
            try:
                fn(q, k, v).backward(dout)
            except (RuntimeError, NotImplementedError) as e:
                print(f"  skip {backend} on {name}: {str(e).splitlines()[0][:100]}")
                continue
            if backend == "triton" and ck.used_backends()["attention"] != "triton":
                print(f"  skip triton on {name}: it fell back to {ck.used_backends()['attention']}")
                continue
            # (backward, row label, environment): triton's fwd+bwd once per variant of this length
            short = Lk <= MAX_ONE_BLOCK_KEYS
            backwards = [(True, label, variables) for label, (variables, for_short, for_long) in TRITON_BACKWARDS.items()
                         if (for_short if short else for_long)] if backend == "triton" else [(True, backend, {})]
            runs = [(False, backend, {}), *backwards]
            for backward, label, variables in runs:
                if backward:
                    timed = lambda: fn(q, k, v).backward(dout)  # noqa: E731
                else:
                    timed = lambda: fn(q, k, v)  # noqa: E731
                # the graph is captured under the same grad mode and backward variant
                with torch.set_grad_enabled(backward), env(variables):
                    chosen_configs()  # forget earlier launches
                    eager, graph, why, host = timings(timed, tiny, grads=[q, k, v], eager=EAGER, graph=GRAPH)
                row = {"shape": name, "B": B, "Lq": Lq, "Lk": Lk, "H": H, "D": D, "backend": label,
                       "pass": "fwd+bwd" if backward else "fwd", "graph_error": why, "host_us": host}
                if ours(label):
                    row["configs"] = chosen_configs()
                rate = lambda ms: flops(B, Lq, Lk, H, D, backward) / (ms * 1e-3) / 1e12  # noqa: E731
                rows.append(row | time_fields(eager, graph, "tflops", rate))
        if save is not None:
            save(rows)
    return rows


def chosen_configs():
    """{kernel: "BLOCK_MxBLOCK_N wWARPS sSTAGES"} of our Triton attention kernels launched since
    the last call: what the autotuner chose (or, with CCKERNELS_AUTOTUNE=0, the first config of
    the pool that fits), to order the pools by (their first fitting config is what
    deterministic and CCKERNELS_AUTOTUNE=0 runs take, bench_train's included)."""
    from cckernels.triton import attention

    chosen = {}
    for name in ("fwd", "dkdv", "dq"):
        launcher = getattr(attention, f"_{name}_launch")
        if launcher.last is not None:
            m = launcher.last
            chosen[name] = f"{m['BLOCK_M']}x{m['BLOCK_N']} w{m.get('num_warps')} s{m.get('num_stages')}"
        launcher.last = None
    return chosen


def ours(backend):
    return backend == "triton" or backend in TRITON_BACKWARDS


TIMINGS = ("", "graph_")  # prefixes of the eager and the graph fields (ms, tflops, speedup_vs, ...)


def summarize(rows):
    """Per shape, pass and triton row (the forward; each backward variant), in each timing:
    its speed-up over each peer and over the best SDPA backend (None where either side has no
    time in that timing)."""
    summary = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for pass_ in ("fwd", "fwd+bwd"):
            group = {r["backend"]: r for r in rows if r["shape"] == shape and r["pass"] == pass_}
            for name, mine in group.items():
                if not ours(name):
                    continue
                entry = {"shape": shape, "pass": pass_, "backend": name}
                for prefix in TIMINGS:
                    key = f"{prefix}ms"
                    vs = {} if mine[key] is None else {
                        b: r[key] / mine[key] for b, r in group.items() if not ours(b) and r[key] is not None
                    }
                    sdpa = [x for b, x in vs.items() if b.startswith("sdpa")]
                    entry[f"{prefix}tflops"] = mine[f"{prefix}tflops"]
                    entry[f"{prefix}speedup_vs"] = vs
                    entry[f"{prefix}speedup_vs_best_sdpa"] = min(sdpa) if sdpa else None
                summary.append(entry)
    return summary


def targets(summary):
    """Issue 3's H100 targets checked on this run, for each backward variant, on the eager and
    on the graph time: [(target, met eager, met graph)], None where that time is missing."""

    def met(value, need):
        return None if value is None else value >= need

    checks = []
    for s in summary:
        label = f"{s['shape']} {s['pass']} {s['backend']}"
        if "self L=4096" in s["shape"] and s["pass"] == "fwd+bwd":
            checks.append((f"{label} >= 300 TFLOP/s", met(s["tflops"], 300), met(s["graph_tflops"], 300)))
        if s["speedup_vs_best_sdpa"] is not None or s["graph_speedup_vs_best_sdpa"] is not None:
            need = 1.2 if "cross" in s["shape"] else 1.0
            checks.append((f"{label} >= {need}x best SDPA", met(s["speedup_vs_best_sdpa"], need),
                           met(s["graph_speedup_vs_best_sdpa"], need)))
    return checks


def status(met):
    return "-" if met is None else "met" if met else "MISS"


def print_table(rows, summary, hosts, checks):
    """Every row; "x eager" and "x graph" are the forward's, or the default (deterministic)
    backward's, speed-up over that row in each timing; TFLOP/s from the graph time."""
    print(f"{'shape':<22}{'pass':<9}{'backend':<22}{'eager ms':>9}{'graph ms (q20-q80)':>26}{'host us':>9}"
          f"{'TFLOP/s':>9}{'x eager':>9}{'x graph':>9}")
    reference = {"fwd": "triton", "fwd+bwd": next(iter(TRITON_BACKWARDS))}
    mine = {(s["shape"], s["pass"]): s for s in summary if s["backend"] == reference[s["pass"]]}
    for r in rows:
        s = mine.get((r["shape"], r["pass"]), {})
        print(f"{r['shape']:<22}{r['pass']:<9}{r['backend']:<22}{r['ms']:>9.4f}{graph_cell(r):>26}{r['host_us']:>9.1f}"
              f"{fmt(r['graph_tflops'], '.1f'):>9}{fmt(s.get('speedup_vs', {}).get(r['backend']), '.2f', ''):>9}"
              f"{fmt(s.get('graph_speedup_vs', {}).get(r['backend']), '.2f', ''):>9}")
    print_missing_graphs(rows, lambda r: f"{r['backend']} {r['pass']}")
    print("\nour kernels' block shapes (BLOCK_M x BLOCK_N, warps, stages) as launched:")
    for r in rows:
        if r.get("configs"):
            print(f"  {r['shape']:<22}{r['pass']:<9}{r['backend']:<22}" + ", ".join(f"{k} {v}" for k, v in r["configs"].items()))
    print("\ntriton vs best SDPA backend (time ratio, >1 = ours faster; TFLOP/s from the graph time):")
    for s in summary:
        print(f"  {s['shape']:<22}{s['pass']:<9}{s['backend']:<22}{fmt(s['graph_tflops'], '>7.1f', '      -')} TFLOP/s  "
              f"eager {fmt(s['speedup_vs_best_sdpa'], '.2f', 'n/a')}  graph {fmt(s['graph_speedup_vs_best_sdpa'], '.2f', 'n/a')}")
    print()
    print_host_times(hosts)
    if checks:
        print("\ntargets (H100), eager / graph time:")
    for target, eager, graph in checks:
        print(f"  {status(eager):<5}{status(graph):<5}{target}")


def plot(rows, path, meta):
    """TFLOP/s from the graph time; hatched bars: the eager time, where there is no graph time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(shapes) * 0.9), 8), sharex=True)
    width = 0.8 / len(backends)
    for ax, pass_ in zip(axes, ("fwd", "fwd+bwd")):
        for i, backend in enumerate(backends):
            mine = [(j, r) for j, s in enumerate(shapes) for r in rows
                    if r["shape"] == s and r["backend"] == backend and r["pass"] == pass_]
            if not mine:  # the triton rows: the forward, or a backward variant
                continue
            bars = ax.bar([j + i * width for j, _ in mine], [r["graph_tflops"] or r["tflops"] for _, r in mine], width,
                          label=backend, color=f"C{i}")
            for bar, (_, r) in zip(bars, mine):
                bar.set_hatch("" if r["graph_tflops"] else "//")
        ax.set_ylabel(f"{pass_} TFLOP/s")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("TFLOP/s from CUDA-graph time (hatched: eager time, no graph time)")
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    axes[1].set_xticklabels(shapes, rotation=45, ha="right", fontsize=8)
    save_plot(fig, path, meta)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/local")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU in seconds (default without a GPU)")
    parser.add_argument("--batch-256", type=at_least(1), default=32, help="batch of the 256 px shapes (default 32)")
    parser.add_argument("--batch-512", type=at_least(1), default=8, help="batch of the 512 px shapes (default 8)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no shape after this many seconds")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help='only the shapes whose name holds one of these, '
                        'e.g. --only "256px cross"')
    args = parser.parse_args()

    tiny = args.tiny or not torch.cuda.is_available()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the Triton kernels are first imported
    # fp32 on CPU: the interpreter's bf16 tl.dot is broken (triton-lang/triton#11584).
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = TINY_SHAPES if tiny else sd2_shapes(args.batch_256, args.batch_512)
    if args.only:
        shapes = [s for s in shapes if any(text in s[0] for text in args.only)]
        if not shapes:
            parser.error(f"--only {args.only}: no shape matches; names look like '256px cross L=1024', 'tiny self L=130'")
    torch.manual_seed(0)
    out = output_dir(args.out)
    meta = {
        **run_meta(device), "dtype": str(dtype).removeprefix("torch."),
        **({} if device == "cuda" else {"device": "cpu (Triton interpreter)"}),
        "flops": "fwd 4*B*H*Lq*Lk*D; fwd+bwd 3.5x that (both backward variants)",
        "timing": "3 wall-clock runs (tiny); no graph time" if tiny else
                  "triton.testing.do_bench median, 20/80 quantiles, L2 flushed: eager calls (ms), and replays of "
                  "each call captured in a CUDA graph (graph_ms); host_us: median host time to enqueue one call",
    }

    def save(rows):
        summary, hosts = summarize(rows), host_times(rows, "backend", "pass", ours)
        checks = [] if tiny else targets(summary)
        (out / "attention.json").write_text(json.dumps({**meta, "rows": rows, "summary": summary, "host": hosts,
                                                        "targets": checks}, indent=1))  # fmt: skip
        plot(rows, out / "attention.png", meta)
        return summary, hosts, checks

    rows = measure(peers(), shapes, device, dtype, tiny, args.budget_s, save)
    print_table(rows, *save(rows))
    print(f"\nwrote {out / 'attention.json'} and {out / 'attention.png'} ({meta['device']})")


if __name__ == "__main__":
    main()
