"""FusedAdamWEMA: AdamW with fp32 master weights and an EMA of the weights in one memory pass;
clip_grad_norm_, gradient clipping that stays multi-tensor when grads mix dtypes."""
import math

import torch

import cckernels
from cckernels.backend import check_number, dispatch


def _check_hyperparameters(h, where=""):
    """Raise ValueError naming the first bad value of `h` (the defaults, or a param group)."""
    check_number(f"{where}lr", h["lr"], 0.0, math.inf)
    betas = h["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
    check_number(f"{where}betas[0]", betas[0], 0.0, 1.0, high_open=True)
    check_number(f"{where}betas[1]", betas[1], 0.0, 1.0, high_open=True)
    check_number(f"{where}eps", h["eps"], 0.0, math.inf)
    check_number(f"{where}weight_decay", h["weight_decay"], 0.0, math.inf)
    if h["ema_decay"] is not None:
        check_number(f"{where}ema_decay", h["ema_decay"], 0.0, 1.0)
    for flag in ("amsgrad", "maximize"):  # torch.optim.AdamW options this step does not have
        if h.get(flag):
            raise ValueError(f"{where}{flag}={h[flag]!r} is not supported by FusedAdamWEMA")


@torch.no_grad()
def clip_grad_norm_(params, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """torch.nn.utils.clip_grad_norm_ (same norm, same scaled grads), for grads of mixed dtypes.

    With bf16 weights and fp32 GroupNorm weights the total norm is fp32, and torch's
    _foreach_mul_ takes its multi-tensor kernel only when the scale has the grads' dtype:
    torch's clip_grad_norm_ then scales each bf16 grad with its own launch (564 launches a
    step for the SD2 UNet, in an H200 profile). Here each (device, dtype) group gets the
    scale in its own dtype on CUDA; torch's per-tensor multiply rounds it to bf16 the same way.
    Returns the total norm. max_norm > 0 (inf: no clipping); a negative one would flip every
    gradient (torch does not check)."""
    check_number("max_norm", max_norm, 0.0, math.inf, low_open=True)
    grads = [p.grad for p in ([params] if isinstance(params, torch.Tensor) else params) if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    groups = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), gs in groups.items():
        torch._foreach_mul_(gs, scale.to(device=device, dtype=dtype if device.type == "cuda" else scale.dtype))
    return total


class FusedAdamWEMA(torch.optim.Optimizer):
    """torch.optim.AdamW (decoupled weight decay, bias correction) fused with an EMA update.

    Each step reads param, grad, exp_avg, exp_avg_sq (and the EMA) once and writes them once,
    in a few launches per (param group, dtype) on the "cuda" and "triton" backends; the "torch"
    backend does the same arithmetic with torch._foreach ops. Results match torch.optim.AdamW
    followed by ck.ema_update_ to fp32 rounding.

    Params are fp32, bf16 or fp16 (others are refused: the states are fp32).
    bf16/fp16 params get fp32 master weights in the optimizer state ("master"); the step
    updates the master and writes it back rounded into the param, and the EMA follows the
    master. All state (exp_avg, exp_avg_sq, master, ema) is fp32. A param that is bf16 from the
    start gets its master from its rounded values; `cast_params_` turns fp32 params into bf16
    ones whose masters keep the fp32 values exactly.

    EMA: `ema_decay` (per param group) is the default decay. With ema_decay given here the
    shadow weights start as a copy of the initial weights; otherwise `start_ema()` starts them
    later (no EMA memory before). Once started, every step updates them unless
    `step(ema=False)`; `step(ema_decay=d)` overrides the decay for one step. Params whose grad
    is None are not stepped but their EMA still moves toward them, as a separate ema_update_
    would. `ema_params()` returns the shadow tensors in param order.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, ema_decay=None, backend=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, ema_decay=ema_decay)
        _check_hyperparameters(defaults)
        defaults["betas"] = tuple(betas)
        super().__init__(params, defaults)  # checks each param group (add_param_group)
        self.backend = backend
        if ema_decay is not None:
            self.start_ema()

    def add_param_group(self, param_group):
        where = f"param group {len(self.param_groups)}: "
        _check_hyperparameters({**self.defaults, **param_group}, where)
        params = param_group["params"]  # checked before torch adds the group (it refuses sets itself)
        params = [params] if isinstance(params, torch.Tensor) else params if isinstance(params, set) else list(params)
        for i, p in enumerate(params):
            if isinstance(p, torch.Tensor) and p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                # states and masters are fp32: an fp64 param would be stepped at fp32 precision
                raise ValueError(f"{where}params[{i}] (shape {tuple(p.shape)}) is {p.dtype}: FusedAdamWEMA steps "
                                 "float32, bfloat16 and float16 parameters (torch.optim.AdamW takes others)")
        super().add_param_group({**param_group, "params": params})

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    @staticmethod
    def _fp32_copy(t):
        return torch.empty_like(t, dtype=torch.float32).copy_(t)

    def _weights(self, p):
        """The fp32 weights the step updates: the master copy, or p itself when p is fp32."""
        return self.state[p].get("master", p)

    @torch.no_grad()
    def start_ema(self, decay=None):
        """Start the EMA: shadow = a copy of the current weights; `decay` sets every group's."""
        if decay is not None:
            check_number("decay", decay, 0.0, 1.0)
            for group in self.param_groups:
                group["ema_decay"] = decay
        if any(group["ema_decay"] is None for group in self.param_groups):
            raise ValueError("start_ema() needs a decay: pass start_ema(decay) or ema_decay= to the constructor")
        for p in self._params():
            self.state[p]["ema"] = self._fp32_copy(self._weights(p))

    @property
    def ema_started(self):
        return any("ema" in self.state[p] for p in self._params())

    def ema_params(self):
        """The fp32 EMA tensors in param order (over all groups); [] before the EMA starts."""
        return [self.state[p]["ema"] for p in self._params() if "ema" in self.state[p]]

    def master_weights(self):
        """The fp32 weights in param order (over all groups): each param's master copy, or the
        param itself when it is fp32. What a checkpoint saves as the model's weights."""
        return [self._weights(p) for p in self._params()]

    @torch.no_grad()
    def cast_params_(self, dtype, params=None):
        """Store every fp32 param (of `params`, default all) in `dtype` (bf16 or fp16), its
        current fp32 values kept as its master: nothing is rounded away. The Parameter objects
        stay the same (the model and this optimizer keep referring to them); call it before the
        first backward, before wrapping the model (DDP buckets grads by dtype), after loading
        weights. A later `load_state_dict` of a state without masters keeps these."""
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"cast_params_ takes torch.bfloat16 or torch.float16, got {dtype}")
        mine = self._params()
        chosen = mine if params is None else list(params)
        ids = {id(p) for p in mine}
        for i, p in enumerate(chosen):  # all checked before any is cast: an error leaves none cast
            if id(p) not in ids:
                raise ValueError(f"cast_params_: params[{i}] (shape {tuple(p.shape)}) is a tensor this optimizer does not step")
            if p.dtype == torch.float32 and p.grad is not None:
                raise ValueError(f"cast_params_ needs params without grads (call it before the first backward); "
                                 f"params[{i}] (shape {tuple(p.shape)}) has one")
        for p in chosen:
            if p.dtype != torch.float32:
                continue
            self.state[p]["master"] = self._fp32_copy(p)
            p.data = p.data.to(dtype)  # keeps the memory format (channels_last stays)

    def _init_state(self, p):
        state = self.state[p]
        state["step"] = 0  # a Python int: no tensor op per parameter per step
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        if p.dtype != torch.float32 and "master" not in state:  # cast_params_ made it already
            state["master"] = self._fp32_copy(p)

    @torch.compiler.disable  # the kernels run eagerly: a step updates tensors in place, outside any model graph
    @torch.no_grad()
    def step(self, closure=None, *, ema=True, ema_decay=None):
        """One AdamW step; also the EMA update when the EMA has started and `ema` is True."""
        first = self.param_groups[0]["params"][0]  # CPU params: no query that would start CUDA
        if first.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "FusedAdamWEMA.step cannot be captured in a CUDA graph: the step count, learning rate "
                "and bias corrections are host numbers, so every replay would repeat the captured "
                "step's. Capture the forward and backward and call step() outside the graph."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        use_ema = ema and self.ema_started
        if ema_decay is not None:
            check_number("ema_decay", ema_decay, 0.0, 1.0)
        for group in self.param_groups:
            decay = group["ema_decay"] if ema_decay is None else ema_decay
            if use_ema and decay is None:
                raise ValueError("the EMA has started but has no decay: pass step(ema_decay=...) or start_ema(decay)")
            buckets, gradless = {}, []
            for p in group["params"]:
                state = self.state[p]
                if use_ema and "ema" not in state:  # added to the optimizer after start_ema()
                    state["ema"] = self._fp32_copy(self._weights(p))
                if p.grad is None:
                    gradless.append(p)
                    continue
                if p.grad.is_sparse:
                    raise ValueError("FusedAdamWEMA does not support sparse gradients")
                if "step" not in state:
                    self._init_state(p)
                state["step"] += 1
                buckets.setdefault((p.device, p.dtype, state["step"]), []).append(p)
            for (device, _, step), ps in buckets.items():
                self._step_bucket(group, ps, step, decay if use_ema else None)
            if use_ema:
                by_device = {}  # ema_update_ takes one device per call
                for p in gradless:
                    by_device.setdefault(p.device, []).append(p)
                for ps in by_device.values():
                    emas = [self.state[p]["ema"] for p in ps]
                    cckernels.ema_update_(emas, [self._weights(p) for p in ps], decay, backend=self.backend)
        return loss

    def _step_bucket(self, group, params, step, ema_decay):
        """One fused launch for params of one device and dtype sharing a step count."""
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        scalars = (
            1.0 - lr * group["weight_decay"],  # decoupled weight decay factor
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            lr / (1.0 - beta1**step),  # step size with bias correction 1
            (1.0 - beta2**step) ** 0.5,  # sqrt of bias correction 2
            group["eps"],
            0.0 if ema_decay is None else 1.0 - ema_decay,
        )
        states = [self.state[p] for p in params]
        masters = [s["master"] for s in states] if params[0].dtype != torch.float32 else None
        emas = [s["ema"] for s in states] if ema_decay is not None else None
        grads = [p.grad for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        dispatch("adamw_ema_", params[0].device, self.backend, params, grads, exp_avgs, exp_avg_sqs, masters, emas, scalars)

    def state_dict(self, *, ema=True, master=True):
        """As torch's; ema=False / master=False leave out the EMA tensors / the master weights,
        for a caller that saves them elsewhere (a trainer's ema.safetensors, and its
        unet.safetensors written from master_weights()): each is 3.5 GB for an SD2 UNet."""
        state_dict = super().state_dict()
        left_out = {k for k, keep in (("ema", ema), ("master", master)) if not keep}
        if left_out:
            state_dict["state"] = {
                i: {k: v for k, v in s.items() if k not in left_out} for i, s in state_dict["state"].items()
            }
        return state_dict

    def load_state_dict(self, state_dict):
        """As torch's, but keeps the state fp32: torch casts it to each param's dtype. A saved
        master is not loaded for an fp32 param (which is its own master: the state of a bf16
        run resumed in fp32); the param's own values stand. A bf16/fp16 param whose saved state
        has no master (state_dict(master=False)) keeps the master it had, else gets one from
        its own values (as its first step would). A state without EMA tensors
        (state_dict(ema=False), or torch.optim.AdamW's) leaves the EMA unstarted: start_ema(), or
        put the saved EMA back, as trainer/ema.py does. A torch.optim.AdamW state dict loads: its
        groups take this optimizer's ema_decay, its tensor steps become counts; groups with
        amsgrad or maximize are refused."""
        kept = {id(p): self.state[p]["master"] for p in self._params() if "master" in self.state.get(p, {})}
        groups = state_dict["param_groups"]
        if len(groups) == len(self.param_groups):  # else torch's load refuses it
            groups = [{**{k: v for k, v in current.items() if k != "params"}, **saved}  # what it lacks: ours
                      for saved, current in zip(groups, self.param_groups)]
            for i, group in enumerate(groups):
                _check_hyperparameters(group, f"param group {i} of the state dict: ")
        super().load_state_dict({**state_dict, "param_groups": groups})
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for i, p in zip(ids, self._params()):
            state = self.state[p]
            for key, value in saved.get(i, {}).items():
                if key == "step":  # torch.optim.AdamW saves a tensor
                    state[key] = int(value)
                    continue
                if key == "master" and p.dtype == torch.float32:
                    del state[key]
                else:
                    state[key] = value.to(device=p.device, dtype=torch.float32)
            if p.dtype != torch.float32 and "master" not in state:
                if id(p) in kept:
                    state["master"] = kept[id(p)]
                elif "step" in state:  # stepped already: no _init_state to make it
                    state["master"] = self._fp32_copy(p)
