"""The csrc kernels compiled at run time with NVRTC through CuPy: the "cuda" backend for
users without a compiled cckernels._C (no nvcc at install time) but with CuPy and a GPU.

The kernels are the same torch-free headers (csrc/*.cuh) that nvcc builds into _C; this
module replaces csrc/*.cu and bindings.cpp: it plans the launches as multi_tensor_apply
does, packs each launch's TensorTable and functor into numpy structs with the C++ layout,
and launches on torch's current stream. It offers _C's functions with _C's arguments.

CuPy compiles with flush-to-zero (-ftz=true): values below ~1.2e-38 become 0 here but not in
_C or torch, so the two CUDA paths agree to rounding, not bit for bit.
"""
import functools
import glob
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch

from cckernels.reference import ema_pairs_by_dtype

CSRC = Path(__file__).resolve().parents[1] / "csrc"
PARAM_TYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
EMA_DEPTH = 2
SCALARS = ("decay_factor", "beta1_w", "beta2", "beta2_w", "step_size", "bc2_sqrt", "eps", "ema_w")  # AdamWEmaScalars


@functools.cache
def limits():
    """The launch limits from csrc/multi_tensor_apply.cuh (kTableBytes, kMaxBlocks, ...)."""
    text = (CSRC / "multi_tensor_apply.cuh").read_text()
    names = ("kTableBytes", "kMaxBlocks", "kBlockThreads", "kChunkSize", "kAdamWEmaDepth")
    text += (CSRC / "adamw_ema.cuh").read_text()
    return {n: int(re.search(rf"constexpr\s+\w+\s+{n}\s*=\s*(\d+)", text).group(1)) for n in names}


def table_dtype(depth):
    """numpy layout of cck::TensorTable<depth> (pointers and int64 8-aligned, then ints, bytes)."""
    lim = limits()
    fit = (lim["kTableBytes"] - lim["kMaxBlocks"] * 5) // (8 * depth + 8)
    tensors, blocks = min(fit, 255), lim["kMaxBlocks"]
    offsets = [0, 8 * depth * tensors, 8 * depth * tensors + 8 * tensors]
    offsets.append(offsets[2] + 4 * blocks)
    end = offsets[3] + blocks
    return np.dtype(dict(
        names=["addresses", "sizes", "block_chunk", "block_slot"],
        formats=[(np.uint64, (tensors, depth)), (np.int64, tensors), (np.int32, blocks), (np.uint8, blocks)],
        offsets=offsets,
        itemsize=(end + 7) // 8 * 8,
    ))  # fmt: skip


@functools.lru_cache(maxsize=64)
def plan_launches(sizes, max_tensors):
    """plan_launches() of csrc/multi_tensor_apply.cuh: [(tensors, block slots, block chunks)]."""
    lim = limits()
    launches, tensors, slots, chunks = [], [], [], []
    for t, n in enumerate(sizes):
        total = -(-n // lim["kChunkSize"])
        for c in range(total):
            if not tensors or tensors[-1] != t:
                tensors.append(t)
            slots.append(len(tensors) - 1)
            chunks.append(c)
            # A full tensor table ends a launch only after its last tensor's last chunk.
            if len(slots) == lim["kMaxBlocks"] or (len(tensors) == max_tensors and c == total - 1):
                launches.append((tensors, slots, chunks))
                tensors, slots, chunks = [], [], []
    if slots:
        launches.append((tensors, slots, chunks))
    return launches


def cuda_include_dirs():
    """CUDA headers (cuda_fp16.h, ...) for NVRTC: $CUDA_PATH/include or the nvidia-* wheels'."""
    dirs = [os.path.join(os.environ[v], "include") for v in ("CUDA_PATH", "CUDA_HOME") if v in os.environ]
    try:
        import nvidia

        dirs += glob.glob(os.path.join(nvidia.__path__[0], "*", "include"))
    except ImportError:
        pass
    return [d for d in dirs if os.path.isfile(os.path.join(d, "cuda_fp16.h"))][:1]


def ema_kernel_name(param_type):
    return f"cck::multi_tensor_kernel<{EMA_DEPTH}, cck::EmaFunctor<{param_type}> >"


def adamw_kernel_name(param_type, master, ema):
    depth = limits()["kAdamWEmaDepth"]
    return f"cck::multi_tensor_kernel<{depth}, cck::AdamWEmaFunctor<{param_type}, {str(master).lower()}, {str(ema).lower()}> >"


def kernel_names():
    """Every kernel instantiation the backend launches (fp32 params have no master)."""
    names = [ema_kernel_name(t) for t in PARAM_TYPES.values()]
    for dtype, t in PARAM_TYPES.items():
        names += [adamw_kernel_name(t, dtype != torch.float32, ema) for ema in (False, True)]
    return names


def nvrtc_program():
    """(source, options) compiled by NVRTC; the kernels are found through kernel_names().

    CuPy caches compiled binaries on disk keyed by this source text and the options, not by
    the headers it includes: the first line, a digest of csrc's headers, makes an edited header
    compile afresh instead of loading the binary of the old one.
    """
    options = ["--std=c++17", f"-I{CSRC}"] + [f"-I{d}" for d in cuda_include_dirs()]
    headers = sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in headers)).hexdigest()
    return f'// csrc headers sha256 {digest}\n#include "ema.cuh"\n#include "adamw_ema.cuh"\n', options


class Kernels:
    """cckernels._C's functions, run through a CuPy RawModule compiled from csrc/*.cuh."""

    def __init__(self):
        import cupy

        self.cupy = cupy
        source, options = nvrtc_program()
        self.module = cupy.RawModule(code=source, options=tuple(options), name_expressions=kernel_names())
        self.module.compile()  # now, so that load() reports a failure instead of a later launch

    def archs(self):
        cc = self.cupy.cuda.Device().compute_capability
        return [f"sm_{cc}"]

    def cuda_version(self):
        version = self.cupy.cuda.runtime.runtimeGetVersion()
        return f"{version // 1000}.{version % 1000 // 10}"

    def _stream(self, device):
        """torch's current stream on `device` as a CuPy stream, so kernels queue in order."""
        stream = torch.cuda.current_stream(device)
        if hasattr(self.cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
            return self.cupy.cuda.Stream.from_external(stream)  # CuPy >= 14
        return self.cupy.cuda.ExternalStream(stream.cuda_stream, device.index)

    def _apply(self, name, lists, functor, device):
        """Launch kernel `name` over tensor lists (one row per list; None rows pass null)."""
        depth = len(lists)
        table_type = table_dtype(depth)
        max_tensors = table_type["sizes"].shape[0]
        sizes = tuple(t.numel() for t in lists[0])
        addresses = np.array([[0] * len(sizes) if row is None else [t.data_ptr() for t in row] for row in lists],
                             dtype=np.uint64)  # fmt: skip
        kernel = self.module.get_function(name)
        chunk = np.int64(limits()["kChunkSize"])
        with self.cupy.cuda.Device(device.index), self._stream(device):
            for tensors, slots, chunks in plan_launches(sizes, max_tensors):
                table = np.zeros(1, dtype=table_type)
                table["addresses"][0, : len(tensors)] = addresses[:, tensors].T
                table["sizes"][0, : len(tensors)] = [sizes[t] for t in tensors]
                table["block_chunk"][0, : len(chunks)] = chunks
                table["block_slot"][0, : len(slots)] = slots
                kernel((len(slots),), (limits()["kBlockThreads"],), (chunk, table, functor))

    def ema_update_(self, ema, params, decay):
        """Params may mix dtypes: one multi-tensor pass per dtype, as _C does."""
        functor = np.array([1.0 - decay], dtype=[("weight", np.float32)])  # cck::EmaFunctor
        for dtype, (es, ps) in ema_pairs_by_dtype(ema, params).items():
            self._apply(ema_kernel_name(PARAM_TYPES[dtype]), [es, ps], functor, ema[0].device)

    def adamw_ema_(self, params, grads, exp_avgs, exp_avg_sqs, masters, emas, scalars):
        functor = np.array([tuple(scalars)], dtype=[(n, np.float32) for n in SCALARS])
        name = adamw_kernel_name(PARAM_TYPES[params[0].dtype], bool(masters), bool(emas))
        lists = [params, grads, exp_avgs, exp_avg_sqs, masters or None, emas or None]
        self._apply(name, lists, functor, params[0].device)


def load():
    """Kernels compiled for the current GPU, or the reason there are none (a str)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if not (CSRC / "multi_tensor_apply.cuh").is_file():
        return f"the CUDA sources are not at {CSRC}"
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        return f"CuPy is not installed ({e})"
    try:
        return Kernels()
    except Exception as e:  # NVRTC missing or failing: report why, fall back to Triton
        return f"CuPy could not compile csrc/ with NVRTC: {e}"
