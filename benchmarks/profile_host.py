"""Where the host time of eager forward+backward calls goes: ck.attention, ck.group_norm,
ck.geglu and ck.layer_norm at SD2 sizes small enough to be host-bound, on each backend, with the
torch peers for scale.

    python benchmarks/profile_host.py [--out DIR] [--calls 200]
    python benchmarks/profile_host.py --tiny    # CPU, Triton's interpreter: seconds (smoke test;
                                                # the default without a GPU)

The first GPU runs timed our eager calls at 450-1030 us of host time per forward+backward
against 190-600 for PyTorch's own ops, so eager SD2 steps at batch 32 were host-bound.
Per case this prints the host microseconds per call (timers.host_us, as the kernel
benchmarks' "host us" column) and the functions with the most own time under cProfile over
--calls calls (Triton's launcher is Python, so its parts show); every call starts from grads
set to None, as in the benchmarks, and the backends the ck ops took (a fallback shows there).
Writes profile_host.txt (the same) to --out.
"""
import argparse
import cProfile
import io
import os
import pstats

import torch
import torch.nn.functional as F

from run_info import at_least, output_dir, run_meta
from timers import clear, host_us


def cases(device, tiny):
    """(leaves, [(name, fn())]): each fn runs one forward+backward into the leaves' grads."""
    import cckernels as ck
    from cckernels import reference

    dtype = torch.float32 if tiny else torch.bfloat16
    B, L, H, D = (1, 8, 2, 32) if tiny else (8, 256, 20, 64)  # 512 px, the 16x16 latent level
    N, C, side = (2, 64, 4) if tiny else (32, 1280, 8)  # 256 px, the 8x8 level
    tokens, ff_dim = (8, 16) if tiny else (32 * 16, 5120)  # 256 px, the 4x4 level's feed-forward

    def leaf(*shape, channels_last=False):
        t = torch.randn(*shape, device=device, dtype=dtype)
        return (t.to(memory_format=torch.channels_last) if channels_last else t).requires_grad_()

    q, k, v, ctx = leaf(B, L, H, D), leaf(B, L, H, D), leaf(B, L, H, D), leaf(B, 77, H, D)
    qkv = leaf(B, L, 3, H, D)  # the UNet's fused projection, ck.unpack'ed
    do = torch.randn_like(q)
    x = leaf(N, C, side, side, channels_last=True)
    w = torch.randn(C, device=device, requires_grad=True)
    b = torch.randn(C, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    proj, proj_bias = leaf(tokens, 2 * ff_dim), leaf(2 * ff_dim)  # the UNet's GEGLU adds the projection's bias
    dgeglu = torch.randn(tokens, ff_dim, device=device, dtype=dtype)
    width = ff_dim // 4  # the feed-forward's block: its LayerNorms' inputs and residuals
    h, residual = leaf(tokens, width), leaf(tokens, width)
    ln_w = torch.randn(width, device=device, requires_grad=True)
    ln_b = torch.randn(width, device=device, requires_grad=True)
    dln = torch.randn(tokens, width, device=device, dtype=dtype)

    def attention(backend, keys):
        def run():
            ck.attention(q, keys, keys, backend=backend).backward(do)
        return run

    def packed_attention(backend):
        def run():
            ck.attention(*ck.unpack(qkv), backend=backend).backward(do)
        return run

    def sdpa(keys):
        def run():
            F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, keys, keys))).transpose(1, 2).backward(do)
        return run

    def group_norm(backend):
        def run():
            ck.group_norm(x, 32, w, b, activation="silu", backend=backend).backward(dy)
        return run

    def torch_group_norm():
        F.silu(F.group_norm(x, 32, w.to(dtype), b.to(dtype))).backward(dy)

    def geglu(backend):
        def run():
            ck.geglu(proj, proj_bias, backend=backend).backward(dgeglu)
        return run

    def torch_geglu():
        reference.geglu(proj).backward(dgeglu)  # the bias went into the projection's GEMM
        proj.grad.sum(0)  # torch's Linear: its bias gradient from the whole gradient

    def layer_norm(backend):
        def run():
            torch.autograd.backward(ck.layer_norm(h, ln_w, ln_b, residual=residual, prenorm=True, backend=backend),
                                    (dln, dln))
        return run

    def torch_layer_norm():  # the add, then torch's LayerNorm in the activations' dtype
        s = h + residual
        torch.autograd.backward((F.layer_norm(s, (width,), ln_w.to(dtype), ln_b.to(dtype)), s), (dln, dln))

    usable = ck.available_backends(device)
    out = []
    for keys, what in ((k, f"self L={L}"), (ctx, "cross Lk=77")):
        out += [(f"attention {what} {name}", attention(name, keys)) for name in usable["attention"]]
        out.append((f"attention {what} sdpa", sdpa(keys)))
    out.append((f"attention self L={L} {usable['attention'][0]} packed qkv", packed_attention(usable["attention"][0])))
    shape = f"{N}x{C}x{side}x{side}"
    out += [(f"group_norm {shape} nhwc {name}", group_norm(name)) for name in usable["group_norm"]]
    out.append((f"group_norm {shape} nhwc torch F.group_norm+silu", torch_group_norm))
    out += [(f"geglu {tokens}x{2 * ff_dim} {name}", geglu(name)) for name in usable["geglu"]]
    out.append((f"geglu {tokens}x{2 * ff_dim} torch gelu*mul", torch_geglu))
    out += [(f"layer_norm {tokens}x{width} + residual {name}", layer_norm(name)) for name in usable["layer_norm"]]
    out.append((f"layer_norm {tokens}x{width} + residual torch add+F.layer_norm", torch_layer_norm))
    return [q, k, v, ctx, qkv, x, w, b, proj, proj_bias, h, residual, ln_w, ln_b], out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/local")
    p.add_argument("--calls", type=at_least(1), default=200, help="profiled calls per case (default 200)")
    p.add_argument("--top", type=at_least(1), default=15, help="functions listed per case (default 15)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, Triton's interpreter "
                   "(automatic without a GPU)")
    args = p.parse_args()
    gpu = torch.cuda.is_available() and not args.tiny
    args.tiny = not gpu  # SD2 shapes in bf16 on a CPU would take minutes a case, on torch's ops
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "1"
        args.calls = 3
    device = torch.device("cuda" if gpu else "cpu")
    out = output_dir(args.out)
    report = io.StringIO()

    def say(text=""):
        print(text)
        report.write(text + "\n")

    import cckernels as ck

    meta = run_meta(device)
    say(f"device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; commit {meta['commit']}; "
        f"{args.calls} calls per case")
    leaves, runs = cases(device, args.tiny)
    for name, run in runs:
        before = ck.backend_calls()
        for _ in range(3):  # compile, autotune, allocator warm-up
            run()
        ran = [f"{op} on {backend}" for op, counts in ck.backend_calls().items() for backend, n in counts.items()
               if n > before.get(op, {}).get(backend, 0)]
        us = host_us(run, args.calls, leaves)
        profile = cProfile.Profile()
        for _ in range(args.calls):
            clear(leaves)
            profile.enable()
            run()
            profile.disable()
        say(f"\n== {name}: {us:.0f} us per forward+backward" + (f" ({', '.join(ran)})" if ran else ""))
        stats = io.StringIO()
        pstats.Stats(profile, stream=stats).sort_stats("tottime").print_stats(args.top)
        # From the column header on: the per-function lines (tottime is per all --calls calls).
        say(stats.getvalue()[stats.getvalue().find("   ncalls"):].rstrip())
    (out / "profile_host.txt").write_text(report.getvalue())
    print(f"wrote {out / 'profile_host.txt'}")


if __name__ == "__main__":
    main()
