"""The code paths no GPU has run yet, one call each in a process of its own, before the rest of
a GPU visit: a path that crashes (an illegal address spoils its process's CUDA context for
every later call), hangs, or computes wrong numbers is switched off for the steps after this
one by the environment variable that turns it off, so run_gpu.sh's tests and benchmarks run on
the paths that work instead of failing behind the broken one. The failure is the log's finding.

    python benchmarks/gpu_smoke.py --out DIR     # every check; writes DIR/smoke.env
    python benchmarks/gpu_smoke.py --check NAME  # one check in this process (exit 0: passed)

DIR/smoke.env holds an `export NAME=0` line per failed check (empty when all pass), and for
the check running while this is killed; run_gpu.sh sources it. Each check compares the new path with the path it replaces (tested on
earlier visits) on the same inputs, in bf16 as training runs: outputs must agree within a few
bf16 roundings of their largest value.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch


def close(name, got, want, rel=2e-2):
    """Raises unless got matches want within rel x max|want| everywhere (and has no NaN)."""
    got, want = got.float(), want.float()
    err = (got - want).abs().max().item()
    if not err <= rel * want.abs().max().item():  # NaN fails too
        raise AssertionError(f"{name}: max error {err:.3g} against max |value| {want.abs().max().item():.3g}")


def check_group_norm():
    """The CUDA single-pass forward and backward (block, cluster, the skip gradient added in the
    kernel) against the split kernels, at SD2 shapes and an odd one."""
    from cckernels import cuda

    # (N, C, H, W): 256 px batch 32 (single pass), 256 px batch 256 (clusters), 3 channels a group
    shapes = [(32, 640, 16, 16), (256, 320, 32, 32), (32, 960, 32, 32), (64, 96, 5, 7)]
    paths = []
    for shape in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        x, dy, skip = (torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16, memory_format=torch.channels_last)
                       for _ in range(3))
        w, b = torch.randn(2, shape[1], device="cuda", generator=g)
        runs = []
        for single in (True, False):
            cuda.SINGLE_PASS = single
            paths.append(f"{shape}: forward {cuda.group_norm_forward_path(x, 32)}, "
                         f"backward {cuda.group_norm_backward_path(x, 32)}")
            y, mean, rstd = cuda._group_norm_forward(x, 32, w, b, 1e-5, "silu")
            runs.append((y, mean, rstd, *cuda._group_norm_backward(dy, x, w, b, mean, rstd, "silu", True, True, skip)))
            torch.cuda.synchronize()
        for name, got, want in zip(("y", "mean", "rstd", "dx", "dweight", "dbias"), *runs):
            close(f"{shape} {name}", got, want)
    print("\n".join(paths[::2]))  # the single-pass runs' paths: what was checked


def check_attention_tma_dq():
    """The atomic-dQ backward with TMA reductions (sm90) against the deterministic backward."""
    from cckernels.triton import attention

    for B, L, H in ((2, 1024, 5), (3, 257, 5)):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (torch.randn(B, L, H, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4))
        if not attention._tma_reductions(q.device, H * 64):
            print(f"no TMA reductions on this GPU ({torch.cuda.get_device_name()}): nothing to check")
            return
        o, lse = attention._forward(q, k, v, 64**-0.5)
        grads = [attention._backward(do, q, k, v, o, lse, 64**-0.5, True, True, deterministic)
                 for deterministic in (False, True)]
        torch.cuda.synchronize()
        for name, got, want in zip(("dq", "dk", "dv"), *grads):
            close(f"(B={B}, L={L}, H={H}) {name}", got, want)
    print("atomic dQ by TMA reductions agrees with the deterministic backward")


# name -> (the check, the variable whose 0 turns its path off)
CHECKS = {
    "group_norm_cuda_single_pass": (check_group_norm, "CCKERNELS_GROUP_NORM_CUDA_SINGLE_PASS"),
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
