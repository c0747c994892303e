"""Builds csrc/ into cckernels._C when torch has CUDA and nvcc is found.

    pip install --no-build-isolation -e .            # build the extension if possible
    CCKERNELS_BUILD_CUDA=1 pip install ...           # a failed CUDA build is an error
    CCKERNELS_BUILD_CUDA=0 pip install ...           # pure Python, no extension
    TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" pip install   # architectures (default 9.0)

Without the extension, cckernels still works on its Triton and torch backends;
cckernels.build_info() tells which one you got.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

DEFAULT_ARCHS = "9.0"


def say(msg):
    print(f"cckernels setup: {msg}", file=sys.stderr, flush=True)


def cuda_toolkit_root(nvcc):
    """The toolkit of this nvcc (it may be a wrapper script outside the toolkit)."""
    dry = subprocess.run([nvcc, "-x", "cu", "-c", os.devnull, "--dryrun"], capture_output=True, text=True)
    match = re.search(r"^#\$ _HERE_=(.*)$", dry.stderr + dry.stdout, re.MULTILINE)
    bindir = match.group(1).strip() if match else os.path.dirname(os.path.realpath(nvcc))
    return os.path.dirname(bindir)


def arch_flags(arch_list):
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", "9.0a 10.0") -> (nvcc -gencode flags, arch names)."""
    flags, names = [], []
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not entry:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if not match:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not like 9.0, 9.0a or 8.0+PTX")
        num = match.group(1) + match.group(2) + match.group(3)
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        names.append(f"sm_{num}")
        if match.group(4):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
            names.append(f"compute_{num}")
    if not names:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST={arch_list!r} names no architecture")
    return flags, names


def pip_cuda_include():
    """site-packages/nvidia/cu13/include: torch's headers include cusparse.h and friends,
    which a bare nvcc toolkit lacks but the nvidia-* wheels torch depends on carry."""
    try:
        import nvidia
    except ImportError:
        return None
    found = [p for root in nvidia.__path__ for p in sorted(glob.glob(os.path.join(root, "cu[0-9]*", "include")))]
    return found[-1] if found else None  # the newest CUDA major version


def why_no_cuda():
    """None when the CUDA extension can be built, else the reason it cannot."""
    try:
        import torch
    except ImportError:
        return "torch is not importable in the build environment (use pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc was not found on PATH and CUDA_HOME is not set"
    return None


def cuda_extension():
    """(ext_modules, cmdclass) for cckernels._C."""
    nvcc = shutil.which("nvcc")
    # torch.utils.cpp_extension reads CUDA_HOME when imported; point it at the real toolkit.
    if nvcc and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_toolkit_root(nvcc)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    gencode, archs = arch_flags(os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS)
    cxx = ["-O3", f"-DCCKERNELS_ARCHS={','.join(archs)}"]
    include = pip_cuda_include()
    if include:
        cxx += ["-idirafter", include]  # after the toolkit's own headers, which win
    say(f"building cckernels._C for {', '.join(archs)} with CUDA at {os.environ.get('CUDA_HOME')}")
    sources = sorted(glob.glob("csrc/*.cu")) + ["csrc/bindings.cpp"]
    ext = CUDAExtension(
        "cckernels._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", *gencode]},
    )
    return [ext], {"build_ext": optional(BuildExtension)}


def optional(build_ext):
    """build_ext whose failure only warns, unless CCKERNELS_BUILD_CUDA=1 asked for _C."""

    class OptionalBuildExt(build_ext):
        def run(self):
            try:
                super().run()
            except Exception as e:
                if os.environ.get("CCKERNELS_BUILD_CUDA") == "1":
                    raise
                say(f"the CUDA extension failed to build, installing pure Python: {e}")

    return OptionalBuildExt


def extensions():
    mode = os.environ.get("CCKERNELS_BUILD_CUDA", "")
    if mode not in ("", "0", "1"):
        raise SystemExit(f"CCKERNELS_BUILD_CUDA must be 0, 1 or unset, got {mode!r}")
    if mode == "0":
        say("skipping the CUDA extension: CCKERNELS_BUILD_CUDA=0")
        return [], {}
    reason = why_no_cuda()
    if reason:
        if mode == "1":
            raise SystemExit(f"CCKERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        say(f"skipping the CUDA extension: {reason}")
        return [], {}
    return cuda_extension()


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import the helpers
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
