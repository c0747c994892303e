"""GroupNorm + SiLU on SD2 training shapes: ours against the ways PyTorch runs it.

    python benchmarks/bench_group_norm.py [--out DIR] [--tiny]

Bytes moved (the minimum any implementation must move; weights and statistics are ignored):
    forward              read x, write y                      2 * numel * itemsize
    forward + backward   forward, then read x, dy, write dx   5 * numel * itemsize
with itemsize of the bf16 input. GB/s = bytes / median time; "of copy" divides it by the
device-to-device copy bandwidth measured here (dst.copy_(src) on a 1 GiB tensor, 2 bytes
moved per byte copied), "same-size" by that of the "copy" row of the same case (x.clone(),
forward only: the forward's bytes), the roofline at that size: a 5-40 MB tensor is copied in
10-30 us, where ramp-up, tail and launch keep even a copy below the 1 GiB rate.

Every case, ours and the peers' alike, is timed three ways (benchmarks/timers.py): "eager ms",
the call as a training step makes it (at these sizes mostly the host's time to enqueue the
call); "graph ms", the same call captured in a CUDA graph and replayed, the GPU's time alone;
"host us", the host's time to enqueue one call. Times are medians with 20/80 % quantiles from
triton.testing.do_bench (L2 flushed before each call). GB/s, "of copy" and the speed-ups in the
table come from the graph time; the JSON keeps both timings (GBps, of_copy,
speedup_vs_autocast: eager; graph_GBps, graph_of_copy, graph_speedup_vs_autocast: graph). A
case that cannot be captured has no graph time, and its reason in "graph_error".

Peers: torch eager under autocast (bf16 x and fp32 parameters: autocast runs group_norm in
fp32 and SiLU as a second fp32 pass), plain bf16 eager, torch.compile of the bf16 eager code,
and apex's contrib GroupNorm (channels_last only) when it imports. --tiny (automatic without a
GPU) runs one tiny shape on the CPU with a wall-clock timer and no graph time, so a test can
smoke-run the script.
The "forward" column says which of our forwards ran: "single-pass" (each group read once),
"cluster-K" (CUDA on sm90: the same, each group staged by a cluster of K blocks) or "split"
(three passes, x read twice), as the backend's group_norm_forward_path reports it; a backend
name when ours fell back to it; "-" for the peers. The "backward" column says the same of the
CUDA backward on fwd+bwd rows (cuda.group_norm_backward_path: a single pass reads x and dy
once, "split" twice each); "-" elsewhere. The rows ck-triton-split and ck-cuda-split force the
split forward (and CUDA's split backward) where the backend would take a single pass, to
measure what the single passes gain. Cases run shape by shape, every implementation of a shape together, torch.compile
(one compile per case) after all the others: --budget-s cuts whole shapes, then torch.compile.
The JSON is rewritten after every case, so a run killed by an outer time limit keeps its rows.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cckernels as ck
from cckernels import cuda as ck_cuda
from cckernels.triton import group_norm as ck_triton_group_norm
from run_info import output_dir, run_meta, save_plot
from timers import eager_ms, fmt, graph_cell, host_times, print_host_times, print_missing_graphs, time_fields, timings

GROUPS = 32
# (batch, channels, latent side): SD2 UNet GroupNorm inputs, encoder and decoder (whose
# resnets see the skip-concatenated channels 640 ... 2560); 256 px -> 32x32 latents, 512 -> 64.
# First (a short --budget-s keeps it): the larger micro-batch of 256 px training on one H100
# (bench_train's "+ larger micro-batch" fits about 256 there), where steps are GPU-bound and the
# backends' GPU times, not their host times, decide which one a step should call.
SHAPES = {
    "256px-b256": [(256, 320, 32), (256, 640, 16), (256, 1280, 8)],
    "256px": [(32, 320, 32), (32, 640, 16), (32, 1280, 8), (32, 1280, 4), (32, 2560, 8), (32, 1920, 16), (32, 960, 32)],
    "512px": [(8, 320, 64), (8, 640, 32), (8, 1280, 16), (8, 1280, 8), (8, 2560, 16), (8, 1920, 32), (8, 960, 64)],
}
TINY_SHAPES = {"tiny": [(2, 64, 4)]}


# do_bench (warmup, rep) milliseconds of each timing: 10 ms of repetitions is ten calls of the
# slowest case (autocast forward+backward, ~1 ms) to a thousand of the fastest (do_bench's
# default is 100 ms), so that the GPU visit's budget covers more shapes: each shape has about
# ten cases (ours, the split twins, the peers) in two modes and three timings
EAGER, GRAPH = (3, 10), (3, 10)


def copy_bandwidth(device, on_gpu):
    """Device-to-device copy GB/s (bytes read + bytes written)."""
    numel = (1 << 30) // 4 if on_gpu else 1 << 20
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    ms = eager_ms(copy, 10, 40)[0] if on_gpu else timings(copy, tiny=True)[0][0]
    return 2 * src.numel() * src.element_size() / ms / 1e6


def eager_silu_group_norm(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b))


def peers(device, tiny):
    """name -> (fn(x, w, b) -> y, parameter dtype, layouts it takes). Only those that import."""
    out = {}
    if not tiny:
        out["ck-triton"] = (lambda x, w, b: ck.group_norm(x, GROUPS, w, b, activation="silu", backend="triton"),
                            torch.float32, ("nchw", "nhwc"))
        if "cuda" in ck.available_backends(device)["group_norm"]:
            out["ck-cuda"] = (lambda x, w, b: ck.group_norm(x, GROUPS, w, b, activation="silu", backend="cuda"),
                              torch.float32, ("nhwc",))
        out["ck-triton-split"] = (forced_split("triton", ck_triton_group_norm, "SINGLE_PASS_BYTES", 0),
                                  torch.float32, ("nchw", "nhwc"))
        if "ck-cuda" in out:
            out["ck-cuda-split"] = (forced_split("cuda", ck_cuda, "SINGLE_PASS", False), torch.float32, ("nhwc",))
    else:
        out["ck-default"] = (lambda x, w, b: ck.group_norm(x, GROUPS, w, b, activation="silu"),
                             torch.float32, ("nchw", "nhwc"))

    def autocast(x, w, b):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return eager_silu_group_norm(x, w, b)

    out["torch-autocast"] = (autocast, torch.float32, ("nchw", "nhwc"))
    out["copy"] = (lambda x, w, b: x.clone(), torch.bfloat16, ("nchw", "nhwc"))  # the forward's bytes: its roofline
    out["torch-bf16"] = (eager_silu_group_norm, torch.bfloat16, ("nchw", "nhwc"))
    if not tiny:
        out["torch-compile"] = (torch.compile(eager_silu_group_norm, dynamic=False), torch.bfloat16, ("nchw", "nhwc"))
        try:
            from apex.contrib.group_norm import GroupNorm as ApexGroupNorm
        except ImportError:
            pass
        else:
            modules = {}

            def apex(x, w, b):
                C = x.shape[1]
                if C not in modules:
                    m = ApexGroupNorm(GROUPS, C, act="silu").to(device=device, dtype=w.dtype)
                    del m.weight, m.bias  # the case's w and b go in as plain attributes below
                    modules[C] = m
                m = modules[C]
                # no copy into the module's own parameters: that would add two kernels to each
                # timed call and cut the graph from w and b (their grads failed in fwd+bwd)
                m.weight, m.bias = w, b
                return m(x)

            out["apex"] = (apex, torch.float32, ("nhwc",))
    return out


def forced_split(backend, module, setting, split_value):
    """ck.group_norm on `backend` with module.setting = split_value during the call: the split forward."""

    def fn(x, w, b):
        default = getattr(module, setting)
        setattr(module, setting, split_value)
        try:
            return ck.group_norm(x, GROUPS, w, b, activation="silu", backend=backend)
        finally:
            setattr(module, setting, default)

    return fn


def forward_path(name, x):
    """Which forward of ours ran last for x (see the module docstring)."""
    if not name.startswith("ck-"):
        return "-"
    if name.endswith("-split"):
        return "split"
    backend = ck.used_backends()["group_norm"]
    module = {"triton": ck_triton_group_norm, "cuda": ck_cuda}.get(backend)
    return module.group_norm_forward_path(x, GROUPS) if module else backend


def backward_path(name, x, mode):
    """Which CUDA backward ran for x on a fwd+bwd row (see the module docstring)."""
    if mode != "fwd+bwd" or not name.startswith("ck-cuda") or ck.used_backends()["group_norm"] != "cuda":
        return "-"
    return "split" if name.endswith("-split") else ck_cuda.group_norm_backward_path(x, GROUPS)


def measure(name, fn, param_dtype, shape, layout, device, on_gpu):
    N, C, side = shape
    x = torch.randn(N, C, side, side, device=device, dtype=torch.bfloat16)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(C, device=device, dtype=param_dtype)
    b = torch.randn(C, device=device, dtype=param_dtype)
    xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, w, b))
    if name == "torch-compile":
        torch._dynamo.reset()  # a fresh graph per case: 28 shapes would pass dynamo's recompile limit
    try:
        dy = torch.randn_like(fn(xg, wg, bg))
    except (RuntimeError, ValueError, AssertionError, NotImplementedError) as e:  # a peer that cannot take it
        tqdm.write(f"  {name} skipped {shape} {layout}: {str(e).splitlines()[0][:100]}")
        return []
    if name in ("ck-cuda", "ck-cuda-split") and ck.used_backends()["group_norm"] != "cuda":
        return []
    if name.endswith("-split") and forward_path(name.removesuffix("-split"), x) == "split":
        return []  # the backend's own row is this one already
    path = forward_path(name, x)
    bytes_fwd = 2 * x.numel() * x.element_size()
    rows = []
    modes = (
        ("fwd", lambda: fn(x, w, b), bytes_fwd),
        # autograd.grad, not backward(): .grad accumulation would add a read-add-write of dx per call
        ("fwd+bwd", lambda: torch.autograd.grad(fn(xg, wg, bg), (xg, wg, bg), dy), bytes_fwd * 5 // 2),
    )
    for mode, run, nbytes in modes[:1] if name == "copy" else modes:  # a copy has no backward
        with torch.set_grad_enabled(mode != "fwd"):  # the graph is captured in the same mode
            run()  # compiles (torch.compile, Triton) outside the timed region
            eager, graph, why, host = timings(run, tiny=not on_gpu, eager=EAGER, graph=GRAPH)
        row = {"impl": name, "forward": path, "backward": backward_path(name, x, mode), "shape": [N, C, side, side],
               "layout": layout, "mode": mode, "bytes": nbytes, "graph_error": why, "host_us": host}
        rows.append(row | time_fields(eager, graph, "GBps", lambda ms: nbytes / ms / 1e6))
    return rows


def plot(rows, copy_gbps, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["fwd", "fwd+bwd"]
    impls = sorted({r["impl"] for r in rows})
    cases = sorted({(tuple(r["shape"]), r["layout"]) for r in rows})
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(8, len(cases) * 0.9), 8), squeeze=False)
    width = 0.8 / max(1, len(impls))
    for ax, mode in zip(axes[:, 0], modes):
        for i, impl in enumerate(impls):
            mine = [(j, r) for j, case in enumerate(cases) for r in rows
                    if (tuple(r["shape"]), r["layout"]) == case and r["impl"] == impl and r["mode"] == mode]
            if not mine:
                continue
            bars = ax.bar([j + i * width for j, _ in mine], [(r["graph_GBps"] or r["GBps"]) / copy_gbps for _, r in mine],
                          width, label=impl, color=f"C{i}")
            for bar, (_, r) in zip(bars, mine):
                bar.set_hatch("" if r["graph_GBps"] else "//")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"{'x'.join(map(str, s))}\n{l}" for s, l in cases], fontsize=7)
        ax.set_ylabel("fraction of copy bandwidth")
        ax.set_title(f"GroupNorm+SiLU {mode}, bf16, from the CUDA-graph time (hatched: eager time, no graph time)")
        ax.legend(fontsize=7)
    save_plot(fig, path, meta)


def add_ratios(rows, copy_gbps):
    """Each row's fraction of copy bandwidth (of the 1 GiB copy's, and of the same-size copy's
    rate: x.clone() of the same shape and layout, which tiny tensors cannot run at full speed
    either) and speed-up over torch-autocast, in both timings (None where a time is missing)."""
    for prefix in ("", "graph_"):  # eager, graph
        base = {(tuple(r["shape"]), r["layout"], r["mode"]): r[f"{prefix}ms"] for r in rows if r["impl"] == "torch-autocast"}
        same_size = {(tuple(r["shape"]), r["layout"]): r[f"{prefix}GBps"] for r in rows if r["impl"] == "copy"}
        for r in rows:
            mine, theirs = r[f"{prefix}ms"], base.get((tuple(r["shape"]), r["layout"], r["mode"]))
            copy_here = same_size.get((tuple(r["shape"]), r["layout"]))
            r[f"{prefix}of_copy"] = None if mine is None else r[f"{prefix}GBps"] / copy_gbps
            r[f"{prefix}of_same_size_copy"] = None if mine is None or not copy_here else r[f"{prefix}GBps"] / copy_here
            r[f"{prefix}speedup_vs_autocast"] = None if mine is None or theirs is None else theirs / mine


def print_table(rows):
    """Every row: both times and the host time; GB/s and "of copy" from the graph time; the
    speed-up over torch-autocast in both timings."""
    print(f"{'res':10} {'shape':>18} {'layout':6} {'mode':8} {'impl':15} {'forward':11} {'backward':11} {'eager ms':>9} "
          f"{'graph ms (q20-q80)':>26} {'host us':>8} {'GB/s':>7} {'of copy':>7} {'same-size':>9} {'vs autocast eager':>17} "
          f"{'graph':>6}")
    for r in rows:
        print(f"{r['res']:10} {'x'.join(map(str, r['shape'])):>18} {r['layout']:6} {r['mode']:8} {r['impl']:15} {r['forward']:11} "
              f"{r['backward']:11} {r['ms']:9.4f} {graph_cell(r):>26} {r['host_us']:8.1f} {fmt(r['graph_GBps'], '.1f'):>7} "
              f"{fmt(r['graph_of_copy'], '.2f'):>7} {fmt(r['graph_of_same_size_copy'], '.2f'):>9} "
              f"{fmt(r['speedup_vs_autocast'], '.2f', suffix='x'):>17} "
              f"{fmt(r['graph_speedup_vs_autocast'], '.2f', suffix='x'):>6}")
    print_missing_graphs(rows, lambda r: f"{r['impl']} {r['layout']} {r['mode']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/local", help="directory for JSON and PNG")
    parser.add_argument("--tiny", action="store_true", help="one tiny CPU shape (automatic without a GPU)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    parser.add_argument("--impls", nargs="+", help="only these implementations (names as in the table), e.g. "
                        "torch-compile, which a short budget cuts; torch-autocast, the 'vs autocast' baseline, "
                        "always runs")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if on_gpu else "cpu")
    tiny = not on_gpu
    out = output_dir(args.out)
    copy_gbps = copy_bandwidth(device, on_gpu)
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"device: {name}; device-to-device copy: {copy_gbps:.0f} GB/s")
    impls = peers(device, tiny)
    if args.impls:
        unknown = sorted(set(args.impls) - set(impls))
        if unknown:
            parser.error(f"--impls {' '.join(unknown)}: not available here; available: {', '.join(impls)}")
        impls = {k: v for k, v in impls.items() if k in args.impls or k == "torch-autocast"}
    # Shape by shape, so that a short budget cuts whole shapes (every row of a measured shape
    # has its peers); torch.compile, which compiles once per case, after all the others.
    cases = sorted(((impl, fn, param_dtype, res, shape, layout)
                    for res, shapes in (TINY_SHAPES if tiny else SHAPES).items() for shape in shapes
                    for layout in ("nhwc", "nchw")
                    for impl, (fn, param_dtype, layouts) in impls.items() if layout in layouts),
                   key=lambda case: case[0] == "torch-compile")
    result = {**run_meta(device), "copy_GBps": copy_gbps, "dtype": "bfloat16", "groups": GROUPS,
              "bytes": {"fwd": "2 * numel * itemsize", "fwd+bwd": "5 * numel * itemsize"},
              "timing": "3 wall-clock runs (tiny); no graph time" if tiny else
                        "triton.testing.do_bench median, 20/80 quantiles, L2 flushed: eager calls (ms), and replays "
                        "of each call captured in a CUDA graph (graph_ms); host_us: median host time to enqueue one call",
              "rows": [], "host": None, "not_measured": []}

    def save():  # after every case: a run killed by its caller's time limit keeps what it measured
        add_ratios(result["rows"], copy_gbps)
        (out / "group_norm.json").write_text(json.dumps(result, indent=1))

    rows, skipped, t_start = result["rows"], result["not_measured"], time.perf_counter()
    for i, (impl, fn, param_dtype, res, shape, layout) in enumerate(tqdm(cases, desc="cases", disable=tiny)):
        if i and args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:  # the first always runs
            skipped.append(f"{impl} {res} {'x'.join(map(str, shape))} {layout}")
            continue
        for row in measure(impl, fn, param_dtype, shape, layout, device, on_gpu):
            row["res"] = res
            rows.append(row)
        save()
    if skipped:
        print(f"time budget of {args.budget_s:.0f} s spent: {len(skipped)} cases not measured ({skipped[0]}, ...)")
    print_table(rows)
    result["host"] = host_times([r for r in rows if r["impl"] != "copy"], "impl", "mode", lambda impl: impl.startswith("ck-"))
    print_host_times(result["host"])
    save()
    plot(rows, copy_gbps, out / "group_norm.png", result)
    print(f"wrote {out / 'group_norm.json'} and {out / 'group_norm.png'}")


if __name__ == "__main__":
    main()
