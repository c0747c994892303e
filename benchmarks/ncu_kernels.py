"""Hardware counters of the kernels that miss their targets, so that a session without a GPU
can reason from measurements: one launch of each kernel of a few SD2-sized calls, under Nsight
Compute.

    ncu --profile-from-start off --clock-control none --section LaunchStats --section Occupancy \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section ComputeWorkloadAnalysis --section SchedulerStats \
        python benchmarks/ncu_kernels.py            # run_gpu.sh's ncu_kernels step does this
    python benchmarks/ncu_kernels.py --tiny         # CPU: the same calls at tiny sizes, no profiler

The cases (bf16; the shapes of bench_group_norm's 256px-b256, bench_attention's 512 px, and
bench_geglu's / bench_layer_norm's 256 px rows):
  group_norm   ck.group_norm + SiLU on CUDA, 256x320x32x32 channels_last: the single-pass
               forward (#4: 51% of copy on an H200 with one tile a block; now persistent, two
               tile buffers), then forward+backward (the single-pass backward and its
               dweight/dbias sum)
  attention    ck.attention forward+backward at L = 4096 (#3: 0.88x cuDNN on an H200), with
               the deterministic and the atomic-dQ backward (TMA reductions on sm90), and the
               cross-attention of L = 1024 against 77 keys (1.05x the best SDPA); cuDNN's
               SDPA at L = 4096 beside it
  geglu, layer_norm   forward+backward at 32x32x32 tokens of 1280 / 320 features (GEGLU: 51-62%
               of copy)
Each call runs twice before the profiled one (compiles, autotuning, allocator), then once
between cudaProfilerStart and cudaProfilerStop: with --profile-from-start off, ncu sees exactly
that call's kernels, in order. The case names are printed before each, on stdout, as ncu's
"Profiling" lines come; its report follows when the program ends (--budget-s ends it in time).
Without ncu (or where it cannot read the counters) the calls simply run.
"""
import argparse
import time

import torch
import torch.nn.functional as F

import cckernels as ck
from bench_attention import env
from bench_group_norm import GROUPS


def leaf(shape, device, dtype, channels_last=False):
    t = torch.randn(shape, device=device, dtype=dtype)
    return (t.to(memory_format=torch.channels_last) if channels_last else t).requires_grad_()


def forward_backward(fn, *leaves):
    """fn(*leaves) and its backward into the leaves, as a training step runs it. The output's
    gradient is made by the first (unprofiled) call, so that no fill kernel is profiled."""
    grad = []

    def run():
        out = fn(*leaves)
        if not grad:
            grad.append(torch.randn_like(out))
        torch.autograd.grad(out, leaves, grad[0])

    return run


def cases(device, tiny):
    """[(name, fn())]: each fn makes one call of the case."""
    dtype = torch.float32 if tiny else torch.bfloat16
    on_gpu = device.type == "cuda"
    out = []

    N, C, side = (2, 64, 4) if tiny else (256, 320, 32)
    x = leaf((N, C, side, side), device, dtype, channels_last=True)
    w, b = (leaf((C,), device, torch.float32) for _ in range(2))
    gn = lambda x, w, b: ck.group_norm(x, GROUPS, w, b, activation="silu")  # noqa: E731
    if on_gpu and "cuda" in ck.available_backends(device)["group_norm"]:
        gn = lambda x, w, b: ck.group_norm(x, GROUPS, w, b, activation="silu", backend="cuda")  # noqa: E731
        forward = lambda fn: torch.no_grad()(lambda: fn(x, w, b))  # noqa: E731
        out.append((f"group_norm cuda fwd {N}x{C}x{side}x{side} nhwc", forward(gn)))
    out.append((f"group_norm fwd+bwd {N}x{C}x{side}x{side} nhwc", forward_backward(gn, x, w, b)))

    for name, B, Lq, Lk, H in (("self", 8, 4096, 4096, 5), ("cross", 8, 1024, 77, 10)):
        if tiny:
            B, Lq, Lk, H = 1, 16, 7 if name == "cross" else 16, 2
        q, k, v = (leaf((B, L, H, 64), device, dtype) for L in (Lq, Lk, Lk))
        out.append((f"attention {name} fwd+bwd B={B} Lq={Lq} Lk={Lk} H={H} D=64", forward_backward(ck.attention, q, k, v)))
        if name == "self":  # the atomic-dQ backward too (on sm90 its dQ tiles go by TMA reductions)
            out.append((f"attention {name} fwd+bwd B={B} Lq={Lq} Lk={Lk} H={H} D=64, atomic dQ",
                        env({"CCKERNELS_DETERMINISTIC": "0"})(forward_backward(ck.attention, q, k, v))))
        if name == "self" and on_gpu:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def cudnn(q, k, v):
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

            out.append((f"sdpa cudnn self fwd+bwd B={B} L={Lq} H={H} D=64", forward_backward(cudnn, q, k, v)))

    tokens = 64 if tiny else 32 * 32 * 32
    width = 32 if tiny else 320
    h = leaf((tokens, 8 * width), device, dtype)  # the projection's output: (h, gate) of 4 * width each
    bias = leaf((8 * width,), device, dtype)
    out.append((f"geglu fwd+bwd {tokens}x{8 * width}", forward_backward(ck.geglu, h, bias)))
    t = leaf((tokens, width), device, dtype)
    lw, lb = (leaf((width,), device, dtype) for _ in range(2))
    out.append((f"layer_norm fwd+bwd {tokens}x{width}", forward_backward(ck.layer_norm, t, lw, lb)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes, no profiler (automatic without a GPU)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no case after this many seconds (ncu prints its report when the program ends: "
                        "a run killed from outside prints none)")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if on_gpu else "cpu")
    start = time.monotonic()
    for name, call in cases(device, tiny=not on_gpu):
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            print(f"== {name}: not profiled, --budget-s {args.budget_s:g} spent", flush=True)
            continue
        try:
            for _ in range(2):
                call()
            if on_gpu:
                torch.cuda.synchronize()
        except (RuntimeError, NotImplementedError) as e:  # e.g. no cuDNN attention in this build
            print(f"== {name}: skipped, {str(e).splitlines()[0][:120]}", flush=True)
            continue
        backend = ck.used_backends().get(name.split()[0])  # sdpa is not ours: none
        print(f"== {name}" + (f" (backend {backend})" if backend else ""), flush=True)
        if on_gpu:
            torch.cuda.profiler.start()
        call()
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
