"""Device tables that let one Triton launch walk a whole list of tensors.

The Triton analogue of apex's multi_tensor_apply: every tensor is cut into chunks of
`chunk` elements and program `pid` handles chunk `chunks[pid]` of tensor `tensors[pid]`.
Each list ("row") is passed as one typed base pointer (its lowest-addressed tensor) plus
an int64 table of element offsets from it, so a launch takes any number of tensors
without copying them. Offsets rather than raw addresses cast to pointers: Triton keeps
the base pointer's 16-byte alignment and a multiple_of hint on the offset, so it emits
128-bit loads; it drops alignment hints across an int-to-pointer cast.

Tables are cached by (addresses, sizes): an EMA or optimizer step over the same tensors
every iteration reuses the table already on the device instead of rebuilding it. A launch
captured in a CUDA graph reads its table at every replay, so a table used while capturing is
kept for good; building one cannot be captured (a host-to-device copy from a buffer that is
gone at replay), so a capture needs one eager call with the same tensors first (a warm-up).
"""
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from cckernels.backend import Unsupported

_CACHE_SIZE = 32
_cache = OrderedDict()
_captured = {}  # tables that CUDA graphs launched with: never evicted, never freed


@triton.jit
def program_chunk(tensors, chunks, sizes, CHUNK: tl.constexpr):
    """(tensor index, first element, tensor numel) of this program's chunk."""
    pid = tl.program_id(0)
    t = tl.load(tensors + pid)
    return t, tl.load(chunks + pid) * CHUNK, tl.load(sizes + t)


@triton.jit
def tensor_ptr(base, table, t, ALIGNED: tl.constexpr):
    """Pointer to tensor t: base + table[t]; ALIGNED (16-byte) lets Triton vectorize accesses."""
    offset = tl.load(table + t)
    if ALIGNED:
        offset = tl.multiple_of(offset, 128 // base.dtype.element_ty.primitive_bitwidth)
    return base + offset


@triton.jit
def load(ptr, offs, n, EVEN: tl.constexpr):
    """ptr[offs] as fp32; EVEN (the block lies inside the tensor) drops the mask so loads vectorize."""
    if EVEN:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=offs < n)
    return x.to(tl.float32)


@triton.jit
def store(ptr, offs, value, n, EVEN: tl.constexpr):
    """ptr[offs] = value cast to ptr's element type (masked unless EVEN)."""
    if EVEN:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty))
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=offs < n)


@triton.jit
def lerp(a, b, w):
    """torch.lerp's formula (exact at w = 0 and w = 1), so every backend rounds alike."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


def tables(lists, chunk):
    """Pack `lists` (rows of T same-size tensors, one dtype per row) for one launch.

    Returns (bases, offsets, sizes, tensors, chunks, aligned): bases, one tensor per row
    whose data_ptr the offsets count from; offsets (rows, T) int64 in elements; sizes (T,)
    numel; tensors/chunks (B,) int64 tensor index and chunk index of each program (B = total
    chunks; empty tensors get none); aligned: every address is 16-byte aligned.
    """
    device = lists[0][0].device
    addresses = tuple(tuple(t.data_ptr() for t in ts) for ts in lists)
    numels = tuple(t.numel() for t in lists[0])
    lowest = [row.index(min(row)) for row in addresses]
    bases = [ts[i] for ts, i in zip(lists, lowest)]
    key = (device, chunk, addresses, numels, tuple(ts[0].dtype for ts in lists))  # offsets count elements
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    hit = _captured.get(key) or _cache.get(key)
    if hit is not None:
        if capturing:
            _captured[key] = hit
        elif key in _cache:
            _cache.move_to_end(key)
        return (bases, *hit)
    if capturing:  # Unsupported: the dispatcher falls back to the next backend (cuda, torch: both capture)
        raise Unsupported("no device table for these tensors yet, and building one cannot be captured "
                          "in a CUDA graph: make one eager call with them before capturing")
    offsets = []
    for row, base in zip(addresses, bases):
        size = base.element_size()
        if any((a - base.data_ptr()) % size for a in row):
            raise Unsupported("a tensor address is not a multiple of its element size from the others")
        offsets.append([(a - base.data_ptr()) // size for a in row])
    sizes = torch.tensor(numels, dtype=torch.int64)
    per_tensor = (sizes + chunk - 1) // chunk
    tensors = torch.repeat_interleave(torch.arange(len(numels)), per_tensor)
    first = torch.cumsum(per_tensor, 0) - per_tensor  # first program of each tensor
    chunks = torch.arange(len(tensors)) - first[tensors]
    # One host->device copy for everything; the pieces are views of it. From pinned memory
    # it does not wait for the work already queued on the GPU.
    flat = torch.cat([torch.tensor(offsets, dtype=torch.int64).flatten(), sizes, tensors, chunks])
    flat = (flat.pin_memory() if device.type == "cuda" else flat).to(device, non_blocking=True)
    n, T, B = len(lists), len(numels), len(tensors)
    offsets, sizes, tensors, chunks = flat.split([n * T, T, B, B])
    aligned = all(a % 16 == 0 for row in addresses for a in row)
    hit = (offsets.view(n, T), sizes, tensors, chunks, aligned)
    _cache[key] = hit
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return (bases, *hit)
