"""Every op and backend we ship can be captured in a CUDA graph and replayed with the results
of eager calls: what a user who captures a whole training step in a CUDA graph needs (no host
sync inside a call, no host-side state that a replay leaves stale, autotuning done before the
capture).

Each case captures one call with benchmarks/timers.py's capture(), which the benchmarks time
with: eager warm-up calls first (autotuning, compiling), then warm-up and capture on a side
stream, as PyTorch's recipe asks. Then it writes new values into the captured inputs, replays,
and compares with eager calls on the same values: bitwise, except dQ of the atomic attention
backward (its fp32 atomics add in a varying order).
"""
import contextlib

import pytest
import torch

import cckernels as ck
from cckernels.backend import available
from test_group_norm import skip_without_cuda_group_norm
import scripts

pytestmark = pytest.mark.gpu
BACKENDS = ["cuda", "triton", "torch"]


timers = scripts.load("benchmarks/timers.py")
capture = timers.capture


@torch.no_grad()
def refill(*tensors):
    """New random values, in place: the addresses the graph captured stay the same."""
    for t in tensors:
        t.copy_(torch.randn(t.shape, device=t.device))


def randn(*shape, dtype=torch.bfloat16, grad=False):
    return torch.randn(*shape, device="cuda", dtype=dtype).requires_grad_(grad)


# ---------------------------------------------------------------------------------------
# attention (triton): forward, and forward + backward with both backward variants
# ---------------------------------------------------------------------------------------
# (B, Lq, Lk, H), head dim 64: self-attention, odd lengths, cross-attention with 77 tokens
# (1024 queries: the dK/dV pass splits its query loop). Buckets test_attention.py compiles too.
ATTENTION_SHAPES = [(2, 256, 256, 5), (2, 257, 100, 3), (2, 1024, 77, 4)]


@pytest.mark.parametrize("B,Lq,Lk,H", ATTENTION_SHAPES)
def test_attention_forward(B, Lq, Lk, H):
    q, k, v = randn(B, Lq, H, 64), randn(B, Lk, H, 64), randn(B, Lk, H, 64)
    graph, out = capture(lambda: ck.attention(q, k, v, backend="triton"))
    assert ck.used_backends()["attention"] == "triton"
    for _ in range(2):
        refill(q, k, v)
        graph.replay()
        assert torch.equal(out, ck.attention(q, k, v, backend="triton"))


@pytest.mark.parametrize("deterministic", ["1", "0"])
@pytest.mark.parametrize("B,Lq,Lk,H", ATTENTION_SHAPES)
def test_attention_forward_backward(B, Lq, Lk, H, deterministic, monkeypatch):
    monkeypatch.setenv("CCKERNELS_DETERMINISTIC", deterministic)  # read when the backward runs
    q, k, v = randn(B, Lq, H, 64, grad=True), randn(B, Lk, H, 64, grad=True), randn(B, Lk, H, 64, grad=True)
    dout = randn(B, Lq, H, 64)

    def step(q, k, v):
        out = ck.attention(q, k, v, backend="triton")
        out.backward(dout)  # as a training step: the grads land in .grad
        return out

    graph, out = capture(lambda: step(q, k, v), grads=[q, k, v])
    assert ck.used_backends()["attention"] == "triton"
    grads = [q.grad, k.grad, v.grad]  # in the graph's memory: every replay rewrites them
    for _ in range(2):
        refill(q, k, v, dout)
        graph.replay()
        twins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        expected = step(*twins)
        assert torch.equal(out, expected)
        assert torch.equal(grads[1], twins[1].grad) and torch.equal(grads[2], twins[2].grad)
        if deterministic == "1":
            assert torch.equal(grads[0], twins[0].grad)
        else:
            torch.testing.assert_close(grads[0], twins[0].grad)


# ---------------------------------------------------------------------------------------
# group_norm + SiLU: cuda (channels_last) and triton (both layouts), forward + backward
# ---------------------------------------------------------------------------------------
# SD2 shapes taking the single-pass (or cluster) forward and the split one, and an odd one
GROUP_NORM_SHAPES = [(32, 640, 16, 16), (32, 320, 32, 32), (3, 96, 7, 5)]


# gpu_time: warm-up, capture and the eager twins under ck.prefer_gpu_time(), as the trainer's
# graphs: Triton's forward takes its split path there for tiles over 8 KB (32x640x16x16).
@pytest.mark.parametrize("backend,channels_last,gpu_time",
                         [("cuda", True, False), ("triton", True, False), ("triton", False, False), ("triton", True, True)])
@pytest.mark.parametrize("shape", GROUP_NORM_SHAPES)
def test_group_norm_silu_forward_backward(backend, channels_last, gpu_time, shape):
    if backend == "cuda":
        skip_without_cuda_group_norm()
    x = randn(*shape, grad=True)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    w, b = randn(shape[1], dtype=torch.float32, grad=True), randn(shape[1], dtype=torch.float32, grad=True)
    dy = torch.randn_like(x)

    def step():
        y = ck.group_norm(x, 32, w, b, activation="silu", backend=backend)
        return (y, *torch.autograd.grad(y, (x, w, b), dy))

    with ck.prefer_gpu_time() if gpu_time else contextlib.nullcontext():
        graph, outs = capture(step)
        assert ck.used_backends()["group_norm"] == backend
        for _ in range(2):
            refill(x, w, b, dy)
            graph.replay()
            for got, expected in zip(outs, step()):
                assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------
# ema_update_ and FusedAdamWEMA.step on every backend
# ---------------------------------------------------------------------------------------
# odd sizes, several Triton chunks with a ragged tail, a channels_last conv weight
PARAM_SHAPES = [(1,), (77,), (320, 3), (2 * 8192 + 3,), (5, 3, 3, 3)]


def skip_unless_usable(op, backend):
    if backend not in available(op, torch.device("cuda")):
        pytest.skip(f"backend {backend} is not usable for {op} here")


def make_params(dtype):
    params = [randn(*s, dtype=dtype) for s in PARAM_SHAPES]
    return [p.to(memory_format=torch.channels_last) if p.dim() == 4 else p for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_update(backend, dtype):
    skip_unless_usable("ema_update_", backend)
    params = make_params(dtype)
    ema = [torch.randn_like(p, dtype=torch.float32) for p in params]
    start = [e.clone() for e in ema]
    graph, _ = capture(lambda: ck.ema_update_(ema, params, 0.9, backend=backend))
    with torch.no_grad():  # the warm-up calls moved the EMA: both start over from `start`
        for e, s in zip(ema, start):
            e.copy_(s)
    eager = [s.clone() for s in start]
    for _ in range(3):
        refill(*params)
        graph.replay()
        ck.ema_update_(eager, params, 0.9, backend=backend)
        assert ck.used_backends()["ema_update_"] == backend
    for got, expected in zip(ema, eager):
        assert torch.equal(got, expected)


def test_triton_ema_update_capture_without_warm_up_falls_back():
    # The Triton backend's device table is built by a host copy, which a capture cannot hold;
    # the CUDA and torch backends pass their tables as launch arguments.
    skip_unless_usable("ema_update_", "triton")
    params = make_params(torch.float32)
    ema = [torch.randn_like(p) for p in params]
    expected = [e.clone() for e in ema]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            ck.ema_update_(ema, params, 0.9, backend="triton")
    assert ck.used_backends()["ema_update_"] != "triton"
    for e, p in zip(expected, params):
        e.lerp_(p, 0.1)
    graph.replay()
    for got, want in zip(ema, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_adamw_ema_step_refuses_capture(backend):
    # Its step count, lr and bias corrections are host numbers: a replay would repeat them.
    skip_unless_usable("adamw_ema_", backend)
    params = [p.requires_grad_() for p in make_params(torch.bfloat16)]
    opt = ck.FusedAdamWEMA(params, lr=1e-2, ema_decay=0.9, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        capture(opt.step)


# ---------------------------------------------------------------------------------------
# the benchmarks' graph timer
# ---------------------------------------------------------------------------------------
def test_graph_timer_times_replays_and_reports_what_cannot_be_captured():
    x = torch.randn(1 << 20, device="cuda")
    (median, q20, q80), why = timers.graph_ms(lambda: x.mul(2), 1, 5)
    assert why is None and 0 < q20 <= median <= q80
    stream = torch.cuda.current_stream()
    times, why = timers.graph_ms(lambda: x.sum().item(), 1, 5)  # .item() waits for the GPU
    assert times is None and "captur" in why
    assert torch.cuda.current_stream() == stream  # the failed capture gave the caller's stream back
    times, why = timers.graph_ms(lambda: x.mul(2), 1, 5)  # and CUDA still captures
    assert why is None
    assert timers.host_us(lambda: x.mul(2)) > 0
