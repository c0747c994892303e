"""Plain-PyTorch versions of every op: the ground truth for tests and the CPU path.

Each takes already-validated arguments (the public functions in cckernels/__init__.py
check them) and computes in fp32 at least, casting back to the input dtype at the end.
"""
import torch
import torch.nn.functional as F


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention(q, k, v, scale):
    """Softmax(q k^T * scale) v over BLHD tensors, materializing the (Lq, Lk) scores."""
    ct = _compute_dtype(q.dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(ct), k.to(ct)) * scale
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.to(ct)).to(q.dtype)


def group_norm(x, num_groups, weight, bias, eps, activation):
    """GroupNorm (+ optional SiLU) with fp32 statistics; keeps x's dtype and memory format."""
    ct = _compute_dtype(x.dtype)
    y = F.group_norm(
        x.to(ct),
        num_groups,
        None if weight is None else weight.to(ct),
        None if bias is None else bias.to(ct),
        eps,
    )
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype).contiguous(memory_format=memory_format(x))


def ema_update_(ema, params, decay):
    """ema[i] <- decay * ema[i] + (1 - decay) * params[i]; ema is fp32 whatever params are."""
    with torch.no_grad():
        for e, p in zip(ema, params):
            e.lerp_(p.to(e.dtype), 1.0 - decay)


def memory_format(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
