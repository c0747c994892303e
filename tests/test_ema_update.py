"""ck.ema_update_ on every backend against an fp64 reference: odd sizes and counts, all dtypes."""
import pytest
import torch

import cckernels as ck
from cckernels.backend import Unsupported

CPU_BACKENDS = ["torch", "triton"]
GPU_BACKENDS = ["cuda", "triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd sizes, a tensor spanning several Triton chunks (8192 elements) with a ragged tail, an
# empty tensor, and a channels_last conv weight (dense but not contiguous).
SHAPES = [(1,), (77,), (100,), (257,), (3, 5, 7), (2 * 8192 + 3,), (0,), (5, 3, 3, 3)]


def make(shapes, dtype, device):
    params, ema = [], []
    for shape in shapes:
        p = torch.randn(shape, device=device).to(dtype)
        e = torch.randn(shape, device=device)
        if len(shape) == 4:
            p, e = p.to(memory_format=torch.channels_last), e.to(memory_format=torch.channels_last)
        params.append(p)
        ema.append(e)
    return ema, params


def check(ema, params, decay, backend):
    """Run ema_update_ on `backend`; its error vs fp64 must be within 2x torch's (+ a floor)."""
    exact = [decay * e.double() + (1 - decay) * p.double() for e, p in zip(ema, params)]
    torch_out = [e.clone() for e in ema]
    ck.ema_update_(torch_out, params, decay, backend="torch")
    ck.ema_update_(ema, params, decay, backend=backend)
    assert ck.used_backends()["ema_update_"] == backend
    for out, ref, base in zip(ema, exact, torch_out):
        assert out.dtype == torch.float32 and out.stride() == base.stride()
        if not out.numel():
            continue
        err = (out.double() - ref).abs().max().item()
        base_err = (base.double() - ref).abs().max().item()
        assert err <= 2 * base_err + 1e-7 * ref.abs().max().item(), (err, base_err)


def skip_unless_usable(backend, device):
    if backend not in ck.available_backends(device)["ema_update_"]:
        pytest.skip(f"backend {backend} is not usable on {device} here")


def run_backend_case(backend, dtype, decay, device):
    skip_unless_usable(backend, device)
    ema, params = make(SHAPES, dtype, device)
    check(ema, params, decay, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [0.0, 0.3, 0.9999, 1.0])
def test_ema_update_cpu(backend, dtype, decay):
    run_backend_case(backend, dtype, decay, "cpu")


def test_device_tables_of_the_last_lists_stay_cached(monkeypatch):
    """multi_tensor keeps the tables of the _CACHE_SIZE lists used last: one more evicts the
    oldest, which a later call rebuilds (same results), and a call reuses its list's table."""
    from collections import OrderedDict

    from cckernels.triton import multi_tensor

    monkeypatch.setattr(multi_tensor, "_cache", OrderedDict())
    lists = [make([(3,), (77,)], torch.float32, "cpu") for _ in range(multi_tensor._CACHE_SIZE + 1)]
    for ema, params in lists:
        check(ema, params, 0.9, "triton")
    keys = list(multi_tensor._cache)  # the first list's table was evicted
    assert len(keys) == multi_tensor._CACHE_SIZE
    check(*lists[1], 0.8, "triton")  # the oldest kept table, reused: now the newest
    keys = keys[1:] + keys[:1]
    assert list(multi_tensor._cache) == keys
    check(*lists[0], 0.8, "triton")  # rebuilt, evicting the oldest again
    assert list(multi_tensor._cache)[:-1] == keys[1:] and list(multi_tensor._cache)[-1] not in keys


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [0.0, 0.3, 0.9999, 1.0])
def test_ema_update_gpu(backend, dtype, decay):
    run_backend_case(backend, dtype, decay, "cuda")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decay_0_and_1_exact(backend):
    ema, params = make([(77,), (3, 5, 7)], torch.bfloat16, "cpu")
    before = [e.clone() for e in ema]
    ck.ema_update_(ema, params, 1.0, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(ema, before))
    ck.ema_update_(ema, params, 0.0, backend=backend)
    assert all(torch.equal(e, p.float()) for e, p in zip(ema, params))


def mixed_lists(device):
    """Many tensors of mixed dtypes (one launch per dtype), repeated with new tensors."""
    shapes = [(n,) for n in range(1, 40, 4)] + [(9000,), (4, 77), (33,)]
    ema, params = [], []
    for i, dtype in enumerate(DTYPES):
        e, p = make(shapes[i::3], dtype, device)
        ema += e
        params += p
    return ema, params


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_many_tensors_mixed_dtypes_repeated(backend):
    ema, params = mixed_lists("cpu")
    for decay in (0.9, 0.5):  # second call reuses the cached device tables
        check(ema, params, decay, backend)
    ema, params = mixed_lists("cpu")  # new tensors: tables must not be reused wrongly
    check(ema, params, 0.7, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_many_tensors_mixed_dtypes_gpu(backend):
    skip_unless_usable(backend, "cuda")
    ema, params = mixed_lists("cuda")
    for decay in (0.9, 0.5):
        check(ema, params, decay, backend)


def long_run_errors(update, device, steps=10_000, decay=0.9999):
    """Max error vs fp64 after `steps` updates toward noisy weights, of `update` and of the torch
    backend, and the fp64 EMA's max. One-step tests miss errors that only add up: a form whose
    fp32 decay and 1 - decay do not sum to 1 ends 25x further off than torch.lerp here."""
    gen = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(4099, device=device, generator=gen) + 2
    ours = [torch.randn(4099, device=device, generator=gen)]
    theirs, exact = [ours[0].clone()], ours[0].double()
    for _ in range(steps):
        p = [base + 0.1 * torch.randn(4099, device=device, generator=gen)]
        exact = decay * exact + (1 - decay) * p[0].double()
        ck.ema_update_(theirs, p, decay, backend="torch")
        update(ours, p, decay)  # last: used_backends() then names the backend under test
    return [(t[0].double() - exact).abs().max().item() for t in (ours, theirs)] + [exact.abs().max().item()]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_long_run_stays_as_close_as_torch(backend):
    skip_unless_usable(backend, "cuda")
    err, torch_err, top = long_run_errors(lambda e, p, d: ck.ema_update_(e, p, d, backend=backend), "cuda")
    assert ck.used_backends()["ema_update_"] == backend
    assert err <= 2 * torch_err + 1e-6 * top, (err, torch_err)


def views_of_one_buffer(shapes, dtype, device, offset):
    """Consecutive views of one flat buffer starting `offset` elements in (as flat-parameter
    wrappers make; offset 1: no view is 16-byte aligned), and the buffer."""
    flat = torch.randn(offset + sum(torch.Size(s).numel() for s in shapes) + 1, device=device).to(dtype)
    views, at = [], offset
    for shape in shapes:
        views.append(flat[at : at + torch.Size(shape).numel()].view(shape))
        at += views[-1].numel()
    return views, flat


def run_views_case(backend, device):
    # Misaligned: the Triton and CUDA kernels must take their unvectorized paths, and every
    # tensor's offset is counted from one shared storage.
    skip_unless_usable(backend, device)
    ema, ema_flat = views_of_one_buffer(SHAPES, torch.float32, device, 1)
    params, _ = views_of_one_buffer(SHAPES, torch.bfloat16, device, 3)
    before = ema_flat.clone()
    check(ema, params, 0.9, backend)
    assert ema_flat[0] == before[0] and ema_flat[-1] == before[-1]  # nothing written outside the views


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_misaligned_views_of_one_buffer_cpu(backend):
    run_views_case(backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_misaligned_views_of_one_buffer_gpu(backend):
    run_views_case(backend, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensors_on_a_gpu_that_is_not_the_current_one(backend):
    # Triton launches on the current device: dispatch must switch to the tensors' device.
    skip_unless_usable(backend, "cuda:1")
    ema, params = make(SHAPES, torch.bfloat16, "cuda:1")
    with torch.cuda.device(0):
        check(ema, params, 0.9, backend)


def test_triton_refuses_strided_inputs_and_dispatch_falls_back():
    from cckernels.triton.ema import ema_update_ as triton_ema

    p = torch.randn(6, 5).t()  # not dense in the ema's layout
    e = torch.randn(5, 6)
    with pytest.raises(Unsupported):
        triton_ema([e], [p], 0.5)
    ref = 0.5 * e.double() + 0.5 * p.double()
    ck.ema_update_([e], [p], 0.5, backend="triton")
    assert ck.used_backends()["ema_update_"] == "torch"
    torch.testing.assert_close(e.double(), ref)


def test_layout_check_takes_dense_twins_only():
    from cckernels.backend import check_same_layout

    def channels_last():
        return torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)

    check_same_layout("t", [[torch.randn(3, 4), channels_last()], [torch.randn(3, 4), channels_last()]])
    for other in (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 10)[..., ::2], torch.randn(120)):
        with pytest.raises(Unsupported, match="tensor 0 is not dense or its lists' shapes or memory orders differ"):
            check_same_layout("t", [[channels_last()], [other]])
    with pytest.raises(Unsupported):  # same shape and strides, but not dense
        check_same_layout("t", [[torch.randn(4, 10)[:, ::2]], [torch.randn(4, 10)[:, ::2]]])
    with pytest.raises(Unsupported, match="tensor 1 "):  # dense, same strides, another shape
        check_same_layout("t", [[torch.randn(3), torch.randn(4, 1)], [torch.randn(3), torch.randn(5, 1)]])
    # a 1x1 conv weight and its grad from a channels_last convolution: strides differ only in
    # length-1 dims, which place no element (the trainer's optimizer fell back to torch on them)
    weight = torch.randn(64, 32, 1, 1)
    grad = torch.randn(64, 32, 1, 1).to(memory_format=torch.channels_last)
    assert weight.stride() == (32, 1, 1, 1) and grad.stride() == (32, 1, 32, 32)
    check_same_layout("t", [[torch.randn(3), weight], [torch.randn(3), grad]])
    with pytest.raises(Unsupported, match="tensor 0 "):  # length-1 dims, and a real difference
        check_same_layout("t", [[torch.randn(4, 1, 3)], [torch.randn(3, 1, 4).transpose(0, 2)]])


def test_triton_refuses_before_its_first_launch(monkeypatch):
    # Mixed dtypes take one launch each. When the second dtype's table cannot be had (during a
    # CUDA-graph capture: not built yet), nothing may have run yet: the fallback redoes them all.
    import cckernels.triton.ema as triton_ema

    tables = triton_ema.tables
    calls = []

    def second_refuses(lists, chunk):
        calls.append(lists[1][0].dtype)
        if len(calls) == 2:
            raise Unsupported("no table")
        return tables(lists, chunk)

    monkeypatch.setattr(triton_ema, "tables", second_refuses)
    ema, params = [torch.randn(5), torch.randn(3)], [torch.randn(5), torch.randn(3).half()]
    exact = [0.5 * e.double() + 0.5 * p.double() for e, p in zip(ema, params)]
    ck.ema_update_(ema, params, 0.5, backend="triton")
    assert calls == [torch.float32, torch.float16] and ck.used_backends()["ema_update_"] == "torch"
    for e, x in zip(ema, exact):
        torch.testing.assert_close(e, x.float())


def test_triton_refuses_fp64_params():
    from cckernels.triton.ema import ema_update_ as triton_ema

    with pytest.raises(Unsupported):
        triton_ema([torch.zeros(3)], [torch.ones(3, dtype=torch.float64)], 0.5)


def test_lists_on_two_devices_are_refused_by_name():
    ema, params = [torch.zeros(3), torch.zeros(2, device="meta")], [torch.randn(3), torch.randn(2, device="meta")]
    with pytest.raises(ValueError, match=r"ema\[1\] \(meta\) and params\[1\] \(meta\) must be on ema\[0\]'s device \(cpu\)"):
        ck.ema_update_(ema, params, 0.9)
