"""The build: setup.py's architecture parsing, build_info() telling the truth, and the
kernel headers compiling under NVRTC (the CuPy path) as well as under nvcc."""
import ctypes
import glob
import os
import re
import shutil

import pytest
import torch

import cckernels
import scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_module():
    return scripts.load("setup.py")  # setup() itself only runs as __main__


def _compiled_extension():
    try:
        from cckernels import _C
    except ImportError:
        return None
    return _C


def _cupy_kernels():
    """The CuPy-compiled kernels (the "cuda" backend without _C), or None."""
    from cckernels import cupy_kernels

    found = cupy_kernels.load()
    return None if isinstance(found, str) else found


def test_build_info_is_truthful():
    info = cckernels.build_info()
    _C = _compiled_extension()
    assert info["_C"] is (_C is not None)
    kernels = _C if _C is not None else _cupy_kernels()
    assert info["cupy"] is (_C is None and kernels is not None)
    if kernels is None:
        assert info["archs"] == [] and info["reason"]
    else:
        assert info["archs"] == list(kernels.archs()) and info["archs"]
        assert all(re.fullmatch(r"(sm|compute)_\d+[af]?", a) for a in info["archs"])
        assert re.fullmatch(r"\d+\.\d+", info["cuda_version"])


def test_cuda_backend_listed_only_with_kernels():
    listed = "cuda" in cckernels.available_backends("cuda")["ema_update_"]
    kernels = _compiled_extension() is not None or _cupy_kernels() is not None
    assert listed is (kernels and torch.cuda.is_available())  # no GPU: nothing runs on "cuda"
    assert "cuda" not in cckernels.available_backends("cpu")["ema_update_"]


@pytest.mark.parametrize(
    "ema, params, decay, match",
    [
        ([torch.randn(4)], [torch.randn(4)], 0.9, r"ema\[0\] is on cpu"),
        ([torch.randn(4)], [torch.randn(4), torch.randn(4)], 0.9, r"ema has 1 tensors but params has 2"),
        ([torch.randn(4)], [torch.randn(4)], 1.5, r"decay must be in \[0, 1\], got 1.5"),
    ],
)
def test_extension_checks_run_without_a_gpu(ema, params, decay, match):
    _C = _compiled_extension()
    if _C is None:
        pytest.skip("cckernels._C was not built")
    with pytest.raises(ValueError, match=match):
        _C.ema_update_(ema, params, decay)


@pytest.mark.parametrize(
    "arch_list, archs",
    [
        ("9.0", ["sm_90"]),
        ("8.0;9.0+PTX", ["sm_80", "sm_90", "compute_90"]),
        ("8.0 9.0a", ["sm_80", "sm_90a"]),
    ],
)
def test_arch_list_parsing(arch_list, archs):
    flags, names = _setup_module().arch_flags(arch_list)
    assert names == archs
    assert f"-gencode=arch=compute_{archs[0][3:]},code={archs[0]}" in flags


@pytest.mark.parametrize("bad", ["", "sm_90", "Hopper", "9"])
def test_arch_list_rejects_bad_entries(bad):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        _setup_module().arch_flags(bad)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_toolkit_root_found_through_wrapper():
    root = _setup_module().cuda_toolkit_root(shutil.which("nvcc"))
    assert os.path.isfile(os.path.join(root, "bin", "nvcc"))
    assert os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def _nvrtc():
    """libnvrtc and the CUDA headers from the nvidia-* wheels torch installs, or None."""
    try:
        import nvidia
    except ImportError:
        return None
    for root in glob.glob(os.path.join(nvidia.__path__[0], "cu*")):
        libs = glob.glob(os.path.join(root, "lib", "libnvrtc.so.*"))
        builtins = glob.glob(os.path.join(root, "lib", "libnvrtc-builtins.so.*"))
        if libs and builtins and os.path.isfile(os.path.join(root, "include", "cuda_fp16.h")):
            ctypes.CDLL(builtins[0], mode=ctypes.RTLD_GLOBAL)  # nvrtc dlopens it by name
            return ctypes.CDLL(libs[0]), os.path.join(root, "include")
    return None


def nvrtc_compile(source, names, options=()):
    """Compile `source` (a program including csrc/ headers) with NVRTC for compute_90 and
    `options`, instantiating the kernel name expressions `names`; returns their lowered
    (mangled) names. Skips without libnvrtc."""
    found = _nvrtc()
    if found is None:
        pytest.skip("no libnvrtc from the nvidia-* wheels")
    lib, cuda_include = found
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernels.cu", 0, None, None) == 0
    for name in names:
        assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0
    options = [f"-I{ROOT}/csrc", f"-I{cuda_include}", "--std=c++17", "-arch=compute_90", *options]
    options = [o.encode() for o in options]
    rc = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lowered = []
    for name in names if rc == 0 else []:
        out = ctypes.c_char_p()
        assert lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)) == 0, name
        lowered.append(out.value)  # owned by prog: read it before destroying prog
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    assert rc == 0, log.value.decode()
    return lowered
