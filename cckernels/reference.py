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


def torch_group_norm(x, num_groups, weight, bias, eps):
    """F.group_norm in x's dtype. A bias without weight is added outside: torch 2.11's
    group_norm backward fails on it ("tensor does not have a device")."""
    if weight is None and bias is not None:
        return F.group_norm(x, num_groups, None, None, eps) + bias.view(-1, *[1] * (x.dim() - 2))
    return F.group_norm(x, num_groups, weight, bias, eps)


def group_norm(x, num_groups, weight, bias, eps, activation, prenorm=False):
    """GroupNorm (+ optional SiLU) with fp32 statistics; keeps x's dtype and memory format.
    With prenorm, (y, x)."""
    ct = _compute_dtype(x.dtype)
    y = torch_group_norm(x.to(ct), num_groups, None if weight is None else weight.to(ct),
                         None if bias is None else bias.to(ct), eps)
    if activation == "silu":
        y = F.silu(y)
    y = y.to(x.dtype)
    if channels_last(x) and not x.is_contiguous():  # in any spatial rank, as the kernels: x's strides
        y = torch.empty_like(x).copy_(y)
    return (y, x) if prenorm else y


def geglu(x, bias=None):
    """h * gelu(gate), (h, gate) = (x + bias).chunk(2, dim=-1), in x's dtype: the plain PyTorch
    code of SD2's feed-forward (diffusers' GEGLU), which rounds gelu(gate) before the multiply."""
    if bias is not None:
        x = x + bias.to(x.dtype)
    h, gate = x.chunk(2, dim=-1)
    return h * F.gelu(gate)


def layer_norm(x, weight, bias, eps, residual=None, prenorm=False):
    """LayerNorm(s) over the last dim with fp32 statistics, in x's dtype, s = x + residual (x
    without one) rounded to x's dtype before it is normalized; with prenorm, (LayerNorm(s), s)."""
    s = x if residual is None else x + residual
    ct = _compute_dtype(x.dtype)
    y = F.layer_norm(s.to(ct), s.shape[-1:], None if weight is None else weight.to(ct),
                     None if bias is None else bias.to(ct), eps).to(x.dtype)
    return (y, s) if prenorm else y


def ema_update_(ema, params, decay):
    """ema[i] <- decay * ema[i] + (1 - decay) * params[i]; ema is fp32 whatever params are."""
    with torch.no_grad():
        for e, p in zip(ema, params):
            e.lerp_(p.to(e.dtype), 1.0 - decay)


def ema_pairs_by_dtype(ema, params):
    """{params dtype: (ema tensors, params)} in list order, empty tensors left out (nothing to
    update): the multi-tensor EMA kernels take one params dtype per pass."""
    groups = {}
    for e, p in zip(ema, params):
        if p.numel():
            es, ps = groups.setdefault(p.dtype, ([], []))
            es.append(e)
            ps.append(p)
    return groups


def adamw_ema_(params, grads, exp_avgs, exp_avg_sqs, masters, emas, scalars):
    """One AdamW step (+ EMA) over tensor lists with torch._foreach ops, as torch.optim.AdamW.

    masters: fp32 weights updated in place of params (then copied into them), or None;
    emas: fp32 EMA tensors moved toward the new weights, or None. scalars: see cckernels.optim.
    """
    decay_factor, beta1_w, beta2, beta2_w, step_size, bc2_sqrt, eps, ema_w = scalars
    weights = params if masters is None else masters
    grads = [g.float() for g in grads]
    torch._foreach_mul_(weights, decay_factor)
    torch._foreach_lerp_(exp_avgs, grads, beta1_w)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, beta2_w)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(weights, exp_avgs, denom, -step_size)
    if masters is not None:
        torch._foreach_copy_(params, masters)
    if emas is not None:
        torch._foreach_lerp_(emas, weights, ema_w)


def channels_last(x):
    """(N, C, *spatial) with channels contiguous and no gaps: channels_last in any spatial rank.
    Is x.permute(0, *spatial dims, 1).is_contiguous() (size-1 dims may have any stride) from the
    strides alone: the permuted view cost about as much host time as a kernel launch."""
    if x.numel() == 0:
        return True
    expected = 1
    for d in (1, *range(x.dim() - 1, 1, -1), 0):
        if x.shape[d] != 1 and x.stride(d) != expected:
            return False
        expected *= x.shape[d]
    return True
