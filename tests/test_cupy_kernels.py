"""The CuPy/NVRTC "cuda" backend (cckernels/cupy_kernels.py).

Without a GPU: the backend's program compiles under NVRTC for every kernel it launches, the
numpy structs match the C++ layouts (static_asserts compiled by g++), and the Python launch
plan matches the C++ one. With a GPU (marked):
the kernels against fp64 references.
"""
import random
import shutil
import subprocess

import pytest
import torch

import cckernels as ck
from cckernels import cupy_kernels as ckc
from test_build import nvrtc_compile
from test_ema_update import long_run_errors

LAYOUT_CHECKS = """
using Table{depth} = cck::TensorTable<{depth}>;
static_assert(sizeof(Table{depth}) == {itemsize}, "TensorTable<{depth}> size");
static_assert(offsetof(Table{depth}, sizes) == {sizes}, "sizes offset");
static_assert(offsetof(Table{depth}, block_chunk) == {block_chunk}, "block_chunk offset");
static_assert(offsetof(Table{depth}, block_slot) == {block_slot}, "block_slot offset");
static_assert(Table{depth}::kMaxTensors == {tensors}, "tensor slots");
"""


def test_program_changes_with_any_header(tmp_path, monkeypatch):
    # CuPy's disk cache keys on the program text: it must change when a header does.
    for name in ("ema.cuh", "multi_tensor_apply.cuh", "dtype.h"):
        (tmp_path / name).write_text((ckc.CSRC / name).read_text())
    monkeypatch.setattr(ckc, "CSRC", tmp_path)
    before, _ = ckc.nvrtc_program()
    (tmp_path / "multi_tensor_apply.cuh").write_text((tmp_path / "multi_tensor_apply.cuh").read_text() + "\n// edit\n")
    after, _ = ckc.nvrtc_program()
    assert before != after and before.splitlines()[1:] == after.splitlines()[1:]


def test_every_kernel_compiles_under_nvrtc():
    # the backend's own program and options (CuPy not needed: libnvrtc from the nvidia-* wheels)
    source, options = ckc.nvrtc_program()
    lowered = nvrtc_compile(source, ckc.kernel_names(), options)
    assert len(lowered) == 9 and all(b"multi_tensor_kernel" in name for name in lowered)


def gxx(tmp_path, source, *run):
    """Compile a host C++ program against csrc/ with g++ (and run it); returns its stdout."""
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    (tmp_path / "check.cpp").write_text(source)
    subprocess.run(["g++", "-std=c++17", f"-I{ckc.CSRC}", str(tmp_path / "check.cpp"), "-o", str(tmp_path / "check")],
                   check=True)  # fmt: skip
    return subprocess.run([str(tmp_path / "check")], capture_output=True, text=True, check=True).stdout


def test_struct_layouts_match_cpp(tmp_path):
    # TensorTable and AdamWEmaScalars are plain C++ (no CUDA types): the host compiler lays
    # them out as the device does. EmaFunctor (device-only) is one float.
    source = '#include <cstddef>\n#include "adamw_ema.cuh"\n'
    for depth in (ckc.EMA_DEPTH, ckc.limits()["kAdamWEmaDepth"]):
        dtype = ckc.table_dtype(depth)
        source += LAYOUT_CHECKS.format(
            depth=depth,
            itemsize=dtype.itemsize,
            tensors=dtype["sizes"].shape[0],
            **{f: dtype.fields[f][1] for f in ("sizes", "block_chunk", "block_slot")},
        )
    source += f'static_assert(sizeof(cck::AdamWEmaScalars) == {4 * len(ckc.SCALARS)}, "scalars");\n'
    gxx(tmp_path, source + "int main() {}\n")


def test_launch_plan_covers_every_chunk_within_limits():
    lim = ckc.limits()
    rng = random.Random(0)
    sizes = tuple(rng.choice([0, 1, 77, lim["kChunkSize"], lim["kChunkSize"] + 1, 5 * lim["kChunkSize"] + 3])
                  for _ in range(300)) + (lim["kMaxBlocks"] * lim["kChunkSize"] + 1,)  # fmt: skip
    max_tensors = ckc.table_dtype(2)["sizes"].shape[0]
    seen = []
    for tensors, slots, chunks in ckc.plan_launches(sizes, max_tensors):
        assert len(tensors) <= max_tensors and len(slots) <= lim["kMaxBlocks"]
        seen += [(tensors[s], c) for s, c in zip(slots, chunks)]
    expected = [(t, c) for t, n in enumerate(sizes) for c in range(-(-n // lim["kChunkSize"]))]
    assert seen == expected


def test_launch_plan_equals_cpp(tmp_path):
    sizes = tuple(random.Random(1).choice([0, 3, 65536, 200000, 3000000]) for _ in range(120))
    cpp = gxx(
        tmp_path,
        '#include <cstdio>\n#include "multi_tensor_apply.cuh"\nint main() {\n'
        f"  const int64_t sizes[] = {{{', '.join(map(str, sizes))}}};\n"
        f"  for (const auto& l : cck::plan_launches(sizes, {len(sizes)}, cck::kChunkSize, 37, cck::kMaxBlocks)) {{\n"
        '    for (int t : l.tensors) std::printf("%d ", t);\n    std::printf("|");\n'
        '    for (size_t b = 0; b < l.block_slot.size(); ++b) std::printf("%d:%d ", l.block_slot[b], l.block_chunk[b]);\n'
        '    std::printf("\\n");\n  }\n}\n',
    )
    py = [
        "".join(f"{t} " for t in tensors) + "|" + "".join(f"{s}:{c} " for s, c in zip(slots, chunks))
        for tensors, slots, chunks in ckc.plan_launches(sizes, 37)
    ]
    assert cpp.splitlines() == py


@pytest.fixture
def kernels():
    found = ckc.load()
    if isinstance(found, str):
        pytest.skip(found)
    return found


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, "mixed"])
def test_cupy_ema_vs_fp64(kernels, dtype):
    sizes = [1, 3, 77, 65537, 384 * 65536 + 1] + [int(n) for n in torch.randint(0, 3000, (100,))]
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if dtype == "mixed" else [dtype]  # mixed: one pass per dtype
    params = [torch.randn(n, device="cuda").to(dtypes[i % len(dtypes)]) for i, n in enumerate(sizes)]
    ema = [torch.randn(n, device="cuda") for n in sizes]
    for decay in (0.0, 0.9999, 1.0):
        exact = [decay * e.double() + (1 - decay) * p.double() for e, p in zip(ema, params)]
        base = [e.clone() for e in ema]
        ck.ema_update_(base, params, decay, backend="torch")
        kernels.ema_update_(ema, params, decay)
        for out, ref, b in zip(ema, exact, base):
            if out.numel():
                err, base_err = ((t.double() - ref).abs().max().item() for t in (out, b))
                assert err <= 2 * base_err + 1e-6 * ref.abs().max().item()


@pytest.mark.gpu
def test_cupy_ema_long_run_stays_as_close_as_torch(kernels):
    err, torch_err, top = long_run_errors(kernels.ema_update_, "cuda")
    assert err <= 2 * torch_err + 1e-6 * top, (err, torch_err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_ema", [False, True])
def test_cupy_adamw_ema_matches_torch_backend(kernels, dtype, with_ema):
    # More tensors than one launch's table holds (36 at depth 6) and one longer than a launch.
    sizes = [1, 77, 1000, 65537, 3 * 65536 + 5, 384 * 65536 + 1]
    sizes += [int(n) for n in torch.randint(0, 3000, (60,), generator=torch.Generator().manual_seed(0))]
    scalars = (1 - 1e-3 * 0.1, 0.1, 0.999, 0.001, 1e-3 / (1 - 0.9**3), (1 - 0.999**3) ** 0.5, 1e-8, 0.01)
    runs = []
    for step in (kernels.adamw_ema_, ck.reference.adamw_ema_):
        torch.manual_seed(2)
        params = [torch.randn(n, device="cuda").to(dtype) for n in sizes]
        grads = [torch.randn_like(p) for p in params]
        m = [torch.randn(n, device="cuda") for n in sizes]
        v = [torch.rand(n, device="cuda") for n in sizes]
        masters = None if dtype == torch.float32 else [p.float() + 1e-3 for p in params]
        emas = [torch.randn(n, device="cuda") for n in sizes] if with_ema else None
        step(params, grads, m, v, masters, emas, scalars)
        weights = masters or params
        assert all(torch.equal(p, w.to(dtype)) for p, w in zip(params, weights))
        runs.append((m, v, weights, emas or []))
    for ours, theirs in zip(*runs):  # fp32 buffers
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
