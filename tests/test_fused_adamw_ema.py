"""FusedAdamWEMA against torch.optim.AdamW + ck.ema_update_ (many steps) and an fp64 step."""
import copy
import math

import pytest
import torch

import cckernels as ck
from cckernels.backend import available
from test_ema_update import views_of_one_buffer

CPU_BACKENDS = ["torch", "triton"]
GPU_BACKENDS = ["cuda", "triton", "torch"]
SHAPES = [(1,), (77,), (10, 10), (257,), (3, 5, 7), (4, 3, 3, 3)]
GROUPS = [  # two groups with different hyperparameters; the second mixes in weight_decay=0
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0),
]
EMA_DECAY = 0.9


def skip_unless_usable(backend, device):
    if backend not in available("adamw_ema_", torch.device(device)):
        pytest.skip(f"backend {backend} is not usable on {device} here")


def make_params(device):
    return [torch.randn(s, device=device) for s in SHAPES]


def groups_of(params):
    return [dict(params=params[:3], **GROUPS[0]), dict(params=params[3:], **GROUPS[1])]


def run_against_torch(backend, dtype, device, steps):
    """`steps` steps with clipping and some grads None; returns (ours, reference) weights/EMAs.

    Reference: torch.optim.AdamW on fp32 weights given the grads our params see (rounded to
    their dtype), then ck.ema_update_ over every param. Ours keeps fp32 masters for bf16/fp16.
    """
    init = make_params(device) + [torch.randn(0, device=device)]  # an empty one too, in the second group
    ref = [p.clone().requires_grad_() for p in init]
    ours = [p.to(dtype).requires_grad_() for p in init]
    if dtype != torch.float32:  # start both from the same (rounded) weights
        ref = [p.detach().float().requires_grad_() for p in ours]
    ref_opt = torch.optim.AdamW(groups_of(ref), foreach=False)
    opt = ck.FusedAdamWEMA(groups_of(ours), ema_decay=EMA_DECAY, backend=backend)
    ref_ema = [p.detach().clone() for p in ref]
    for step in range(steps):
        for i, (r, o) in enumerate(zip(ref, ours)):
            skip = (i + step) % 4 == 0  # every param misses some steps
            g = None if skip else (3 * torch.randn(r.shape, device=device)).to(dtype)
            o.grad = g
            r.grad = None if skip else g.float()
        torch.nn.utils.clip_grad_norm_(ours, 1.0)
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_grads = [None if o.grad is None else o.grad.float() for o in ours]  # clipped in dtype
        for r, g in zip(ref, ref_grads):
            r.grad = g
        ref_opt.step()
        ck.ema_update_(ref_ema, ref, EMA_DECAY, backend="torch")
        opt.step()
        assert ck.used_backends()["adamw_ema_"] == backend
    weights = [opt.state[p].get("master", p).detach() for p in ours]
    return ours, weights, opt, ref, ref_ema


def check_run(backend, dtype, device, steps):
    skip_unless_usable(backend, device)
    ours, weights, opt, ref, ref_ema = run_against_torch(backend, dtype, device, steps)
    for w, r, e, re, p in zip(weights, ref, opt.ema_params(), ref_ema, ours):
        assert w.dtype == e.dtype == torch.float32
        torch.testing.assert_close(w, r.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(e, re, rtol=1e-5, atol=1e-5)
        assert torch.equal(p.detach(), w.to(p.dtype))  # params hold the master rounded to their dtype


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_adamw_then_ema_cpu(backend, dtype):
    check_run(backend, dtype, "cpu", steps=20 if backend == "torch" else 4)  # the interpreter is slow


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_adamw_then_ema_gpu(backend, dtype):
    check_run(backend, dtype, "cuda", steps=50)


def fp64_step(w, g, m, v, group, step, ema, decay):
    beta1, beta2 = group["betas"]
    w = w * (1 - group["lr"] * group["weight_decay"])
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = v.sqrt() / math.sqrt(1 - beta2**step) + group["eps"]
    w = w - group["lr"] / (1 - beta1**step) * m / denom
    return w, m, v, decay * ema + (1 - decay) * w


def one_step_from_random_state(backend, dtype, device):
    """Step 5 from a random optimizer state; returns [(state after, state before in fp64)]."""
    torch.manual_seed(1)
    params = [torch.randn(s, device=device).to(dtype).requires_grad_() for s in SHAPES + [(2 * 4096 + 5,)]]
    opt = ck.FusedAdamWEMA(params, **FP64_GROUP, ema_decay=0.99, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # creates the state, then it is randomized
    before = []
    for p in params:
        s = opt.state[p]
        s["step"] = 4
        s["exp_avg"].normal_()
        s["exp_avg_sq"].uniform_(1e-4, 1.0)
        s["ema"].normal_()
        p.grad = torch.randn_like(p)
        w = s.get("master", p).detach()
        before.append(dict(w=w.double(), g=p.grad.double(), m=s["exp_avg"].double(), v=s["exp_avg_sq"].double(),
                           ema=s["ema"].double()))  # fmt: skip
    opt.step()
    after = [dict(w=opt.state[p].get("master", p).detach(), m=opt.state[p]["exp_avg"], v=opt.state[p]["exp_avg_sq"],
                  ema=opt.state[p]["ema"]) for p in params]  # fmt: skip
    return list(zip(after, before))


FP64_GROUP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def check_one_step_fp64(backend, dtype, device):
    """Every buffer's error vs an fp64 step within 2x the torch backend's error (+ a floor)."""
    skip_unless_usable(backend, device)
    ours = one_step_from_random_state(backend, dtype, device)
    base = one_step_from_random_state("torch", dtype, device)
    for (out, b), (base_out, _) in zip(ours, base):
        exact = fp64_step(b["w"], b["g"], b["m"], b["v"], FP64_GROUP, 5, b["ema"], 0.99)
        for key, ref in zip(("w", "m", "v", "ema"), exact):
            err = (out[key].double() - ref).abs().max().item()
            base_err = (base_out[key].double() - ref).abs().max().item()
            assert err <= 2 * base_err + 1e-6 * ref.abs().max().item(), (key, err, base_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_step_vs_fp64_cpu(dtype):
    check_one_step_fp64("triton", dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_step_vs_fp64_gpu(backend, dtype):
    check_one_step_fp64(backend, dtype, "cuda")


def steps_on_flat_views(backend, dtype, device, shapes, offset=1):
    """3 steps of params whose data and grads are views of flat buffers starting `offset`
    elements in (flat-parameter wrappers; offset 1: nothing 16-byte aligned)."""
    torch.manual_seed(3)
    params, flat = views_of_one_buffer(shapes, dtype, device, offset)
    grads, grad_flat = views_of_one_buffer(shapes, dtype, device, offset)
    for p, g in zip(params, grads):
        p.grad = g
    opt = ck.FusedAdamWEMA(params, lr=1e-2, ema_decay=0.9, backend=backend)
    for _ in range(3):
        grad_flat.normal_()
        opt.step()
    return params, opt, flat


def check_flat_views(backend, dtype, device, shapes):
    """`backend` against the torch backend on misaligned views (and untouched around them)."""
    skip_unless_usable(backend, device)
    ours, opt, flat = steps_on_flat_views(backend, dtype, device, shapes)
    assert ck.used_backends()["adamw_ema_"] == backend
    theirs, ref_opt, ref_flat = steps_on_flat_views("torch", dtype, device, shapes)
    assert flat[0] == ref_flat[0] and flat[-1] == ref_flat[-1]  # the torch backend never writes there
    for p, r in zip(ours, theirs):
        for key in ("exp_avg", "exp_avg_sq", "ema") + (() if dtype == torch.float32 else ("master",)):
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[r][key], rtol=1e-5, atol=1e-6)
        assert torch.equal(p, opt.state[p].get("master", p).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_flat_views_cpu(dtype):
    check_flat_views("triton", dtype, "cpu", SHAPES + [(2 * 4096 + 5,)])


def check_grads_strided_in_length_one_dims(backend, device):
    """1x1 conv weights whose grads a channels_last convolution gave other strides in the
    length-1 dims (the same memory order) step on `backend`, as the torch backend does."""
    skip_unless_usable(backend, device)
    results = []
    for b in (backend, "torch"):
        torch.manual_seed(4)
        params = [torch.randn(64, 32, 1, 1, device=device, requires_grad=True), torch.randn(7, device=device, requires_grad=True)]
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(device)
        params[0].grad = torch.empty_like(params[0], memory_format=torch.channels_last).copy_(params[0].grad)
        assert params[0].stride() == (32, 1, 1, 1) and params[0].grad.stride() == (32, 1, 32, 32)
        opt = ck.FusedAdamWEMA(params, lr=1e-2, ema_decay=0.9, backend=b)
        opt.step()
        assert ck.used_backends()["adamw_ema_"] == b
        results.append([t for p in params for t in (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["ema"])])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_grads_strided_in_length_one_dims_cpu():
    check_grads_strided_in_length_one_dims("triton", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_grads_strided_in_length_one_dims_gpu(backend):
    check_grads_strided_in_length_one_dims(backend, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_tensors_misaligned_flat_views_gpu(backend, dtype):
    # More tensors than one CUDA launch's table holds (36 at depth 6), one tensor longer than a
    # launch's 384 chunks of 65536, odd sizes and empty ones.
    sizes = [int(n) for n in torch.randint(0, 3000, (100,), generator=torch.Generator().manual_seed(0))]
    check_flat_views(backend, dtype, "cuda", [(n,) for n in sizes] + [(0,), (65537,), (384 * 65536 + 1,)] + SHAPES)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_params_on_a_gpu_that_is_not_the_current_one(backend):
    with torch.cuda.device(0):  # Triton launches on the current device unless told otherwise
        check_run(backend, torch.bfloat16, "cuda:1", steps=5)


def test_params_on_two_devices_without_grads():
    cpu = torch.randn(3, requires_grad=True)
    meta = torch.randn(4, device="meta", requires_grad=True)  # stands in for a second device
    opt = ck.FusedAdamWEMA([cpu, meta], ema_decay=0.5, backend="torch")
    start = cpu.detach().clone()
    with torch.no_grad():
        cpu.add_(1.0)
    opt.step()  # no grads: nothing is stepped; each device's EMA moves toward its params
    torch.testing.assert_close(opt.state[cpu]["ema"], start + 0.5)
    assert opt.state[meta]["ema"].device.type == "meta"


def test_a_torch_adamw_state_dict_continues_as_adamw():
    # Switching optimizers mid-run: AdamW's state (tensor steps, its own group keys, no
    # ema_decay) loads, and the next steps are AdamW's; amsgrad is refused by name.
    torch.manual_seed(5)
    params = [torch.randn(7, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    theirs = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1)
    for step in range(4):
        for p, t in zip(params, twins):
            t.grad = torch.randn_like(t)
            p.grad = t.grad.clone()
        if step == 2:  # two steps of AdamW, then ours from its state
            ours = ck.FusedAdamWEMA(params, lr=1.0, ema_decay=0.9, backend="torch")
            with torch.no_grad():
                for p, t in zip(params, twins):
                    p.copy_(t)
            ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # as from a file: no shared tensors
            assert ours.param_groups[0]["lr"] == 1e-2 and ours.param_groups[0]["ema_decay"] == 0.9
            assert not ours.ema_started  # AdamW has no EMA to load
        if step >= 2:
            ours.step()
        theirs.step()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t)
    bad = theirs.state_dict()
    bad["param_groups"][0]["amsgrad"] = True
    with pytest.raises(ValueError, match="param group 0 of the state dict: amsgrad=True is not supported"):
        ours.load_state_dict(bad)


def test_state_dict_round_trip_keeps_fp32_state():
    params = [p.to(torch.bfloat16).requires_grad_() for p in make_params("cpu")]
    opt = ck.FusedAdamWEMA(groups_of(params), backend="torch")

    def steps(opt, params, n, seed):
        torch.manual_seed(seed)
        for _ in range(n):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()

    steps(opt, params, 2, 0)
    opt.start_ema(0.95)
    steps(opt, params, 2, 1)
    saved = copy.deepcopy(opt.state_dict())
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = ck.FusedAdamWEMA(groups_of(params2), backend="torch")
    opt2.load_state_dict(saved)
    assert opt2.ema_started and [g["ema_decay"] for g in opt2.param_groups] == [0.95, 0.95]
    for p in params2:  # torch's load_state_dict would have cast these to bf16
        assert all(opt2.state[p][k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "master", "ema"))
    steps(opt, params, 3, 2)
    steps(opt2, params2, 3, 2)
    for p, p2 in zip(params, params2):
        assert torch.equal(p, p2)
        for key in ("exp_avg", "exp_avg_sq", "master", "ema"):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key])


def test_state_dict_without_ema_then_the_ema_restarted_from_its_tensors():
    # A trainer saves the EMA once (ema.safetensors), not also inside optimizer.pt.
    params = [p.requires_grad_() for p in make_params("cpu")]
    opt = ck.FusedAdamWEMA(params, ema_decay=0.9, backend="torch")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    saved = copy.deepcopy(opt.state_dict(ema=False))  # as torch.save + load: no shared tensors
    assert all("ema" not in s and "exp_avg" in s for s in saved["state"].values())
    assert all("ema" in opt.state[p] for p in params)  # the optimizer's own state is untouched
    opt2 = ck.FusedAdamWEMA([p.detach().clone().requires_grad_() for p in params], backend="torch")
    opt2.load_state_dict(saved)
    opt2.start_ema()
    for e, e2 in zip(opt.ema_params(), opt2.ema_params()):
        e2.copy_(e)
    for o in (opt, opt2):
        for p in o._params():
            p.grad = torch.ones_like(p)
        o.step()
    for e, e2 in zip(opt.ema_params(), opt2.ema_params()):
        assert torch.equal(e, e2)


def _fp32_params():
    params = [p.requires_grad_() for p in make_params("cpu")]
    params[-1].data = params[-1].data.to(memory_format=torch.channels_last)
    return params


def _steps(opt, n, seed):
    torch.manual_seed(seed)
    for _ in range(n):
        for p in opt._params():
            p.grad = torch.randn(p.shape).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cast_params_keeps_the_fp32_values_as_masters(backend):
    # bf16 weights, fp32 masters: the trainer's train.precision=bf16-weights. The same steps
    # (grads rounded to bf16, as the bf16 params get them) on fp32 params are the reference.
    params = _fp32_params()
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = ck.FusedAdamWEMA(groups_of(params), ema_decay=0.9, backend=backend)
    ids = [id(p) for p in params]
    opt.cast_params_(torch.bfloat16)
    assert [id(p) for p in opt._params()] == ids and all(p.dtype == torch.bfloat16 for p in params)
    assert params[-1].is_contiguous(memory_format=torch.channels_last)
    for m, r in zip(opt.master_weights(), ref):
        assert m.dtype == torch.float32 and torch.equal(m, r)  # nothing rounded away
    ref_opt = ck.FusedAdamWEMA(groups_of(ref), ema_decay=0.9, backend="torch")
    for p, r in zip(params, ref):
        p.grad = torch.randn(p.shape).to(torch.bfloat16)
        r.grad = p.grad.float()
    opt.step()
    ref_opt.step()
    for p, m, r, e, re in zip(params, opt.master_weights(), ref, opt.ema_params(), ref_opt.ema_params()):
        torch.testing.assert_close(m, r.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(e, re, rtol=1e-6, atol=1e-6)
        assert torch.equal(p.detach(), m.to(torch.bfloat16))


def test_resume_without_masters_from_the_saved_fp32_weights():
    # The trainer saves master_weights() as the model and state_dict(master=False); resuming
    # loads the fp32 weights, the state, and casts again: the run goes on bit for bit.
    params = _fp32_params()
    opt = ck.FusedAdamWEMA(groups_of(params), backend="torch")
    opt.cast_params_(torch.bfloat16)
    _steps(opt, 2, 0)
    weights = [m.clone() for m in opt.master_weights()]
    saved = copy.deepcopy(opt.state_dict(master=False))
    assert all("master" not in s and "exp_avg" in s for s in saved["state"].values())
    assert all("master" in opt.state[p] for p in params)  # the optimizer's own state is untouched
    params2 = [w.clone().requires_grad_() for w in weights]
    opt2 = ck.FusedAdamWEMA(groups_of(params2), backend="torch")
    opt2.load_state_dict(saved)
    opt2.cast_params_(torch.bfloat16)
    _steps(opt, 3, 1)
    _steps(opt2, 3, 1)
    for a, b in zip(opt.master_weights() + params, opt2.master_weights() + params2):
        assert torch.equal(a, b)


def test_a_state_without_masters_loaded_after_cast_params_keeps_them():
    # load_state_dict replaces the whole state: cast_params_' masters, and a stepped bf16
    # param's, must survive a state saved with master=False (else step() has no master).
    params = _fp32_params()
    opt = ck.FusedAdamWEMA(params, backend="torch")
    opt.cast_params_(torch.bfloat16)
    _steps(opt, 1, 0)
    saved = copy.deepcopy(opt.state_dict(master=False))
    params2 = [m.clone().requires_grad_() for m in opt.master_weights()]
    opt2 = ck.FusedAdamWEMA(params2, backend="torch")
    opt2.cast_params_(torch.bfloat16)  # before the load, this time
    opt2.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(opt2.master_weights(), opt.master_weights()))
    _steps(opt, 1, 1)
    _steps(opt2, 1, 1)
    assert all(torch.equal(a, b) for a, b in zip(opt2.master_weights() + params2, opt.master_weights() + params))
    bf16 = [p.detach().clone().requires_grad_() for p in params]  # bf16 from the start: masters from their values
    opt3 = ck.FusedAdamWEMA(bf16, backend="torch")
    opt3.load_state_dict(saved)
    assert all(torch.equal(m, p.float()) for m, p in zip(opt3.master_weights(), bf16))
    _steps(opt3, 1, 1)


def test_a_bf16_runs_state_resumed_on_fp32_params_drops_the_masters():
    params = [p.to(torch.bfloat16).requires_grad_() for p in make_params("cpu")]
    opt = ck.FusedAdamWEMA(params, backend="torch")
    _steps(opt, 1, 0)
    params2 = [m.clone().requires_grad_() for m in opt.master_weights()]
    opt2 = ck.FusedAdamWEMA(params2, backend="torch")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all("master" not in opt2.state[p] for p in params2)
    assert all(w is p for w, p in zip(opt2.master_weights(), params2))  # an fp32 param is its own master


def test_cast_params_casts_the_chosen_ones():
    # As the trainer keeps GroupNorm parameters fp32: the others stay as they were, steps mix both.
    params = _fp32_params()
    before = [p.detach().clone() for p in params]
    opt = ck.FusedAdamWEMA(params, backend="torch")
    opt.cast_params_(torch.bfloat16, params[::2])
    assert [p.dtype for p in params] == [torch.bfloat16, torch.float32] * 3
    assert ["master" in opt.state[p] for p in params] == [True, False] * 3
    assert all(torch.equal(m, b) for m, b in zip(opt.master_weights(), before))
    _steps(opt, 2, 0)
    assert all(torch.equal(p, m.to(p.dtype)) for p, m in zip(params, opt.master_weights()))


def test_cast_params_bad_input():
    params = _fp32_params()
    opt = ck.FusedAdamWEMA(params, backend="torch")
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        opt.cast_params_(torch.float64)
    with pytest.raises(ValueError, match=r"params\[0\] \(shape \(2,\)\) is a tensor this optimizer does not step"):
        opt.cast_params_(torch.bfloat16, [torch.nn.Parameter(torch.zeros(2))])
    params[1].grad = torch.zeros_like(params[1])
    with pytest.raises(ValueError, match=r"before the first backward\); params\[1\]"):
        opt.cast_params_(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in params) and not any(opt.state.values())  # none cast


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ema_controls(backend):
    params = [torch.randn(s).requires_grad_() for s in SHAPES]
    opt = ck.FusedAdamWEMA(params, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert not opt.ema_started and opt.ema_params() == []
    assert all("ema" not in opt.state[p] for p in params)  # no EMA memory before the start
    with pytest.raises(ValueError, match="decay"):
        opt.start_ema()
    opt.start_ema(0.5)
    assert all(torch.equal(e, p) for e, p in zip(opt.ema_params(), params))
    frozen = [e.clone() for e in opt.ema_params()]
    opt.step(ema=False)
    assert all(torch.equal(e, f) for e, f in zip(opt.ema_params(), frozen))
    opt.step(ema_decay=1.0)
    assert all(torch.equal(e, f) for e, f in zip(opt.ema_params(), frozen))
    opt.step(ema_decay=0.0)
    assert all(torch.equal(e, p) for e, p in zip(opt.ema_params(), params))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9,)), "betas"),
        (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(ema_decay=1.5), "ema_decay"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ck.FusedAdamWEMA([torch.zeros(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize(
    "group, match",
    [
        (dict(betas=(0.9, 1.0)), r"param group 1: betas\[1\]"),  # would divide by sqrt(1 - 1) = 0
        (dict(lr=-1e-3), "param group 1: lr"),
        (dict(ema_decay=2.0), "param group 1: ema_decay"),
        (dict(amsgrad=True), "param group 1: amsgrad=True is not supported"),  # would be ignored
        (dict(maximize=True), "param group 1: maximize=True is not supported"),
        (dict(params=[torch.zeros(2, dtype=torch.float64, requires_grad=True)]),
         r"param group 1: params\[0\] \(shape \(2,\)\) is torch.float64"),  # states are fp32
    ],
)
def test_bad_param_group(group, match):
    good = dict(params=[torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match=match):
        ck.FusedAdamWEMA([good, {"params": [torch.zeros(2, requires_grad=True)], **group}])
    opt = ck.FusedAdamWEMA([good])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], **group})
    assert len(opt.param_groups) == 1
    # A group copied from torch.optim.AdamW's param_groups (amsgrad=False, ...) is fine.
    torch_group = torch.optim.AdamW([torch.zeros(2, requires_grad=True)]).param_groups[0]
    opt.add_param_group(dict(torch_group))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(params=[torch.zeros(3)]), r"params\[0\] is on cpu"),
        (dict(grads=[]), "expected equal counts"),
        (dict(scalars=[1.0] * 7), "scalars has 7 values"),
        (dict(masters=[torch.zeros(3)] * 2), "masters has 2 tensors"),
    ],
)
def test_extension_boundary_checks(change, match):
    """cckernels._C.adamw_ema_ names the bad argument (these checks need no GPU)."""
    _C = pytest.importorskip("cckernels._C", reason="cckernels._C was not built")
    args = dict(params=[torch.zeros(3)], grads=[torch.zeros(3)], exp_avgs=[torch.zeros(3)], exp_avg_sqs=[torch.zeros(3)],
                masters=[], emas=[], scalars=[1.0] * 8) | change  # fmt: skip
    with pytest.raises(ValueError, match=match):
        _C.adamw_ema_(**args)


def mixed_dtype_params(device, low=torch.bfloat16):
    """bf16 (or `low`) weights beside fp32 norm weights, as train.precision=bf16-weights; odd
    sizes, fresh grads."""
    shapes = [(77, 5), (320,), (3, 3, 7, 1), (1,), (1280, 3)]
    params = [torch.randn(s, device=device, dtype=torch.float32 if i % 2 else low) for i, s in enumerate(shapes)]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    return params


def check_clip_matches_torch(device, max_norm, low=torch.bfloat16, norm_type=2.0):
    ours = mixed_dtype_params(device, low)
    theirs = [p.detach().clone() for p in ours]
    for p, q in zip(ours, theirs):
        q.grad = p.grad.clone()
    norm = ck.clip_grad_norm_(ours, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert norm.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(norm, expected, rtol=0, atol=0)
    for p, q in zip(ours, theirs):
        assert p.grad.dtype == q.grad.dtype
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


CLIP_CASES = [(1.0, torch.bfloat16, 2.0), (1e6, torch.bfloat16, 2.0), (1.0, torch.float16, 2.0),  # clipped, left alone
              (1.0, torch.bfloat16, math.inf)]  # fmt: skip


@pytest.mark.parametrize("max_norm, low, norm_type", CLIP_CASES)
def test_clip_grad_norm_matches_torch_cpu(max_norm, low, norm_type):
    check_clip_matches_torch("cpu", max_norm, low, norm_type)


@pytest.mark.gpu
@pytest.mark.parametrize("max_norm, low, norm_type", CLIP_CASES)
def test_clip_grad_norm_matches_torch_gpu(max_norm, low, norm_type):
    check_clip_matches_torch("cuda", max_norm, low, norm_type)


@pytest.mark.parametrize("max_norm", [-1.0, 0.0, math.nan, "1", True])
def test_clip_grad_norm_refuses_a_bad_max_norm(max_norm):
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"max_norm must be a number in \(0.0, inf\]"):
        ck.clip_grad_norm_([p], max_norm)
    assert torch.equal(p.grad, torch.ones(3))
    ck.clip_grad_norm_([p], math.inf)  # no clipping
    assert torch.equal(p.grad, torch.ones(3))


def test_clip_grad_norm_without_grads():
    params = [torch.randn(3, requires_grad=True), torch.randn(2, dtype=torch.bfloat16, requires_grad=True)]
    assert ck.clip_grad_norm_(params, 1.0).item() == torch.nn.utils.clip_grad_norm_(params, 1.0).item() == 0.0
    assert all(p.grad is None for p in params)


@pytest.mark.gpu
def test_clip_grad_norm_scales_mixed_dtypes_without_a_launch_per_tensor():
    params = [p for _ in range(20) for p in mixed_dtype_params("cuda")]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ck.clip_grad_norm_(params, 1.0)
    names = [e.name for e in prof.events()]
    assert "aten::_foreach_mul_" in names and "aten::mul_" not in names, sorted(set(names))
