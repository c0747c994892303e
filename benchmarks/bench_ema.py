"""EMA and fused AdamW+EMA over the SD2 UNet's parameter list: time, GB/s, share of copy
bandwidth, kernel launches.

    python benchmarks/bench_ema.py [--out DIR]     # GPU: SD2 UNet list (686 tensors, 865.9M values)
    python benchmarks/bench_ema.py --tiny          # a few small tensors, seconds (CPU without a GPU)
    python benchmarks/bench_ema.py --write-shapes  # regenerate sd2_unet_shapes.json with diffusers

Bytes per element (the whole list is far larger than L2, so each byte moves once):
    EMA:            read ema 4 + read param s + write ema 4 = 8 + s  (s = 2 bf16, 4 fp32)
    AdamW+EMA step: fp32 params: param 4+4, grad 4, exp_avg 4+4, exp_avg_sq 4+4, ema 4+4 = 36
                    bf16 params + fp32 master: grad 2, param write 2, master 4+4, exp_avg 4+4,
                    exp_avg_sq 4+4, ema 4+4 = 36
    Baseline (same result): torch.optim.AdamW(fused=True) on fp32 weights + ck.ema_update_;
    for bf16 params also the grad cast to fp32 and the copy back. A bf16-state AdamW (no
    master weights) is listed for reference; its speedup is against the same baseline.
GB/s counts only those bytes, for every method (a method that moves more is just slower).
Copy bandwidth: dst.copy_(src) over one fp32 buffer as large as the params, 2 x its bytes.
Launches: CUDA kernels and copies of one call, counted with torch.profiler (GPU only).
EMA rows are timed three ways (benchmarks/timers.py): eager calls, replays of one call captured
in a CUDA graph (the kernels' time alone: the EMA target is about them), and the host time to
enqueue a call. An eager time near the host time is the host's: the per-tensor checks and
table lookup of ~700 tensors, not the kernel (an H200 run of 2026-11-26 read the one-launch
Triton EMA at 50% of copy bandwidth eagerly, 98% in the run before on a faster host).
FusedAdamWEMA.step refuses capture (its step count is a host number): AdamW rows are eager.
Peers: torch._foreach_lerp_ (with the fp32 casts bf16 params need), a per-tensor Python
loop (ck's "torch" backend), apex amp_C.multi_tensor_axpby when it imports and runs;
torch.optim.AdamW(fused=True) (on fp32 masters for bf16 params) followed by ck.ema_update_.
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import cckernels as ck
from run_info import output_dir, run_meta, save_plot
from timers import fmt, graph_cell, print_missing_graphs, time_fields, timings

SHAPES_FILE = Path(__file__).with_name("sd2_unet_shapes.json")
TINY_SHAPES = [(1,), (77,), (320, 3, 3, 3), (257,), (40, 77), (1000,), (3, 5, 7)]
DECAY = 0.9999
BASELINE = "AdamW(fused) + ck.ema_update_"  # same result as FusedAdamWEMA (fp32 masters for bf16)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# stabilityai/stable-diffusion-2 UNet (865.9M parameters); other keys: diffusers' defaults.
SD2_UNET = dict(
    sample_size=96,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
)


def write_shapes():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD2_UNET)
    lines = [f"{json.dumps(name)}: {json.dumps(list(p.shape))}" for name, p in unet.named_parameters()]
    SHAPES_FILE.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one parameter per line
    print(f"wrote {len(lines)} shapes, {sum(p.numel() for p in unet.parameters()):,} values to {SHAPES_FILE}")


def sd2_shapes():
    return [tuple(s) for s in json.loads(SHAPES_FILE.read_text()).values()]


def timed(fn, device, tiny):
    """(median, q20, q80) milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=50 if tiny else 300))
    fn()  # warm-up (Triton's interpreter, first-use allocations)
    times = []
    for _ in range(3 if tiny else 20):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    q = statistics.quantiles(times, n=5, method="inclusive")
    return statistics.median(times), q[0], q[3]


def launches(fn, device):
    """CUDA kernels and copies one call of fn starts (None on CPU)."""
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def copy_bandwidth(numel, device, tiny):
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), device, tiny)[0]
    return 2 * 4 * numel / ms / 1e6


def apex_axpby():
    """apex's multi-tensor axpby (out = a*x + b*y) as an EMA, or None without apex."""
    try:
        import amp_C
        from apex.multi_tensor_apply import multi_tensor_applier
    except ImportError:
        return None

    def ema_update_(ema, params, decay):
        noop = torch.zeros(1, dtype=torch.int, device=ema[0].device)
        multi_tensor_applier(amp_C.multi_tensor_axpby, noop, [ema, params, ema], decay, 1 - decay, -1)

    return ema_update_


def ema_methods(device):
    """name -> ema_update_(ema, params, decay) for every EMA implementation usable here."""
    methods = {}
    for backend in ck.available_backends(device)["ema_update_"]:
        name = "per-tensor loop (ck torch)" if backend == "torch" else f"ck.ema_update_ {backend}"
        methods[name] = lambda e, p, d, backend=backend: ck.ema_update_(e, p, d, backend=backend)

    def foreach_lerp(ema, params, decay):
        params = params if params[0].dtype == torch.float32 else [p.float() for p in params]
        torch._foreach_lerp_(ema, params, 1 - decay)

    methods["torch._foreach_lerp_ (+casts)"] = foreach_lerp
    apex = apex_axpby()
    if apex is not None:
        methods["apex multi_tensor_axpby"] = apex
    return methods


def label(name):
    """`name`, plus the backend that really ran when a ck row's backend fell back to another."""
    for op, prefix in (("ema_update_", "ck.ema_update_ "), ("adamw_ema_", "FusedAdamWEMA ")):
        used = ck.used_backends().get(op)
        if name.startswith(prefix) and used != name.removeprefix(prefix):
            return f"{name} (ran {used})"
    return name


def bench_ema(shapes, device, tiny, copy_gbps):
    rows = []
    numel = sum(torch.Size(s).numel() for s in shapes)
    for dname, dtype in DTYPES.items():
        params = [torch.randn(s, device=device).to(dtype) for s in shapes]
        ema = [torch.randn(s, device=device) for s in shapes]
        nbytes = numel * (8 + params[0].element_size())
        for name, update in ema_methods(device).items():
            fn = lambda: update(ema, params, DECAY)  # noqa: E731
            try:
                fn()
            except RuntimeError as e:  # a peer without this dtype (older apex: no bf16)
                print(f"skipped {name} {dname}: {e}")
                continue
            eager, graph, why, host = timings(fn, tiny, eager=(25, 300), graph=(25, 300))
            row = dict(bench="ema", dtype=dname, method=label(name),
                       **time_fields(eager, graph, "GBps", lambda ms: nbytes / ms / 1e6),
                       graph_error=why, host_us=host, launches=launches(fn, device))  # fmt: skip
            row["of_copy"] = row["GBps"] / copy_gbps
            row["graph_of_copy"] = row["graph_GBps"] and row["graph_GBps"] / copy_gbps
            rows.append(row)
        del params, ema
    return rows


def adamw_setups(shapes, dtype, device):
    """Yields (name, step function): one optimizer's state alive at a time (SD2 states are GBs)."""
    torch.manual_seed(0)
    params = [torch.randn(s, device=device).mul_(0.02).to(dtype).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p).mul_(1e-3)
    hyper = dict(lr=1e-4, weight_decay=0.01)
    for backend in ck.available_backends(device)["ema_update_"]:
        yield f"FusedAdamWEMA {backend}", ck.FusedAdamWEMA(params, **hyper, ema_decay=DECAY, backend=backend).step
    # Baseline with the same result: fp32 weights stepped by torch's fused AdamW, written
    # back to bf16 params when the model is bf16, then the EMA as a separate pass.
    masters = params if dtype == torch.float32 else [p.detach().float().requires_grad_() for p in params]
    for m in masters:
        if m.grad is None:
            m.grad = torch.empty_like(m)
    opt = torch.optim.AdamW(masters, **hyper, fused=True)
    ema = [m.detach().clone() for m in masters]

    @torch.no_grad()
    def baseline():
        if masters is not params:
            torch._foreach_copy_([m.grad for m in masters], [p.grad for p in params])
        opt.step()
        if masters is not params:
            torch._foreach_copy_(params, masters)
        ck.ema_update_(ema, masters, DECAY)

    yield BASELINE, baseline
    del opt, ema, masters
    if dtype != torch.float32:
        # For reference, not the same result: AdamW on the bf16 params themselves, with bf16
        # state and no master weights (fewer bytes, less precision).
        opt = torch.optim.AdamW(params, **hyper, fused=True)
        ema = [p.detach().float() for p in params]

        def low_precision():
            opt.step()
            ck.ema_update_(ema, params, DECAY)

        yield "AdamW(fused, bf16 state) + ck.ema_update_", low_precision


def bench_adamw(shapes, device, tiny, copy_gbps):
    rows = []
    numel = sum(torch.Size(s).numel() for s in shapes)
    for dname, dtype in DTYPES.items():
        baseline_ms = None
        for name, step in adamw_setups(shapes, dtype, device):
            ms, lo, hi = timed(step, device, tiny)
            gbps = 36 * numel / ms / 1e6
            rows.append(dict(bench="adamw_ema", dtype=dname, method=label(name), ms=ms, ms_q20=lo, ms_q80=hi, GBps=gbps,
                             of_copy=gbps / copy_gbps, launches=launches(step, device)))  # fmt: skip
            if name == BASELINE:
                baseline_ms = ms
        for row in rows:
            if row["bench"] == "adamw_ema" and row["dtype"] == dname:
                row["speedup_vs_baseline"] = baseline_ms / row["ms"]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_table(rows, copy_gbps):
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    header = (f"{'bench':10} {'dtype':5} {'method':42} {'ms (q20-q80)':>22} {'GB/s':>8} {'copy%':>6} "
              f"{'graph ms (q20-q80)':>25} {'graph copy%':>11} {'host us':>8} {'launches':>8} {'speedup':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        spread = f"{r['ms']:.3f} ({r['ms_q20']:.3f}-{r['ms_q80']:.3f})"
        graph = graph_cell(r) if "graph_ms" in r else "-"
        graph_copy = fmt(r.get("graph_of_copy") and 100 * r["graph_of_copy"], ".0f", suffix="%")
        speedup = f"{r['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in r else ""
        print(f"{r['bench']:10} {r['dtype']:5} {r['method']:42} {spread:>22} {r['GBps']:8.1f} {100 * r['of_copy']:5.0f}% "
              f"{graph:>25} {graph_copy:>11} {fmt(r.get('host_us'), '.0f'):>8} {fmt(r['launches'], 'd'):>8} {speedup:>7}")
    print_missing_graphs([r for r in rows if r["bench"] == "ema"], lambda r: f"{r['method']} {r['dtype']}")
    print(f"speedup: against {BASELINE}, same dtype")


def plot(rows, copy_gbps, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, bench, title in ((axes[0], "ema", "EMA update"), (axes[1], "adamw_ema", "AdamW + EMA step")):
        sel = [r for r in rows if r["bench"] == bench]
        labels = [f"{r['method']}\n{r['dtype']}" for r in sel]
        ax.barh(labels, [r["GBps"] for r in sel], label="eager calls")
        graphs = [r.get("graph_GBps") or 0 for r in sel]
        if any(graphs):
            ax.barh(labels, graphs, fill=False, edgecolor="C1", label="CUDA graph replays")
        ax.axvline(copy_gbps, color="k", linestyle="--", label="copy bandwidth")
        ax.set_xlabel("GB/s (useful bytes)")
        ax.set_title(title)
        ax.legend()
    save_plot(fig, path, meta)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/local", help="directory for bench_ema.json/.png")
    parser.add_argument("--tiny", action="store_true", help="a few small tensors (automatic without a GPU)")
    parser.add_argument("--write-shapes", action="store_true", help=f"regenerate {SHAPES_FILE.name} and exit")
    args = parser.parse_args(argv)
    if args.write_shapes:
        write_shapes()
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type == "cpu"
    out = output_dir(args.out)
    shapes = TINY_SHAPES if tiny else sd2_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(f"{len(shapes)} tensors, {numel:,} values on {device}" + (" (tiny)" if tiny else " (SD2 UNet)"))
    copy_gbps = copy_bandwidth(numel, device, tiny)
    rows = bench_ema(shapes, device, tiny, copy_gbps) + bench_adamw(shapes, device, tiny, copy_gbps)
    print_table(rows, copy_gbps)
    result = dict(
        **run_meta(device),
        tensors=len(shapes),
        values=numel,
        copy_GBps=copy_gbps,
        triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
        rows=rows,
    )
    (out / "bench_ema.json").write_text(json.dumps(result, indent=1))
    plot(rows, copy_gbps, out / "bench_ema.png", result)
    print(f"wrote {out / 'bench_ema.json'} and {out / 'bench_ema.png'}")
    return result


if __name__ == "__main__":
    main()
