"""The code paths no GPU has run yet, one call each in a process of its own, before the rest of
a GPU visit: a path that crashes (an illegal address spoils its process's CUDA context for
every later call), hangs, or computes wrong numbers is switched off for the steps after this
one by the environment variable that turns it off, so run_gpu.sh's tests and benchmarks run on
the paths that work instead of failing behind the broken one. The failure is the log's finding.

    python benchmarks/gpu_smoke.py --out DIR     # every check; writes DIR/smoke.env
    python benchmarks/gpu_smoke.py --check NAME  # one check in this process (exit 0: passed)

DIR/smoke.env holds an `export NAME=0` line per failed check (empty when all pass), and for
the check running while this is killed; run_gpu.sh sources it. Each check compares its path
with an fp32 PyTorch reference on the same bf16 inputs (as training runs them); a path fails
where its error exceeds REL of the reference's largest value (GroupNorm: a few bf16 roundings),
or for attention 3x the error of the deterministic backward, whose kernels earlier visits
tested (flash-attention's rule for gradients).
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REL = 2e-2
# (N, C, H, W), 32 groups: 256 px batch 32 (a block's single pass), 256 px batch 256 and the
# 960-channel 32x32 map (clusters), 3 channels a group (no 16-byte packs in a group)
GROUP_NORM_SHAPES = [(32, 640, 16, 16), (256, 320, 32, 32), (8, 640, 32, 32), (64, 96, 5, 7)]


def error(got, want):
    """max |got - want| over max |want| (NaN where got has one)."""
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max()).item()


def close(name, got, want, rel=REL):
    """Raises unless got matches want within rel x max|want| everywhere (and has no NaN)."""
    err = error(got, want)
    if not err <= rel:  # NaN fails too
        raise AssertionError(f"{name}: max error {err:.3g} of the largest value, more than {rel:.3g}")


def group_norm_case(shape, device="cuda"):
    """bf16 channels_last x, dy and a skip gradient, fp32 weight and bias, and the fp32
    reference's (y, mean, rstd, dx + skip, dweight, dbias) of GroupNorm(32) + SiLU."""
    g = torch.Generator(device=device).manual_seed(0)
    x, dy, skip = (torch.randn(shape, device=device, generator=g).to(torch.bfloat16, memory_format=torch.channels_last)
                   for _ in range(3))
    w, b = (t.requires_grad_() for t in torch.randn(2, shape[1], device=device, generator=g))
    xf = x.float().requires_grad_()
    F.silu(F.group_norm(xf, 32, w, b, 1e-5)).backward(dy.float())
    groups = xf.detach().reshape(shape[0], 32, -1)
    want = (F.silu(F.group_norm(xf.detach(), 32, w.detach(), b.detach(), 1e-5)), groups.mean(-1),
            (groups.var(-1, unbiased=False) + 1e-5).rsqrt(), xf.grad + skip.float(), w.grad, b.grad)
    return x, dy, skip, w.detach(), b.detach(), want


def check_cuda_group_norm(single_pass):
    """The CUDA GroupNorm + SiLU forward and backward (the skip gradient added in the kernel),
    single passes (block, cluster) or split, against the fp32 reference."""
    from cckernels import cuda

    if not hasattr(cuda.loaded(), "group_norm_forward"):
        print(f"no CUDA GroupNorm kernels here ({cuda.build_info()}): nothing to check")
        return
    cuda.SINGLE_PASS = single_pass
    for shape in GROUP_NORM_SHAPES:
        x, dy, skip, w, b, want = group_norm_case(shape)
        y, mean, rstd = cuda._group_norm_forward(x, 32, w, b, 1e-5, "silu")
        got = (y, mean, rstd, *cuda._group_norm_backward(dy, x, w, b, mean, rstd, "silu", True, True, skip))
        torch.cuda.synchronize()
        print(f"{shape}: forward {cuda.group_norm_forward_path(x, 32)}, backward {cuda.group_norm_backward_path(x, 32)}, "
              f"errors {', '.join(f'{error(a, e):.1e}' for a, e in zip(got, want))}")
        for name, a, e in zip(("y", "mean", "rstd", "dx", "dweight", "dbias"), got, want):
            close(f"{shape} {name}", a, e)


def check_attention_tma_dq(shapes=((2, 1024, 5), (3, 257, 5)), device="cuda"):
    """The atomic-dQ backward with TMA reductions (sm90) against the fp32 reference, within 3x
    the deterministic backward's error, for self-attention of (B, L, H) at head dim 64 (over
    128 keys: not the short-key backward)."""
    from cckernels.triton import attention

    scale = 64**-0.5
    for B, L, H in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, do = (torch.randn(B, L, H, 64, device=device, generator=g, dtype=torch.bfloat16) for _ in range(4))
        if not attention._tma_reductions(q.device, H * 64):
            print(f"no TMA reductions on this device ({q.device}): nothing to check")
            return
        leaves = [t.float().transpose(1, 2).requires_grad_() for t in (q, k, v)]  # (B, H, L, D)
        F.scaled_dot_product_attention(*leaves, scale=scale).backward(do.float().transpose(1, 2))
        want = [t.grad.transpose(1, 2) for t in leaves]
        o, lse = attention._forward(q, k, v, scale)
        tma, deterministic = (attention._backward(do, q, k, v, o, lse, scale, True, True, det) for det in (False, True))
        if q.is_cuda:  # an asynchronous failure surfaces here, in this check
            torch.cuda.synchronize()
        for name, a, d, e in zip(("dq", "dk", "dv"), tma, deterministic, want):
            bound = 3 * error(d, e) + 1e-3
            print(f"(B={B}, L={L}, H={H}) {name}: error {error(a, e):.1e}, deterministic {error(d, e):.1e}")
            close(f"(B={B}, L={L}, H={H}) {name}", a, e, min(bound, 0.1))
    print("the atomic dQ by TMA reductions passes")


# name -> (the check, the variable whose 0 turns its path off). The split GroupNorm first: where
# it fails, GroupNorm leaves CUDA altogether (Triton takes inputs of 0 elements and more).
CHECKS = {
    "group_norm_cuda_split": (lambda: check_cuda_group_norm(False), "CCKERNELS_GROUP_NORM_TRITON_FROM"),
    "group_norm_cuda_single_pass": (lambda: check_cuda_group_norm(True), "CCKERNELS_GROUP_NORM_CUDA_SINGLE_PASS"),
    "attention_tma_dq": (check_attention_tma_dq, "CCKERNELS_ATTENTION_TMA_DQ"),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for smoke.env")
    p.add_argument("--check", choices=CHECKS, help="run this check here (the parent runs each so)")
    p.add_argument("--timeout-s", type=float, default=60, help="per check: longer counts as a hang")
    args = p.parse_args(argv)
    if args.check:
        CHECKS[args.check][0]()
        return 0
    if not args.out:
        p.error("--out or --check is required")
    env = Path(args.out) / "smoke.env"
    env.parent.mkdir(parents=True, exist_ok=True)
    env.write_text("")
    if not torch.cuda.is_available():
        print("no GPU: nothing to check")
        return 0
    exports = []
    # each check runs its path whatever an earlier smoke step switched off
    unswitched = {k: v for k, v in os.environ.items() if k not in {variable for _, variable in CHECKS.values()}}
    for name, (_, variable) in CHECKS.items():
        # written before the check runs: if this process is killed during it (run_gpu.sh's
        # budget), the check that never answered counts as failed
        export = f"export {variable}=0  # {name} failed: see logs/smoke.log"
        env.write_text("".join(line + "\n" for line in [*exports, export]))
        try:
            run = subprocess.run([sys.executable, __file__, "--check", name], capture_output=True, text=True,
                                 timeout=args.timeout_s, env=unswitched)
            failure = None if run.returncode == 0 else f"exit {run.returncode}: {run.stderr.strip()[-2000:]}"
            output = run.stdout.strip()
        except subprocess.TimeoutExpired as e:
            failure, output = f"no answer in {args.timeout_s:.0f} s (a hang?)", (e.stdout or b"").decode().strip()
        print(f"== {name}: {'passed' if failure is None else 'FAILED, ' + variable + '=0 from here on'}")
        if output:
            print(output)
        if failure:
            print(failure)
            exports.append(export)
        env.write_text("".join(line + "\n" for line in exports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
