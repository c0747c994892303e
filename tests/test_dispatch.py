"""Backend selection, fallback and argument checking of the public API."""
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import cckernels as ck
from cckernels import backend as backend_mod


def test_available_backends_lists_every_op_best_first():
    avail = ck.available_backends("cpu")
    assert set(avail) == {"attention", "group_norm", "geglu", "layer_norm", "ema_update_"}
    for op, names in avail.items():
        assert names[-1] == "torch"
        assert "cuda" not in names  # no CUDA kernels run on CPU tensors
        assert names == [b for b in backend_mod.IMPLEMENTATIONS[op] if b in names]  # the op's own order
        assert set(names) <= set(ck.BACKENDS)


def test_each_op_has_its_measured_order():
    # bench_ema on an H200: the Triton EMA and AdamW+EMA beat the CUDA ones; bench_group_norm:
    # the CUDA GroupNorm beats the Triton one.
    assert list(backend_mod.IMPLEMENTATIONS["ema_update_"]) == ["triton", "cuda", "torch"]
    assert list(backend_mod.OPTIMIZER_STEPS["adamw_ema_"]) == ["triton", "cuda", "torch"]
    assert list(backend_mod.IMPLEMENTATIONS["group_norm"]) == ["cuda", "triton", "torch"]
    assert list(backend_mod.IMPLEMENTATIONS["attention"]) == ["triton", "torch"]
    assert list(backend_mod.IMPLEMENTATIONS["geglu"]) == ["triton", "torch"]  # by bytes moved: not yet timed
    assert list(backend_mod.IMPLEMENTATIONS["layer_norm"]) == ["triton", "torch"]  # likewise


def test_triton_on_cpu_only_with_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert all("triton" not in v for v in ck.available_backends("cpu").values())


def test_unknown_backend_is_a_clear_error(monkeypatch):
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'.*cuda, triton, torch"):
        ck.group_norm(x, 2, backend="cudnn")
    monkeypatch.setenv("CCKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend CCKERNELS_BACKEND='nope'"):
        ck.group_norm(x, 2)


def test_available_backends_of_a_device_string(monkeypatch):
    with pytest.raises(ValueError, match="device 'gpu0' is not a torch device"):
        ck.available_backends("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    monkeypatch.setattr(backend_mod, "_usable_cache", {})
    assert ck.available_backends("cuda") == {op: ["torch"] for op in backend_mod.IMPLEMENTATIONS}


def test_environment_settings_name_themselves_when_bad():
    for name, value, match in (("CCKERNELS_GROUP_NORM_TRITON_FROM", "64M", "CCKERNELS_GROUP_NORM_TRITON_FROM='64M'"),
                               ("CCKERNELS_AUTOTUNE", "maybe", "CCKERNELS_AUTOTUNE='maybe'")):
        code = ("import torch, triton, cckernels.backend, cckernels.triton.attention as a; "
                "a._prune([triton.Config({'BLOCK_M': 64, 'BLOCK_N': 64}, num_warps=4, num_stages=2)], "
                "{'Q': torch.empty(0, dtype=torch.bfloat16), 'Lq': 64, 'Lk': 64}, a._fwd_footprint, a.FWD_FP32, "
                "target=(90, 232448), BLOCK_D=64)")
        env = {**os.environ, name: value, "TRITON_INTERPRET": "1"}
        err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stderr
        assert match in err, err[-2000:]


@pytest.fixture
def fake_backends(monkeypatch):
    """A 'cuda' backend that takes nothing and a 'triton' one that records its calls."""
    calls = []

    def refuses(*args):
        raise ck.Unsupported("fake: refuses everything")

    def records(x, *args):
        calls.append("triton")
        return torch.full_like(x, 7.0)

    monkeypatch.setattr(backend_mod, "_usable", lambda op, name, device: True)
    monkeypatch.setattr(backend_mod, "_load", {"cuda": refuses, "triton": records, "torch": None}.get)
    monkeypatch.setattr(
        backend_mod, "IMPLEMENTATIONS", {op: {"cuda": "cuda", "triton": "triton", "torch": "torch"} for op in backend_mod.IMPLEMENTATIONS}
    )
    monkeypatch.setattr(backend_mod, "_usable_cache", {})  # dispatch caches what _usable and _load found
    monkeypatch.delenv("CCKERNELS_BACKEND", raising=False)
    return calls


def test_fallback_to_next_backend_when_unsupported(fake_backends, caplog):
    x = torch.randn(1, 4, 2, 2)
    with caplog.at_level("INFO", logger="cckernels"):
        y = ck.group_norm(x, 2)
    assert fake_backends == ["triton"] and torch.all(y == 7)
    assert ck.used_backends()["group_norm"] == "triton"
    assert "refuses everything" in caplog.text


def test_requested_backend_then_the_ones_after_it(fake_backends, monkeypatch):
    x = torch.randn(1, 4, 2, 2)
    monkeypatch.setenv("CCKERNELS_BACKEND", "cuda")
    ck.group_norm(x, 2)
    assert ck.used_backends()["group_norm"] == "triton"
    monkeypatch.setattr(backend_mod, "_load", {"torch": lambda x, *a: torch.zeros_like(x)}.get)
    monkeypatch.setattr(backend_mod, "_usable_cache", {})
    assert torch.all(ck.group_norm(x, 2, backend="torch") == 0)
    assert ck.used_backends()["group_norm"] == "torch"


def test_requested_backend_falls_back_in_the_ops_own_order(monkeypatch):
    # ema_update_ prefers triton, then cuda: a refused "cuda" request goes on to torch, not back to triton.
    calls = []

    def fake(name, refuse):
        def run(*args):
            calls.append(name)
            if refuse:
                raise ck.Unsupported(f"fake {name} refuses")

        return run

    monkeypatch.setattr(backend_mod, "_usable", lambda op, name, device: True)
    monkeypatch.setattr(backend_mod, "_load", {"triton": fake("triton", False), "cuda": fake("cuda", True), "torch": fake("torch", False)}.get)
    order = {"triton": "triton", "cuda": "cuda", "torch": "torch"}
    monkeypatch.setattr(backend_mod, "IMPLEMENTATIONS", {op: order for op in backend_mod.IMPLEMENTATIONS})
    monkeypatch.setattr(backend_mod, "_usable_cache", {})
    monkeypatch.delenv("CCKERNELS_BACKEND", raising=False)
    assert ck.available_backends("cpu")["ema_update_"] == ["triton", "cuda", "torch"]
    ema, params = [torch.zeros(3)], [torch.ones(3)]
    ck.ema_update_(ema, params, 0.5)
    assert calls == ["triton"]
    ck.ema_update_(ema, params, 0.5, backend="cuda")
    assert calls == ["triton", "cuda", "torch"] and ck.used_backends()["ema_update_"] == "torch"


@pytest.fixture
def recording_backends(monkeypatch):
    """GroupNorm backends 'cuda', 'triton' and 'torch' that each take everything and record their calls."""
    calls = []

    def records(name):
        return lambda x, *args: calls.append(name) or x

    monkeypatch.setattr(backend_mod, "_usable", lambda op, name, device: True)
    monkeypatch.setattr(backend_mod, "_load", records)  # the table below makes each spec its backend's name
    monkeypatch.setattr(backend_mod, "IMPLEMENTATIONS", {op: {name: name for name in order}
                                                         for op, order in backend_mod.IMPLEMENTATIONS.items()})
    monkeypatch.setattr(backend_mod, "_usable_cache", {})
    monkeypatch.setattr(backend_mod, "_calls", {})
    monkeypatch.delenv("CCKERNELS_BACKEND", raising=False)
    return calls


def test_group_norm_takes_triton_first_for_large_inputs_if_asked_and_when_gpu_time_counts(recording_backends, monkeypatch):
    small, large = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 5, 5)  # 72 and 200 elements
    assert backend_mod.GROUP_NORM_TRITON_FIRST_ELEMENTS is None  # CCKERNELS_GROUP_NORM_TRITON_FROM unset
    ck.group_norm(large, 2)
    monkeypatch.setattr(backend_mod, "GROUP_NORM_TRITON_FIRST_ELEMENTS", 200)
    ck.group_norm(small, 2)
    ck.group_norm(large, 2)
    with ck.prefer_gpu_time():
        ck.group_norm(small, 2)
    ck.group_norm(small, 2)  # the block's preference ended with it
    assert recording_backends == ["cuda", "cuda", "triton", "triton", "cuda"]
    assert ck.backend_calls()["group_norm"] == {"cuda": 3, "triton": 2}
    ck.group_norm(large, 2, backend="cuda")  # a request beats the preference
    with ck.prefer_gpu_time():
        ck.ema_update_([torch.zeros(3)], [torch.ones(3)], 0.5)  # other ops keep their own order
    assert recording_backends[-2:] == ["cuda", "triton"]


def test_group_norm_under_capture_takes_the_graph_backend(recording_backends, monkeypatch):
    x = torch.randn(2, 4, 3, 3)
    assert backend_mod.GROUP_NORM_GRAPH_BACKEND == "triton"  # CCKERNELS_GROUP_NORM_GRAPH_BACKEND unset
    monkeypatch.setattr(backend_mod, "GROUP_NORM_GRAPH_BACKEND", "cuda")
    with ck.prefer_gpu_time():
        ck.group_norm(x, 2)
    assert recording_backends == ["cuda"]


def test_a_bad_graph_backend_names_the_valid_ones():
    env = {**os.environ, "CCKERNELS_GROUP_NORM_GRAPH_BACKEND": "apex"}
    out = subprocess.run([sys.executable, "-c", "import cckernels"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "expected one of triton, cuda" in out.stderr


def test_group_norm_falls_back_from_a_refusing_first_choice(recording_backends, monkeypatch):
    def refuses(*args):
        raise ck.Unsupported("fake triton refuses")

    load = backend_mod._load
    monkeypatch.setattr(backend_mod, "_load", lambda name: refuses if name == "triton" else load(name))
    with ck.prefer_gpu_time():
        ck.group_norm(torch.randn(1, 4, 2, 2), 2)
    assert recording_backends == ["cuda"]


@pytest.mark.parametrize("value,expected", [(None, True), ("", True), ("1", True), ("0", False)])
def test_env_flag(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("CCKERNELS_TEST_FLAG", raising=False)
    else:
        monkeypatch.setenv("CCKERNELS_TEST_FLAG", value)
    assert backend_mod.env_flag("CCKERNELS_TEST_FLAG", True) is expected


def test_env_flag_names_the_values_it_takes(monkeypatch):
    monkeypatch.setenv("CCKERNELS_TEST_FLAG", "off")
    with pytest.raises(ValueError, match="CCKERNELS_TEST_FLAG='off': use 1 \\(on\\) or 0 \\(off\\)"):
        backend_mod.env_flag("CCKERNELS_TEST_FLAG", True)


def test_cuda_group_norm_single_pass_switch():
    # read at import, as run_gpu.sh sets it for the processes after gpu_smoke.py
    code = "import cckernels.cuda as c; print(c.SINGLE_PASS)"
    env = {**os.environ, "CCKERNELS_GROUP_NORM_CUDA_SINGLE_PASS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_prefer_gpu_time_is_per_thread():
    seen = []
    with ck.prefer_gpu_time():
        thread = threading.Thread(target=lambda: seen.append(backend_mod._prefer_gpu_time.get()))
        thread.start()
        thread.join()
        seen.append(backend_mod._prefer_gpu_time.get())
    assert seen == [False, True]


def test_dispatch_probes_backends_once_but_reads_the_environment_every_call(monkeypatch):
    probes = []
    usable = backend_mod._usable
    monkeypatch.setattr(backend_mod, "_usable", lambda *args: probes.append(args) or usable(*args))
    monkeypatch.setattr(backend_mod, "_usable_cache", {})
    monkeypatch.delenv("CCKERNELS_BACKEND", raising=False)
    ema, params = [torch.randn(5)], [torch.randn(5)]
    ck.ema_update_(ema, params, 0.5)
    assert ck.used_backends()["ema_update_"] == "triton" and probes
    probed = len(probes)
    ck.ema_update_(ema, params, 0.5)
    assert len(probes) == probed  # the second call found the usable backends cached
    monkeypatch.setenv("CCKERNELS_BACKEND", "torch")
    ck.ema_update_(ema, params, 0.5)
    assert ck.used_backends()["ema_update_"] == "torch"
    monkeypatch.delenv("CCKERNELS_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # no Triton on CPU without the interpreter
    ck.ema_update_(ema, params, 0.5)
    assert ck.used_backends()["ema_update_"] == "torch"
    assert ck.available_backends("cpu")["ema_update_"] == ["torch"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ck.available_backends("cpu")["ema_update_"] == ["triton", "torch"]


def test_env_selects_backend(monkeypatch):
    monkeypatch.setenv("CCKERNELS_BACKEND", "torch")
    ck.attention(*(torch.randn(1, 3, 1, 32) for _ in range(3)))
    assert ck.used_backends()["attention"] == "torch"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=torch.randn(1, 3, 32)), "q must be 4-D"),
        (dict(k=torch.randn(1, 5, 2, 16), v=torch.randn(1, 5, 2, 16)), "disagree in batch, heads or head dim"),
        (dict(v=torch.randn(1, 6, 2, 32)), "k and v shapes differ"),
        (dict(q=torch.randn(1, 4, 2, 32).half()), "dtypes differ"),
        (dict(q=torch.randint(0, 3, (1, 4, 2, 32))), "dtype torch.int64"),
        (dict(q=torch.randn(1, 0, 2, 32)), "empty dimension"),
        (dict(scale=-1.0), r"scale must be a number in \(0, inf\)"),
        (dict(scale=0), r"scale must be a number in \(0, inf\)"),
        (dict(scale=True), r"scale must be a number in \(0, inf\), got True"),  # not taken as 1
        (dict(scale="0.1"), r"scale must be a number in \(0, inf\), got '0.1'"),
        (dict(scale=float("nan")), r"scale must be a number in \(0, inf\), got nan"),
        (dict(scale=float("inf")), r"scale must be a number in \(0, inf\), got inf"),
        (dict(q=[1, 2]), "q must be a torch.Tensor"),
    ],
)
def test_attention_bad_arguments(kwargs, match):
    args = dict(q=torch.randn(1, 4, 2, 32), k=torch.randn(1, 5, 2, 32), v=torch.randn(1, 5, 2, 32))
    args.update(kwargs)
    scale = args.pop("scale", None)
    with pytest.raises(ValueError, match=match):
        ck.attention(args["q"], args["k"], args["v"], scale=scale)


def test_numpy_numbers_are_numbers():
    # A scale, eps or decay computed with numpy (np.float32 is no Python float) was refused.
    np = pytest.importorskip("numpy")
    q, k, v = torch.randn(1, 4, 2, 32), torch.randn(1, 5, 2, 32), torch.randn(1, 5, 2, 32)
    torch.testing.assert_close(ck.attention(q, k, v, scale=np.float32(0.25)), ck.attention(q, k, v, scale=0.25))
    x = torch.randn(2, 6, 3)
    torch.testing.assert_close(ck.group_norm(x, 2, eps=np.float32(1e-3)), ck.group_norm(x, 2, eps=1e-3))
    ema, params = [torch.zeros(3)], [torch.ones(3)]
    ck.ema_update_(ema, params, np.float64(0.75))
    ck.ema_update_(ema, params, np.int64(1))
    torch.testing.assert_close(ema[0], torch.full((3,), 0.25))
    ck.FusedAdamWEMA([torch.nn.Parameter(torch.randn(3))], lr=np.float32(1e-3), ema_decay=np.float32(0.99))


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.randn(2, 6, 3, 3), 4), {}, "num_channels 6 is not divisible by num_groups 4"),
        ((torch.randn(6), 2), {}, r"\(N, C, \*spatial\)"),
        ((torch.randn(2, 6, 3), 0), {}, "num_groups must be a positive int"),
        ((torch.randn(2, 6, 3), 2, torch.randn(5)), {}, r"weight must have shape \(6,\)"),
        ((torch.randn(2, 6, 3), 2, None, torch.randn(6, 1)), {}, r"bias must have shape \(6,\)"),
        ((torch.randn(2, 6, 3), 2), {"activation": "gelu"}, "activation must be None or 'silu'"),
        ((torch.randn(2, 6, 3), 2, None, None, -1e-3), {}, r"eps must be a number in \[0, inf\)"),
    ],
)
def test_group_norm_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ck.group_norm(*args, **kwargs)


@pytest.mark.parametrize(
    "ema,params,decay,match",
    [
        ([torch.zeros(3)], [], 0.9, "ema has 1 tensors but params has 0"),
        ([torch.zeros(3)], [torch.randn(3)], 1.5, r"decay must be a number in \[0, 1\]"),
        ([torch.zeros(3)], [torch.randn(3)], -0.1, r"decay must be a number in \[0, 1\]"),
        ([torch.zeros(3)], [torch.randn(3)], True, r"decay must be a number in \[0, 1\], got True"),
        ([torch.zeros(3).half()], [torch.randn(3)], 0.9, "must be float32"),
        ([torch.zeros(3)], [torch.randn(4)], 0.9, r"ema\[0\] shape \(3,\) != params\[0\] shape \(4,\)"),
        ([torch.zeros(3)], [torch.arange(3)], 0.9, r"params\[0\] has dtype torch.int64"),
    ],
)
def test_ema_bad_arguments(ema, params, decay, match):
    before = [e.clone() for e in ema]
    with pytest.raises(ValueError, match=match):
        ck.ema_update_(ema, params, decay)
    assert all(torch.equal(a, b) for a, b in zip(ema, before))


def test_ema_empty_lists_are_a_no_op():
    ck.ema_update_([], [], 0.5)


def test_build_info_is_truthful():
    info = ck.build_info()
    try:
        import cckernels._C  # noqa: F401
    except ImportError:
        assert info["_C"] is False
    else:
        assert info["_C"] is True


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_ops_inside_torch_compile_match_eager(device):
    # The ops are traced into one graph (fullgraph); its results and gradients match eager.
    def block(x, q, k, w):
        h = ck.group_norm(x * 2.0, 4, w, None, activation="silu", backend="triton") + 1.0
        a = ck.attention(q, k, h.flatten(2).transpose(1, 2).reshape(2, 9, 2, 4), backend="triton")
        return (a.square().sum() + h.mean()) * 3.0

    shapes = ((2, 8, 3, 3), (2, 5, 2, 4), (2, 9, 2, 4), (8,))
    leaves = [torch.randn(shape, device=device) for shape in shapes]
    results = []
    for fn in (block, torch.compile(block, backend="aot_eager", fullgraph=True)):
        args = [t.clone().requires_grad_() for t in leaves]
        out = fn(*args)
        out.backward()
        assert ck.used_backends()["attention"] == ck.used_backends()["group_norm"] == "triton"
        results.append([out] + [t.grad for t in args])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_ops_run_on_the_tensors_gpu_not_the_current_one(backend):
    # Triton launches on the current device; dispatch makes it the tensors' device.
    if backend not in ck.available_backends("cuda:1")["group_norm"]:
        pytest.skip(f"{backend} not usable")
    x = torch.randn(2, 64, 5, 5, device="cuda:1", requires_grad=True)
    q = torch.randn(1, 77, 2, 64, device="cuda:1", dtype=torch.bfloat16, requires_grad=True)
    with torch.cuda.device(0):
        y = ck.group_norm(x, 8, activation="silu", backend=backend)
        a = ck.attention(q, q, q, backend=backend)
        (y.sum() + a.float().sum()).backward()
    ref_y = ck.group_norm(x.detach(), 8, activation="silu", backend="torch")
    ref_a = ck.attention(q.detach(), q.detach(), q.detach(), backend="torch")
    torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a, ref_a, atol=2e-2, rtol=2e-2)
    assert x.grad.isfinite().all() and q.grad.isfinite().all()


def _second_order(op, backend, fixed_weights):
    """d/dx of the squared norm of d(loss)/dx through `backend` (create_graph=True); the loss is
    op(x)^2 summed (its gradient into op needs grad) or op(x) * w summed, w fixed (it does not)."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, 6, requires_grad=True)  # (B, L, H, D) for attention
    calls = {
        "attention": lambda: ck.attention(x, x.detach() + 1, x.detach() - 1, backend=backend),
        "group_norm": lambda: ck.group_norm(x, 2, activation="silu", backend=backend),
        "geglu": lambda: ck.geglu(x, backend=backend),
        "layer_norm": lambda: ck.layer_norm(x, backend=backend),
    }
    y = calls[op]()
    assert backend_mod.last_used()[op] == backend
    loss = (y * torch.randn_like(y)).sum() if fixed_weights else y.square().sum()
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    g.square().sum().backward()
    return x.grad


@pytest.mark.parametrize("fixed_weights", [False, True])
@pytest.mark.parametrize("op", ["attention", "group_norm", "geglu", "layer_norm"])
def test_kernel_gradients_refuse_to_be_differentiated(op, fixed_weights):
    # A kernel's backward is not itself differentiable: create_graph=True (a gradient penalty)
    # must raise, not return second-order gradients missing the kernel's terms. With fixed
    # weights the gradient into the kernel needs no grad: once_differentiable let that through.
    if "triton" not in ck.available_backends("cpu")[op]:
        pytest.skip("triton is not usable here")
    assert _second_order(op, "torch", fixed_weights).abs().sum() > 0  # the reference differentiates twice
    with pytest.raises(RuntimeError, match=rf"ck.{op}: the fused kernels' gradients are not differentiable"):
        _second_order(op, "triton", fixed_weights)


def test_inputs_the_triton_kernels_cannot_take_fall_back():
    if "triton" not in ck.available_backends("cpu")["geglu"]:
        pytest.skip("triton is not usable here")
    assert ck.geglu(torch.randn(4, 0), backend="triton").shape == (4, 0)  # an empty last dim
    assert ck.used_backends()["geglu"] == "torch"
    q, k = torch.randn(2, 5, 3, 32), torch.randn(2, 7, 3, 32)
    out = ck.attention(q, k, k, scale=1e-46, backend="triton")  # 0 as the kernels' fp32 scale
    assert ck.used_backends()["attention"] == "torch"
    torch.testing.assert_close(out, k.mean(1, keepdim=True).expand_as(q))  # softmax of zeros: the mean


def test_a_backend_asked_for_in_the_call_that_cannot_run_says_why(monkeypatch):
    # An explicit backend= that is not usable falls back (the contract) with a warning naming
    # the reason, once; CCKERNELS_BACKEND, a preference for every op, only logs it.
    monkeypatch.setattr(backend_mod, "_reported", set())
    x = torch.randn(1, 3, 2, 32)
    with pytest.warns(RuntimeWarning, match=r"group_norm: backend='cuda' is not usable here \(the cuda backend "
                                            r"takes CUDA tensors, these are on cpu\); running on"):
        ck.group_norm(x, 3, backend="cuda")
    with pytest.warns(RuntimeWarning, match=r"attention has no cuda backend"):
        ck.attention(x, x, x, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.warns(RuntimeWarning, match=r"only in its interpreter: set TRITON_INTERPRET=1"):
        ck.layer_norm(x, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.group_norm(x, 3, backend="cuda")  # said once
        monkeypatch.setenv("CCKERNELS_BACKEND", "cuda")
        ck.geglu(x)


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "on", "yes", "y"])
def test_triton_interpret_takes_the_values_triton_reads_as_true(monkeypatch, value):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert "triton" in ck.available_backends("cpu")["attention"]
    monkeypatch.setenv("TRITON_INTERPRET", "false")
    assert "triton" not in ck.available_backends("cpu")["attention"]
