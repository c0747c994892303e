"""Scheduled EMA of a model's weights, as CommonCanvas kept it (only the last few % of steps).

    ema = EMA(unet, decay=0.9999, start_step=96_500, optimizer=opt)
    for step in ...:
        loss.backward(); clip_grad_norm_(...)
        ema.step()                    # opt.step() plus the EMA update due at this step
    with ema.swapped():               # EMA weights in the model for sampling / eval / export
        sample(unet)

Before `start_step` optimizer steps there is no EMA memory at all; after that step the
shadow starts as an fp32 copy of the weights, and every `every` steps after it moves toward
them: shadow <- d * shadow + (1 - d) * weights, with d = decay ** every so the averaging
horizon (in optimizer steps) does not depend on the interval. With `warmup`, the per-step
decay is min(decay, (1 + t) / (10 + t)) at t steps after the start, so a young shadow is
not dominated by its first copy. With a cckernels.FusedAdamWEMA optimizer the update
happens inside the optimizer's own pass over memory (the shadow follows its fp32 master
weights); with any other optimizer ck.ema_update_ runs after the step.
"""
from contextlib import contextmanager

import torch

import cckernels as ck


class EMA:
    def __init__(self, model, decay=0.9999, start_step=0, every=1, warmup=False, optimizer=None):
        if not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        if not (isinstance(start_step, int) and start_step >= 0):
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if optimizer is None:
            raise ValueError("optimizer is required: EMA.step() runs optimizer.step() then the EMA update")
        self.decay, self.start_step, self.every, self.warmup = float(decay), start_step, every, bool(warmup)
        self.optimizer = optimizer
        self.fused = isinstance(optimizer, ck.FusedAdamWEMA)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if self.fused:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [n for n, p in self.named if id(p) not in in_optimizer]
            if missing:
                raise ValueError(f"parameters {missing[:3]} are not in the FusedAdamWEMA optimizer")
        self.steps = 0  # optimizer steps taken through this object
        self._shadow = None  # unfused: fp32 tensors in self.named order, once started
        if start_step == 0:
            self._start()

    @property
    def shadow(self):
        """The fp32 EMA tensors in named-parameter order, or None before the start."""
        if not self.fused:
            return self._shadow
        # Looked up each time: optimizer.load_state_dict replaces the optimizer's tensors.
        states = [self.optimizer.state[p] for _, p in self.named]
        return [s["ema"] for s in states] if all("ema" in s for s in states) else None

    @property
    def started(self):
        return self.shadow is not None

    def decay_at(self, step):
        """The decay applied after optimizer step `step`, or None when no update is due then."""
        since = step - self.start_step
        if since <= 0 or since % self.every:
            return None
        decay = min(self.decay, (1 + since) / (10 + since)) if self.warmup else self.decay
        return decay**self.every

    @torch.no_grad()
    def _start(self):
        if self.fused:
            self.optimizer.start_ema(self.decay)
        else:
            self._shadow = [torch.empty_like(p, dtype=torch.float32).copy_(p) for _, p in self.named]

    @torch.no_grad()
    def step(self):
        """optimizer.step() and the EMA update due at this step (in the same pass when fused)."""
        self.steps += 1
        decay = self.decay_at(self.steps)
        if self.fused:
            self.optimizer.step(ema=decay is not None, ema_decay=decay)
        else:
            self.optimizer.step()
            if decay is not None:
                ck.ema_update_(self.shadow, [p for _, p in self.named], decay)
        if self.steps == self.start_step:
            self._start()

    @contextmanager
    def swapped(self):
        """Within the block the model holds the EMA weights (in its dtype); restored on exit."""
        if not self.started:
            raise RuntimeError(f"no EMA yet: it starts after step {self.start_step}, now at step {self.steps}")
        params = [p for _, p in self.named]
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)

    def state_dict(self):
        """{"steps": optimizer steps so far, "shadow": {param name: fp32 EMA tensor}} (empty before start)."""
        shadow = {n: s for (n, _), s in zip(self.named, self.shadow or [])}
        return {"steps": self.steps, "shadow": shadow}

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        shadow = state_dict["shadow"]
        names = [n for n, _ in self.named]
        if shadow and set(shadow) != set(names):
            extra, missing = set(shadow) - set(names), set(names) - set(shadow)
            raise ValueError(f"EMA state_dict does not match the model: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}")
        self.steps = int(state_dict["steps"])
        if not shadow:
            self._shadow = None
            return
        if not self.started:
            self._start()
        for n, s in zip(names, self.shadow):
            s.copy_(shadow[n])
