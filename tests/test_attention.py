"""Triton attention vs an fp64 reference: outputs and all three gradients, with each of the
two backward variants (atomic dQ and deterministic).

CPU runs the kernels in Triton's interpreter in fp32, fp16 and bf16 (the last after
tests/triton_interpreter.py mends its bf16 dot and rounding); the SD2 shapes run in the
GPU-marked tests. Tolerance
(flash-attention's rule): the kernel's max error vs fp64 is within 2x (3x for gradients) of
plain PyTorch's error in the same dtype, plus a small floor. Plain PyTorch runs two ways, and
the larger error is the baseline: autograd through softmax, and FlashAttention's backward
formula dS = P * (dO V^T - rowsum(dO * O)) that the kernels use. The formula cancels in
floating point where the softmax is flat: at Lk = 1, P = 1 and the exact dS is 0, which
autograd gets exactly while the formula leaves rounding noise that dK sums over every query
(4.9e-5 in fp32 at Lq = 4095 on an H200). The fp32 floor (1e-5 on values of order 1-10)
still rules out TF32 dots (errors ~1e-3).
"""
import contextlib
from unittest import mock

import pytest
import torch

import cckernels as ck
from cckernels.reference import attention as reference

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def plain_attention(q, k, v, scale):
    """Attention as plain PyTorch code computes it in the input dtype (the error baseline)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


class FlashFormula(torch.autograd.Function):
    """plain_attention whose backward takes dS from FlashAttention's formula, in the input
    dtype; dV is autograd's (the formula changes only dS)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return plain_attention(q, k, v, scale)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            v = v.detach().requires_grad_()
            p = (torch.einsum("bqhd,bkhd->bhqk", q, k) * ctx.scale).softmax(-1)
            o = torch.einsum("bhqk,bkhd->bqhd", p, v)
            (dv,) = torch.autograd.grad(o, v, do)
        delta = (do * o).sum(-1).transpose(1, 2).unsqueeze(-1)  # rowsum(dO * O): (B, H, Lq, 1)
        ds = p * (torch.einsum("bqhd,bkhd->bhqk", do, v) - delta) * ctx.scale
        return torch.einsum("bhqk,bkhd->bqhd", ds, k), torch.einsum("bhqk,bqhd->bkhd", ds, q), dv, None


def triton_attention(q, k, v, scale):
    out = ck.attention(q, k, v, scale=scale, backend="triton")
    assert ck.used_backends()["attention"] == "triton"
    return out


@contextlib.contextmanager
def nan_filled_buffers():
    """torch.empty and torch.empty_like return NaN-filled floating tensors inside, so an output,
    gradient or workspace element (lse, delta, the split dK/dV partials) that a kernel forgets
    to write shows up in the checks. (test_group_norm's nan_filled_empty fills them through
    deterministic mode, which would also select the deterministic backward.)"""
    def filled(make):
        def allocate(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return allocate

    with mock.patch("torch.empty", filled(torch.empty)), mock.patch("torch.empty_like", filled(torch.empty_like)):
        yield


def run(fn, make, leaves, scale, dout, dtype, needs):
    """fn's output and gradients w.r.t. the `leaves` (cast to dtype) whose `needs` is true,
    q, k, v = make(*leaves)."""
    leaves = [t.detach().to(dtype).requires_grad_(need) for t, need in zip(leaves, needs)]
    out = fn(*make(*leaves), scale)
    return [out, *torch.autograd.grad(out, [t for t in leaves if t.requires_grad], dout.to(dtype))]


def check_against_fp64(make, leaves, scale, dtype, needs=None):
    """Compare kernel and plain-PyTorch errors vs fp64 for the output and the gradient of every
    leaf whose `needs` is true (default: all)."""
    needs = needs or [True] * len(leaves)
    leaves = [t.to(dtype) for t in leaves]  # both sides see the same rounded inputs
    q = make(*leaves)[0]
    dout = torch.randn(q.shape[0], q.shape[1], q.shape[2], q.shape[3], device=q.device)
    s = scale if scale is not None else q.shape[-1] ** -0.5
    ref = run(reference, make, leaves, s, dout, torch.float64, needs)
    with nan_filled_buffers():
        ours = run(triton_attention, make, leaves, scale, dout, dtype, needs)
    plains = [run(fn, make, leaves, s, dout, dtype, needs) for fn in (plain_attention, FlashFormula.apply)]
    names = ["out", *(f"grad{i}" for i, need in enumerate(needs) if need)]
    for name, r, o, *p, factor in zip(names, ref, ours, *plains, [2, 3, 3, 3]):
        assert o.dtype == dtype and o.shape == r.shape
        err = (o.double() - r).abs().max().item()
        base = max((t.double() - r).abs().max().item() for t in p)
        assert err <= factor * base + FLOOR[dtype], f"{name}: error {err:.3g} vs plain torch {base:.3g}"


def separate(q, k, v):
    return q, k, v


@pytest.fixture(params=["atomic", "deterministic"])
def backward(request, monkeypatch):
    """Run the test with each backward variant, chosen through CCKERNELS_DETERMINISTIC."""
    monkeypatch.setenv("CCKERNELS_DETERMINISTIC", "1" if request.param == "deterministic" else "0")
    return request.param


# (B, Lq, Lk, H, D): odd lengths, 1-3 heads, every SD head dim and two others (16, 72: masked
# to the next power of two); 257 x 77 takes the split dK/dV path; batch 2 once.
CASES = [
    (1, 1, 1, 1, 32),
    (1, 77, 77, 2, 40),
    (1, 100, 257, 1, 64),
    (1, 257, 77, 2, 80),
    (1, 1, 100, 3, 96),
    (1, 100, 1, 1, 128),
    (1, 77, 100, 1, 16),
    (2, 33, 77, 2, 72),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Lq,Lk,H,D", CASES)
def test_matches_fp64(B, Lq, Lk, H, D, dtype, backward):
    q, k, v = torch.randn(B, Lq, H, D), torch.randn(B, Lk, H, D), torch.randn(B, Lk, H, D)
    check_against_fp64(separate, [q, k, v], None, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs", ["q", "kv"])
@pytest.mark.parametrize("B,Lq,Lk,H,D", [(1, 77, 77, 2, 40), (1, 100, 257, 1, 64)])
def test_only_some_inputs_need_gradients(B, Lq, Lk, H, D, dtype, needs, backward):
    # frozen k/v projections (or q): the dQ kernel alone, or dK/dV without dQ
    q, k, v = torch.randn(B, Lq, H, D), torch.randn(B, Lk, H, D), torch.randn(B, Lk, H, D)
    check_against_fp64(separate, [q, k, v], None, dtype, needs=[name in needs for name in "qkv"])


# The TMA atomic dQ (conftest's tma_reductions_on_cpu). (B, Lq, Lk, H, D): 45 queries (the last
# 32-row tile's padded rows reach the next batch's, or past the end of dQ for the last batch),
# head dims 40 and 80 padded to 64 and 128 (into the next head's columns), more keys than one
# block (not the one-kernel short-key backward)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Lq,Lk,H,D", [(3, 45, 130, 2, 40), (2, 33, 257, 3, 80)])
def test_tma_dq_reductions_match_fp64(tma_reductions_on_cpu, B, Lq, Lk, H, D, dtype):
    q, k, v = torch.randn(B, Lq, H, D), torch.randn(B, Lk, H, D), torch.randn(B, Lk, H, D)
    check_against_fp64(separate, [q, k, v], None, dtype)
    assert tma_reductions_on_cpu == [H * D]  # the dK/dV kernel took the TMA path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_strided_projection_views(kind, dtype, backward):
    """BLHD views sliced out of (B, L, n*H*D) projections, batch 2, a custom scale."""
    B, Lq, Lk, H, D = 2, 77, 100, 2, 40
    if kind == "self":
        leaves = [torch.randn(B, Lq, 3 * H * D)]
        make = lambda qkv: qkv.view(B, Lq, 3, H, D).unbind(2)  # noqa: E731
    else:
        leaves = [torch.randn(B, Lq, H * D), torch.randn(B, Lk, 2 * H * D)]
        make = lambda x, kv: (x.view(B, Lq, H, D), *kv.view(B, Lk, 2, H, D).unbind(2))  # noqa: E731
    q, k, _ = make(*leaves)
    assert not q.is_contiguous() or not k.is_contiguous()
    check_against_fp64(make, leaves, 0.3, dtype)


def check_packed_gradient(monkeypatch, kind, Lk, B=2, H=2, D=40, device="cpu", dtype=torch.float32, Lq=100):
    """ck.unpack's views: the kernels write their gradients into one packed tensor, which is the
    packed projection's gradient (no stack); the values are the separate inputs' ones. Lq:
    cross-attention's query length (self-attention's is Lk)."""
    Lq = Lk if kind == "self" else Lq
    n = 3 if kind == "self" else 2
    packed = torch.randn(B, Lk, n, H, D, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(B, Lq, H, D, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(B, Lq, H, D, device=device, dtype=dtype)
    stacks = []
    stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **kw: (stacks.append(1), stack(*a, **kw))[1])

    def attend(views, backend):
        q, k, v = views if kind == "self" else (x, *views)
        return ck.attention(q, k, v, backend=backend)

    with nan_filled_buffers():  # packing.packed_empty's buffer too
        attend(ck.unpack(packed), "triton").backward(dout)
    assert not stacks
    got = packed.grad.clone(), None if x.grad is None else x.grad.clone()
    packed.grad = x.grad = None
    attend([t.contiguous() for t in packed.unbind(2)], "triton").backward(dout)  # separate inputs
    torch.testing.assert_close(got[0], packed.grad, rtol=0, atol=0)
    if kind == "cross":
        torch.testing.assert_close(got[1], x.grad, rtol=0, atol=0)
    packed.grad = None
    attend(ck.unpack(packed), "torch").backward(dout)  # gradients not packed: stacked, as unbind's
    assert stacks and (packed.grad.float() - got[0].float()).abs().max() < 0.1 * got[0].float().abs().max()


@pytest.mark.parametrize("kind, Lk", [("self", 77), ("self", 257), ("cross", 77), ("cross", 257)])
def test_unpacked_projections_get_one_packed_gradient(kind, Lk, backward, monkeypatch):
    # 77 keys take the one-kernel backward (self: all three gradients packed), 257 the dQ
    # kernel or atomic dQ, cross-attention at 257 keys the split dK/dV partials
    check_packed_gradient(monkeypatch, kind, Lk)


def test_unpack_takes_five_dims():
    with pytest.raises(ValueError, match="5-D"):
        ck.unpack(torch.randn(2, 3, 4))


def record_launches(monkeypatch, names, flag):
    """Wraps the attention module's launchers `names`; each launch appends (name, its `flag`
    keyword) to the returned list."""
    from cckernels.triton import attention as A

    launches = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.name, kwargs.get(flag)))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in names:
        monkeypatch.setattr(A, name, Spy(name, getattr(A, name)))
    return launches


@pytest.mark.parametrize("how", ["env", "torch"])
@pytest.mark.parametrize("needs", ["qkv", "q", "kv"])
def test_deterministic_flag_selects_atomic_free_kernels(monkeypatch, how, needs):
    """CCKERNELS_DETERMINISTIC=1 or torch.use_deterministic_algorithms(True): dK/dV without
    atomics, then the dQ kernel; otherwise (=0) one atomic pass when q and k/v both need
    gradients. Every launch is recorded by wrapping the kernels."""
    launches = record_launches(monkeypatch, ("_dkdv_launch", "_dq_launch", "_attn_bwd_dq_convert_kernel"), "ATOMIC_DQ")
    q, k, v = (torch.randn(1, L, 1, 32, requires_grad=name in needs) for L, name in ((40, "q"), (9, "k"), (9, "v")))

    def backward_launches():
        launches.clear()
        triton_attention(q, k, v, 0.2).sum().backward()
        return launches

    monkeypatch.setenv("CCKERNELS_DETERMINISTIC", "0")
    if needs == "qkv":
        assert backward_launches() == [("_dkdv_launch", True), ("_attn_bwd_dq_convert_kernel", None)]
    expected = {"qkv": [("_dkdv_launch", False), ("_dq_launch", None)],
                "q": [("_dq_launch", None)], "kv": [("_dkdv_launch", False)]}
    if how == "env":
        monkeypatch.setenv("CCKERNELS_DETERMINISTIC", "1")
        assert backward_launches() == expected[needs]
    else:
        torch.use_deterministic_algorithms(True)  # wins over CCKERNELS_DETERMINISTIC=0
        try:
            assert backward_launches() == expected[needs]
        finally:
            torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("deterministic", ["0", "1"])
def test_short_keys_take_one_backward_kernel(monkeypatch, deterministic):
    """fp16/bf16 with at most 128 keys and every gradient wanted: the dK/dV kernel also stores
    dQ and computes delta (no delta kernel, no dQ kernel, no atomics), whatever the flag.
    Longer keys and fp32 keep the separate kernels."""
    names = ("_dkdv_launch", "_dq_launch", "_attn_bwd_dq_convert_kernel", "_attn_bwd_delta_kernel")
    launches = record_launches(monkeypatch, names, "STORE_DQ")
    monkeypatch.setenv("CCKERNELS_DETERMINISTIC", deterministic)

    def backward_launches(Lk, dtype):
        launches.clear()
        q, k, v = (torch.randn(1, L, 1, 32, dtype=dtype, requires_grad=True) for L in (40, Lk, Lk))
        triton_attention(q, k, v, 0.2).sum().backward()
        return launches

    assert backward_launches(77, torch.float16) == [("_dkdv_launch", True)]
    assert backward_launches(128, torch.float16) == [("_dkdv_launch", True)]
    separate = [("_attn_bwd_delta_kernel", None), ("_dkdv_launch", False),
                ("_dq_launch", None) if deterministic == "1" else ("_attn_bwd_dq_convert_kernel", None)]
    assert backward_launches(129, torch.float16) == separate
    assert backward_launches(77, torch.float32) == separate


@pytest.mark.parametrize("capability,block_d,n_cap,fits", [
    ((9, 0), 64, 128, True),  # SD2's cross-attention: 64-dim heads, 77 keys
    ((9, 0), 128, 128, False),  # head dims above 64 at 65-128 keys spill
    ((8, 0), 64, 128, False),  # sm80's shapes spill
    ((8, 9), 64, 64, False),
    ((10, 0), 64, 128, False),  # sm90 only: no other arch's compiles were inspected
    ((12, 0), 64, 16, False),
])  # fmt: skip
def test_one_kernel_backward_is_for_sm90_only(monkeypatch, capability, block_d, n_cap, fits):
    from triton import Config

    from cckernels.triton import attention as A

    monkeypatch.setattr(A, "_capability", lambda device: capability)
    monkeypatch.setattr(A, "_max_shared_memory", lambda device: 232448)
    monkeypatch.setattr(A._attn_bwd_dkdv_kernel, "configs", [
        Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in A.DKDV_POOL])
    device = torch.device("cuda", 0)
    assert A._one_kernel_backward_fits.__wrapped__(device, torch.bfloat16, block_d, n_cap) == fits


def test_bad_deterministic_env(monkeypatch):
    from cckernels.triton.attention import deterministic_backward

    monkeypatch.setenv("CCKERNELS_DETERMINISTIC", "yes")
    with pytest.raises(ValueError, match="CCKERNELS_DETERMINISTIC='yes'"):
        deterministic_backward()


# (keys, (MAIN_N, TAIL_N)): 64 and 100 keys keep the one 128-key block, no tail
@pytest.mark.parametrize("Lk,blocks", [(77, (64, 16)), (90, (64, 32)), (40, (32, 16)), (64, (128, 0)), (100, (128, 0))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_short_key_forward_split(monkeypatch, Lk, blocks, dtype):
    """The short-key forward with its one 128-key block (the GPU pool's width for <= 128 keys;
    the interpreter's config has 32) computes 77 keys as 64 + 16, 90 as 64 + 32, ..."""
    import triton

    from cckernels.triton import attention as A

    assert A._key_blocks(Lk, 128, True) == blocks
    monkeypatch.setattr(A._attn_fwd_kernel, "configs", [triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4, num_stages=1)])
    monkeypatch.setattr(A._fwd_launch, "meta", {})  # configs remembered from other tests' launches
    q, k, v = torch.randn(2, 33, 2, 40), torch.randn(2, Lk, 2, 40), torch.randn(2, Lk, 2, 40)  # head dim <= 64
    check_against_fp64(separate, [q, k, v], None, dtype)
    assert (A._fwd_launch.last["MAIN_N"], A._fwd_launch.last["TAIL_N"]) == blocks


def test_split_waves_env(monkeypatch):
    """CCKERNELS_ATTENTION_SPLIT_WAVES: more dK/dV query splits (the interpreter counts 4 SMs),
    gradients still within the fp64 rule; a bad value names the variable."""
    from cckernels.triton.attention import _dkdv_splits

    cpu = torch.device("cpu")
    assert _dkdv_splits(1024, 77, 2, cpu) == (512, 2)
    monkeypatch.setenv("CCKERNELS_ATTENTION_SPLIT_WAVES", "4")
    assert _dkdv_splits(1024, 77, 2, cpu) == (128, 8)
    q, k, v = torch.randn(1, 1000, 2, 32), torch.randn(1, 77, 2, 32), torch.randn(1, 77, 2, 32)
    check_against_fp64(separate, [q, k, v], None, torch.float16)
    monkeypatch.setenv("CCKERNELS_ATTENTION_SPLIT_WAVES", "0")
    with pytest.raises(ValueError, match="CCKERNELS_ATTENTION_SPLIT_WAVES='0'"):
        _dkdv_splits(1024, 77, 2, cpu)


def test_backward_is_deterministic(monkeypatch):
    monkeypatch.setenv("CCKERNELS_DETERMINISTIC", "1")
    # 129 queries x 77 keys: dK/dV sums two query splits, dQ has a masked key block.
    q, k, v = (torch.randn(1, L, 1, 32, dtype=torch.float16, requires_grad=True) for L in (129, 77, 77))
    dout = torch.randn(1, 129, 1, 32, dtype=torch.float16)
    first, second = (torch.autograd.grad(triton_attention(q, k, v, 0.125), (q, k, v), dout) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_autotuning_zeroes_the_atomic_dq_accumulator():
    # Triton's search runs a kernel many times on the real arguments and calls this hook before
    # each run and before the real one: the atomic dQ must not add up over the runs.
    from cckernels.triton.attention import _attn_bwd_dkdv_kernel, _attn_fwd_kernel

    acc = torch.randn(2, 3)
    _attn_bwd_dkdv_kernel.pre_hook({"DQ": acc})
    assert torch.equal(acc, torch.zeros(2, 3))
    _attn_bwd_dkdv_kernel.pre_hook({"DQ": None}, reset_only=True)  # deterministic: no buffer
    assert not getattr(_attn_fwd_kernel, "user_defined_pre_hook", False)  # pure stores: no hook


def test_no_grad_path_saves_nothing():
    q, k, v = (torch.randn(1, 33, 1, 32, requires_grad=True) for _ in range(3))
    with torch.no_grad(), nan_filled_buffers():
        out = triton_attention(q, k, v, 0.2)
    assert out.grad_fn is None
    torch.testing.assert_close(out, reference(q, k, v, 0.2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("q_shape,k_shape,why", [((1, 2**21, 16, 64), (1, 77, 16, 64), "2\\^31"),
                                                 ((1, 77, 16, 64), (1, 2**21, 16, 64), "2\\^31"),
                                                 ((4096, 8, 17, 64), (4096, 8, 17, 64), "65535")])
def test_sizes_the_kernels_cannot_index_are_unsupported(q_shape, k_shape, why):
    from cckernels.triton.attention import _check_supported

    q, k = torch.empty(q_shape, device="meta"), torch.empty(k_shape, device="meta")  # shapes only
    with pytest.raises(ck.Unsupported, match=why):
        _check_supported(q, k, k)


def test_strided_views_the_kernels_cannot_index_are_unsupported():
    # 2^30 elements each, but q, k, v are views of a (1, L, 3, H, D) projection: offsets within
    # the batch entry reach 3 x 2^30, beyond the kernels' int32 arithmetic.
    from cckernels.triton.attention import _check_supported

    L, H, D = 2**20, 16, 64
    q, k, v = torch.empty(1, L, 3, H, D, device="meta").unbind(2)
    with pytest.raises(ck.Unsupported, match="q's strides .* 2\\^31"):
        _check_supported(q, k, v)
    with pytest.raises(ck.Unsupported, match="device meta"):  # the same sizes, dense: only the device fails
        _check_supported(*(t.contiguous() for t in (q, k, v)))


@pytest.mark.parametrize(
    "shape,dtype,why",
    [
        ((1, 5, 1, 256), torch.float32, "head dim"),
        ((1, 5, 1, 32), torch.float64, "float64"),
        ((1, 5, 1, 32), torch.bfloat16, "interpreter"),
    ],
)
def test_unsupported_falls_back_to_torch(shape, dtype, why, monkeypatch):
    from cckernels.triton import attention
    from cckernels.triton.attention import attention as triton_backend

    monkeypatch.setattr(attention, "INTERPRETER_BF16_DOT", False)  # an interpreter as Triton ships it
    q, k, v = (torch.randn(shape, dtype=dtype) for _ in range(3))
    with pytest.raises(ck.Unsupported, match=why):
        triton_backend(q, k, v, 0.5)
    out = ck.attention(q, k, v, backend="triton")
    assert ck.used_backends()["attention"] == "torch"
    torch.testing.assert_close(out, reference(q, k, v, shape[-1] ** -0.5))


@pytest.mark.parametrize("arch,smem", [(80, 166912), (90, 232448)], ids=["sm80", "sm90"])
def test_config_pools_fit_shared_memory(monkeypatch, arch, smem):
    """The GPU config pools, pruned for each head dim, dtype and length, fit the arch's shared
    memory (the footprints match what the sm90 compiles allocate, sm80 takes less: see
    python -m cckernels.inspect); Lk <= 128 takes the short-key path in the forward and in the
    backward's STORE_DQ launches (16-bit only); blocks never exceed the padded lengths."""
    import triton

    from cckernels.triton import attention as A

    kernels = [(A.FWD_POOL, A._fwd_footprint, A.FWD_FP32, True, None),
               (A.DKDV_POOL, A._dkdv_footprint, A.DKDV_FP32, False, None),
               (A.DKDV_POOL, A._dkdv_footprint, A.DKDV_FP32, False, "atomic"),
               (A.DKDV_POOL, A._dkdv_footprint, A.DKDV_FP32, False, "store"),
               *[(A.DKDV_POOL, A._dkdv_footprint, A.DKDV_FP32, False, "atomic-tma")] * (arch == 90),
               (A.DQ_POOL, A._dq_footprint, A.DQ_FP32, False, None)]
    for dtype in (torch.bfloat16, torch.float32):
        for D in (32, 40, 64, 80, 96, 128):
            q = torch.empty(1, 1, 1, D, dtype=dtype)
            block_d = A._head_args(q)["BLOCK_D"]
            for pool, footprint, fp32_shape, short_kv, dq in kernels:
                configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pool]
                for Lq, Lk in [(4096, 4096), (4096, 77), (64, 64), (1, 1)]:
                    if dq == "store" and (Lk > 128 or dtype == torch.float32):
                        continue  # never launched so

                    def prune():
                        return A._prune(configs, {"Q": q, "Lq": Lq, "Lk": Lk}, footprint, fp32_shape, short_kv,
                                        target=(arch, smem), BLOCK_D=block_d, ATOMIC_DQ=dq in ("atomic", "atomic-tma"),
                                        TMA_DQ=dq == "atomic-tma", STORE_DQ=dq == "store")
                    kept = prune()
                    assert kept
                    if dtype == torch.float32:  # one small shape, capped to the lengths
                        (c,) = kept
                        m, n, w, s = fp32_shape
                        assert (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == (
                            min(m, max(16, triton.next_power_of_2(Lq))), min(n, max(16, triton.next_power_of_2(Lk))), w, s)
                        continue
                    with monkeypatch.context() as env:
                        env.setenv("CCKERNELS_AUTOTUNE", "0")
                        assert [c.all_kwargs() for c in prune()] == [kept[0].all_kwargs()]
                    for c in kept:
                        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                        extra = ({"atomic_dq": True, "tma_dq": dq == "atomic-tma"} if dq in ("atomic", "atomic-tma")
                                 else {"store_dq": True} if dq == "store" else {})
                        smem_used = footprint(m, n, block_d, c.num_stages, q.element_size(), **extra)[0]
                        assert smem_used <= smem, (D, dtype, c)
                        assert m <= max(16, triton.next_power_of_2(Lq)) and n <= max(16, triton.next_power_of_2(Lk))
                        if (short_kv or dq == "store") and Lk <= 128:
                            assert n == max(16, triton.next_power_of_2(Lk))


def test_deterministic_algorithms_skip_the_timing_based_search():
    """Autotuning picks block shapes by timing, which can differ between processes; the block
    shapes set the summation order. A deterministic run (and its resume) takes the first config
    that fits, as CCKERNELS_AUTOTUNE=0."""
    import triton

    from cckernels.triton import attention as A

    q = torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in A.FWD_POOL]

    def prune():
        return A._prune(configs, {"Q": q, "Lq": 4096, "Lk": 4096}, A._fwd_footprint, A.FWD_FP32, True,
                        target=(90, 232448), BLOCK_D=64)

    searched = prune()
    assert len(searched) > 1
    torch.use_deterministic_algorithms(True)
    try:
        assert [c.all_kwargs() for c in prune()] == [searched[0].all_kwargs()]
    finally:
        torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------------------------------
# GPU: bf16/fp16 at SD2 training shapes (both backward variants), odd shapes in every dtype,
# determinism, memory.
# ---------------------------------------------------------------------------------------
SD2_SHAPES = [  # (B, Lq, Lk, H) with head dim 64: self-attention at 512 px, cross with 77 tokens
    (2, 4096, 4096, 5),
    (2, 1024, 1024, 10),
    (4, 256, 256, 20),
    (4, 64, 64, 20),
    (2, 4096, 77, 5),
    (4, 1024, 77, 10),
]


def cuda_randn(*shape):
    return torch.randn(*shape, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(  # both backward variants in bf16; fp16 with the atomic one
    "dtype,backward", [(torch.bfloat16, "atomic"), (torch.bfloat16, "deterministic"), (torch.float16, "atomic")],
    indirect=["backward"],
)
@pytest.mark.parametrize("B,Lq,Lk,H", SD2_SHAPES)
def test_gpu_sd2_shapes(B, Lq, Lk, H, dtype, backward):
    qkv = [cuda_randn(B, Lq, H, 64), cuda_randn(B, Lk, H, 64), cuda_randn(B, Lk, H, 64)]
    check_against_fp64(separate, qkv, None, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(  # every head dim once; few combinations, as each new one autotunes
    "D,Lq,Lk", [(32, 1, 77), (40, 100, 257), (64, 4095, 77), (80, 257, 4095), (96, 77, 100), (128, 4095, 1)]
)
def test_gpu_odd_shapes(D, Lq, Lk, dtype, monkeypatch):
    monkeypatch.setenv("CCKERNELS_AUTOTUNE", "0")  # correctness only: one compile per kernel
    qkv = [cuda_randn(1, Lq, 3, D), cuda_randn(1, Lk, 3, D), cuda_randn(1, Lk, 3, D)]
    check_against_fp64(separate, qkv, None, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backward", ["atomic"], indirect=True)
@pytest.mark.parametrize("D,Lq,Lk", [(32, 100, 257), (96, 77, 300), (128, 257, 1000)])
def test_gpu_fp32_atomic_backward(D, Lq, Lk, backward, monkeypatch):
    # test_gpu_odd_shapes runs the default (deterministic) backward; fp32's atomic dQ is
    # accumulated in the gradient itself, converted in place
    monkeypatch.setenv("CCKERNELS_AUTOTUNE", "0")
    qkv = [cuda_randn(1, Lq, 3, D), cuda_randn(1, Lk, 3, D), cuda_randn(1, Lk, 3, D)]
    check_against_fp64(separate, qkv, None, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("backward", ["atomic"], indirect=True)
@pytest.mark.parametrize("D,Lq,Lk", [(80, 257, 300), (64, 100, 1000)])
def test_gpu_atomic_dq_at_batch_and_head_edges(D, Lq, Lk, backward, monkeypatch):
    # On sm90 the atomic dQ tiles go by TMA reductions into dQ seen as (B * Lq, H * D): a tile's
    # padded query rows reach the next batch's first rows, its padded head-dim columns (80 -> 128)
    # the next head's, adding zeros there. Over 128 keys: not the one-kernel short-key backward.
    monkeypatch.setenv("CCKERNELS_AUTOTUNE", "0")
    qkv = [cuda_randn(3, Lq, 3, D), cuda_randn(3, Lk, 3, D), cuda_randn(3, Lk, 3, D)]
    check_against_fp64(separate, qkv, None, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.timeout(300)  # compiles every config of the pools, beside other xdist workers' compiles
@pytest.mark.parametrize("Lk", [200, 90])
def test_gpu_backward_right_after_a_full_autotune(monkeypatch, Lk):
    # The search over every config runs the dK/dV kernel many times on the real dQ buffer (the
    # atomic accumulator at 200 keys; at 90, one key block, the stored dQ); the gradients of that
    # very first call must still be right, and every config the search may pick. (The other GPU
    # tests run with CCKERNELS_AUTOTUNE=0.) Keys no other test uses: 300 x 200 and 300 x 90, fp16.
    monkeypatch.delenv("CCKERNELS_AUTOTUNE", raising=False)
    monkeypatch.setenv("CCKERNELS_DETERMINISTIC", "0")
    qkv = [cuda_randn(2, 300, 3, 64), cuda_randn(2, Lk, 3, 64), cuda_randn(2, Lk, 3, 64)]
    check_against_fp64(separate, qkv, None, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("Lq,Lk", [(4096, 77), (1024, 1024)])
def test_gpu_backward_is_deterministic(Lq, Lk, monkeypatch):
    monkeypatch.setenv("CCKERNELS_DETERMINISTIC", "1")
    q, k, v = (cuda_randn(4, L, 5, 64).bfloat16().requires_grad_() for L in (Lq, Lk, Lk))
    dout = cuda_randn(4, Lq, 5, 64).bfloat16()
    first, second = (torch.autograd.grad(triton_attention(q, k, v, 0.125), (q, k, v), dout) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("kind, Lk, Lq", [("self", 1024, None), ("cross", 77, 100), ("cross", 77, 4096)])
def test_gpu_unpacked_projections_get_one_packed_gradient(kind, Lk, Lq, monkeypatch):
    # 4096 queries on 20 (batch, head) pairs: the query loop split over programs, whose dK/dV
    # partials column_sum adds into the packed rows
    check_packed_gradient(monkeypatch, kind, Lk, B=4, H=5, D=64, device="cuda", dtype=torch.bfloat16, Lq=Lq)


@pytest.mark.gpu
def test_gpu_no_quadratic_memory():
    L, H, D = 16384, 2, 64
    q, k, v = (cuda_randn(1, L, H, D).bfloat16().requires_grad_() for _ in range(3))
    dout = torch.randn_like(q)
    # once before measuring: autotuning's benchmark allocates its own 256 MiB cache-flush buffer
    torch.autograd.grad(triton_attention(q, k, v, D**-0.5), (q, k, v), dout)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = triton_attention(q, k, v, D**-0.5)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # An (L, L) score buffer per head would be L / D = 256x the size of q; we need ~6x.
    assert extra < 16 * q.nbytes, f"fwd+bwd allocated {extra / 2**20:.0f} MiB at L={L}"
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_an_empty_batch_gives_an_empty_output_and_gradient(backend):
    q = torch.randn(0, 5, 2, 32, requires_grad=True)
    out = ck.attention(q, q, q, backend=backend)
    assert out.shape == (0, 5, 2, 32)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_autocast_casts_fp32_inputs_as_it_does_for_sdpa():
    q, k = torch.randn(2, 9, 2, 32), torch.randn(2, 4, 2, 32)
    with torch.autocast("cpu", torch.bfloat16):
        out = ck.attention(q, k, k, backend="torch")
        want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2))
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out, want.transpose(1, 2), atol=2e-2, rtol=2e-2)
