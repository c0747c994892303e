"""Where a training step's activation memory traffic goes, measured without a GPU.

    python benchmarks/traffic_audit.py [--row "+ larger micro-batch"] [--top 40] [--out DIR]
    python benchmarks/traffic_audit.py --tiny     # the tiny config in seconds (smoke test)

One UNet forward and backward of a bench_train recipe (the ladder up to --row) under autocast,
then gradient clipping, runs on the CPU under a TorchDispatchMode that logs each aten
op that moves memory: the bytes of its tensor inputs (read) and outputs (written), and where it
ran, the forward module or the backward node. It runs at two latent sizes; the difference,
scaled to one image at 256 px (32x32 latents), is the traffic that grows with the image (the
weights' part, the same at both sizes, cancels). Ops are matched between the two runs by
(op, place, occurrence).

It runs in float16 where training runs bfloat16 (the same bytes): Triton's interpreter gets
bf16 dots wrong, so the attention kernel refuses bf16 on the CPU and would fall back to its
torch reference, whose traffic is not a GPU's. What it does not see: cckernels' kernels run in
the interpreter, whose own copies are left out; their outputs show where they are allocated
(the kernels write them), their reads do not. GEMMs and convolutions are listed with what they
read and write, not with their real traffic; a convolution's bias, which the CPU adds inside it,
is listed as the add_ and the gradient sum a GPU runs apart (`(GPU)` in the op's name). Prints the largest groups of (op, place, dtypes)
per image and writes traffic_audit.json.
"""
import argparse
import collections
import contextlib
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels on the CPU

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import bench_train  # noqa: E402
import cckernels as ck  # noqa: E402
from trainer import diffusion  # noqa: E402
from trainer.config import load as load_config  # noqa: E402

# aten ops that only make views: no memory moved
VIEWS = ("view", "detach", "t.default", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice", "select",
         "as_strided", "_unsafe_view", "alias", "split", "unbind", "reshape")


class TrafficLog(TorchDispatchMode):
    """Records (op, place, read, write, dtypes, shape) of every memory-moving aten op; `place`
    comes from `where()`. Ops inside Triton's interpreter are left out (interpreter_calls_unlogged)."""

    def __init__(self, where):
        super().__init__()
        self.where, self.records, self.paused = where, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        if self.paused or not func._schema.name.startswith("aten::") or any(v in name for v in VIEWS):
            return out
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.record(name, inputs, outputs)
        # On a GPU torch adds a cuDNN convolution's bias in an add_ of its own and sums its
        # gradient over the output's gradient in a reduction of its own; the CPU fuses both.
        if func is torch.ops.aten.convolution.default and args[2] is not None:
            self.record("convolution bias add_ (GPU)", [out, args[2]], [out])
        if func is torch.ops.aten.convolution_backward.default and args[-1][2]:
            self.record("convolution_backward bias sum (GPU)", [args[0]], [out[2]])
        return out

    def record(self, name, inputs, outputs):
        self.records.append({
            "op": name, "where": self.where(),
            "read": sum(t.numel() * t.element_size() for t in inputs),
            "write": sum(t.numel() * t.element_size() for t in outputs),
            "dtypes": [str(t.dtype).removeprefix("torch.") for t in inputs[:2] + outputs[:1]],
            "shape": list(inputs[0].shape) if inputs else [],
        })


@contextlib.contextmanager
def interpreter_calls_unlogged(log):
    import triton.runtime.interpreter as interpreter

    call = interpreter.GridExecutor.__call__

    def unlogged(self, *args, **kwargs):
        log.paused += 1
        try:
            return call(self, *args, **kwargs)
        finally:
            log.paused -= 1

    interpreter.GridExecutor.__call__ = unlogged
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__ = call


def build(cfg, row):
    """The UNet of bench_train's ladder up to `row`, its weights 16-bit where the recipe says."""
    recipe = bench_train.Recipe()
    for name, change in bench_train.LADDER:
        recipe = dataclasses.replace(recipe, **change)
        if name == row:
            break
    else:
        raise ValueError(f"--row {row!r} is not a ladder row; valid: {', '.join(n for n, _ in bench_train.LADDER)}")
    torch.manual_seed(0)
    unet = bench_train.build_unet(cfg["model"]["unet"], recipe, torch.device("cpu"))
    if recipe.weights == "bf16":  # float16 here: see the module docstring
        with torch.no_grad():
            for p in unet.bf16_weight_params():
                p.data = p.data.to(torch.float16)
    return unet, recipe


def step_records(unet, recipe, side):
    """The log of one training step (batch 1) at `side` x `side` latents."""
    stack = []

    def leave(module, args, output):  # returns None: a forward hook's value would replace the output
        stack.pop()

    hooks = [h for name, m in unet.named_modules() for h in (
        m.register_forward_pre_hook(lambda m, a, name=name: stack.append(name)), m.register_forward_hook(leave))]
    node = torch._C._current_autograd_node
    log = TrafficLog(lambda: f"bwd:{node().name()}" if node() is not None else f"fwd:{stack[-1] if stack else '-'}")
    layout = torch.channels_last if recipe.channels_last else torch.contiguous_format
    latents = torch.randn(1, unet.config["in_channels"], side, side).to(memory_format=layout)
    context = torch.randn(1, 77, unet.config["cross_attention_dim"])
    try:
        with interpreter_calls_unlogged(log), log:
            with torch.autocast("cpu", torch.float16):
                loss = diffusion.training_loss(unet, diffusion.NoiseSchedule(), latents, context)
            loss.backward()
            ck.clip_grad_norm_(unet.parameters(), 1.0)
    finally:
        for h in hooks:
            h.remove()
        unet.zero_grad(set_to_none=True)
    return log.records


def per_image(small, large, sides):
    """{(op, place, dtypes): [calls, bytes per image at 32x32 latents, example shape]} from the
    logs at two latent sides: matched records' growth, scaled from the area difference."""
    def keyed(records):
        seen, out = collections.Counter(), {}
        for r in records:
            key = (r["op"], r["where"])
            out[key, seen[key]] = r
            seen[key] += 1
        return out

    scale = 32 * 32 / (sides[1] ** 2 - sides[0] ** 2)
    a, b = keyed(small), keyed(large)
    groups = collections.defaultdict(lambda: [0, 0.0, None])
    for key, r in b.items():
        grown = (r["read"] + r["write"]) - (a[key]["read"] + a[key]["write"]) if key in a else 0
        if grown <= 0:
            continue
        place = r["where"] if r["where"].startswith("bwd:") else re.sub(r"\.\d+", "", r["where"])  # blocks alike
        group = groups[r["op"], place, "/".join(r["dtypes"])]
        group[0] += 1
        group[1] += grown * scale
        group[2] = r["shape"]
    return groups


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", default="+ larger micro-batch", help="bench_train ladder row (cumulative recipe)")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", default="benchmarks/results/local")
    p.add_argument("--tiny", action="store_true", help="configs/tiny.yaml at 4x4 and 8x8 latents (seconds)")
    args = p.parse_args(argv)
    cfg = load_config(ROOT / "configs" / ("tiny.yaml" if args.tiny else "sd2-base.yaml"))
    sides = (4, 8) if args.tiny else (8, 16)
    unet, recipe = build(cfg, args.row)
    step_records(unet, recipe, sides[0])  # first calls: compiles, caches
    logs = [step_records(unet, recipe, side) for side in sides]
    groups = per_image(*logs, sides)
    total = sum(g[1] for g in groups.values())
    print(f"{args.row}: {recipe}")
    print(f"activation traffic per image at 256 px (32x32 latents): {total / 1e9:.3f} GB, largest groups:")
    rows = sorted(({"op": op, "where": where, "dtypes": dtypes, "calls": n, "MB": b / 1e6, "shape": shape}
                   for (op, where, dtypes), (n, b, shape) in groups.items()), key=lambda r: -r["MB"])
    for r in rows[:args.top]:
        print(f"{r['MB']:9.1f} MB {r['calls']:5d}  {r['op']:34s} {r['where'][:64]:64s} {r['dtypes']}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "traffic_audit.json"), "w") as f:
        json.dump({"row": args.row, "recipe": dataclasses.asdict(recipe), "sides": sides, "total_GB": total / 1e9,
                   "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
