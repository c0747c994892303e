"""Graph-timed ck-cuda GroupNorm+SiLU (single pass and forced split), fwd and fwd+bwd, bf16 NHWC,
for the cckernels tree on PYTHONPATH. One JSON line per row: the bisect of the sixth run's slowdown."""
import json
import sys

import torch

sys.path.insert(0, sys.argv[2])  # main's benchmarks/ for timers
import cckernels as ck
from cckernels import cuda as ck_cuda
from timers import graph_ms

TREE = sys.argv[1]
SHAPES = [(256, 320, 32), (256, 1280, 8), (32, 1280, 4), (32, 960, 32), (8, 640, 32), (8, 1280, 8), (8, 2560, 16),
          (8, 1920, 32)]
torch.manual_seed(0)
for single in (True, False):
    ck_cuda.SINGLE_PASS = single
    for N, C, side in SHAPES:
        x = torch.randn(N, C, side, side, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w = torch.randn(C, device="cuda")
        b = torch.randn(C, device="cuda")
        xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, w, b))
        fn = lambda x, w, b: ck.group_norm(x, 32, w, b, activation="silu", backend="cuda")  # noqa: E731
        dy = torch.randn_like(fn(xg, wg, bg))
        assert ck.used_backends()["group_norm"] == "cuda"
        path = ck_cuda.group_norm_forward_path(x, 32) if single else "split"
        for mode, run in (("fwd", lambda: fn(x, w, b)),
                          ("fwd+bwd", lambda: torch.autograd.grad(fn(xg, wg, bg), (xg, wg, bg), dy))):
            with torch.set_grad_enabled(mode != "fwd"):
                run()
                ms, why = graph_ms(run, 3, 15)
            print(json.dumps({"tree": TREE, "single": single, "path": path, "shape": [N, C, side], "mode": mode,
                              "us": ms and round(ms[0] * 1e3, 2), "why": why}), flush=True)
