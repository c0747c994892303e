"""Device tables that let one Triton launch walk a whole list of tensors.

The Triton analogue of apex's multi_tensor_apply: every tensor is cut into chunks of
`chunk` elements and program `pid` handles chunk `chunks[pid]` of tensor `tensors[pid]`.
The tensors' addresses travel as int64 in one table that the kernel loads and casts back
to typed pointers, so a launch takes any number of tensors without copying them.

Tables are cached by (addresses, sizes): an EMA or optimizer step over the same tensors
every iteration reuses the table already on the device instead of rebuilding it.
"""
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from cckernels.backend import Unsupported

_CACHE_SIZE = 32
_cache = OrderedDict()


@triton.jit
def tensor_address(table, t, ALIGNED: tl.constexpr):
    """Address of tensor t from an int64 table; ALIGNED lets Triton vectorize its accesses."""
    address = tl.load(table + t)
    if ALIGNED:
        address = tl.multiple_of(address, 16)
    return address


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


def dense(t):
    """Whether t's elements fill numel() consecutive slots from data_ptr() (any dense layout)."""
    return (
        t.is_contiguous()
        or t.is_contiguous(memory_format=torch.channels_last)
        or t.is_contiguous(memory_format=torch.channels_last_3d)
    )


def check_same_layout(name, lists):
    """Raise Unsupported unless every row's tensors are dense with identical strides."""
    for i, ts in enumerate(zip(*lists)):
        if not all(dense(t) for t in ts) or len({t.stride() for t in ts}) != 1:
            raise Unsupported(f"{name}: tensor {i} is not dense or its lists' strides differ")


def tables(lists, chunk):
    """Pack `lists` (each a list of T same-size tensors) into device tables for one launch.

    Returns (ptrs, sizes, tensors, chunks, aligned): ptrs (len(lists), T) int64 addresses,
    sizes (T,) numel, tensors/chunks (B,) int64 tensor index and chunk index per program
    (B = total chunks; empty tensors get none), aligned: every address is 16-byte aligned.
    """
    device = lists[0][0].device
    addresses = tuple(tuple(t.data_ptr() for t in ts) for ts in lists)
    numels = tuple(t.numel() for t in lists[0])
    key = (device, chunk, addresses, numels)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    sizes = torch.tensor(numels, dtype=torch.int64)
    per_tensor = (sizes + chunk - 1) // chunk
    tensors = torch.repeat_interleave(torch.arange(len(numels)), per_tensor)
    first = torch.cumsum(per_tensor, 0) - per_tensor  # first program of each tensor
    chunks = torch.arange(len(tensors)) - first[tensors]
    # One host->device copy for everything; the pieces are views of it.
    flat = torch.cat([torch.tensor(addresses, dtype=torch.int64).flatten(), sizes, tensors, chunks]).to(device)
    n, T, B = len(lists), len(numels), len(tensors)
    ptrs, sizes, tensors, chunks = flat.split([n * T, T, B, B])
    aligned = all(a % 16 == 0 for row in addresses for a in row)
    out = (ptrs.view(n, T), sizes, tensors, chunks, aligned)
    _cache[key] = out
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return out
