"""Scheduled EMA of a model's weights, as CommonCanvas kept it (only the last few % of steps).

    ema = ScheduledEMA(unet, decay=0.9999, start_step=96_500, optimizer=opt)
    for step in range(steps):
        loss.backward(); clip_grad_norm_(...)
        opt.step()
        ema.step()                    # after each optimizer step taken
    with ema.swapped_in():            # EMA weights in the model for sampling / eval / export
        sample(unet)

The schedule counts optimizer steps taken (a step skipped for non-finite gradients does not
count, and the count is part of state_dict). Before `start_step` of them there is no EMA
memory at all; once that many steps are done the shadow starts as an fp32 copy of the
weights, and every `every` steps after that it moves toward them:
shadow <- d * shadow + (1 - d) * weights, with d = decay ** every, so the averaging horizon
(in optimizer steps) does not depend on the interval. With `warmup`, the per-step decay is
min(decay, (1 + t) / (10 + t)) t steps after the start, so a young shadow is not dominated
by its first copy.

With a cckernels.FusedAdamWEMA optimizer the update happens inside the optimizer's own pass
over memory: a step pre-hook tells each opt.step() whether and with which decay to update
(the shadow then follows the optimizer's fp32 master weights). With any other optimizer,
ema.step() runs ck.ema_update_ after the optimizer step.
"""
from contextlib import contextmanager

import torch

import cckernels as ck


class ScheduledEMA:
    def __init__(self, model, decay=0.9999, start_step=0, every=1, warmup=False, optimizer=None):
        if not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        if not (isinstance(start_step, int) and start_step >= 0):
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.decay, self.start_step, self.every, self.warmup = float(decay), start_step, every, bool(warmup)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = optimizer if isinstance(optimizer, ck.FusedAdamWEMA) else None
        if self.optimizer is not None:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [n for n, p in self.named if id(p) not in in_optimizer]
            if missing:
                raise ValueError(f"parameters {missing[:3]} are not in the FusedAdamWEMA optimizer")
            optimizer.register_step_pre_hook(self._before_optimizer_step)
        self.steps = 0  # optimizer steps done
        self._shadow = None  # unfused: fp32 tensors in self.named order, once started
        if start_step == 0:
            self._start()

    @property
    def shadow(self):
        """The fp32 EMA tensors in named-parameter order, or None before the start."""
        if self.optimizer is None:
            return self._shadow
        # Looked up each time: optimizer.load_state_dict replaces the optimizer's tensors.
        states = [self.optimizer.state[p] for _, p in self.named]
        return [s["ema"] for s in states] if all("ema" in s for s in states) else None

    @property
    def started(self):
        return self.shadow is not None

    def decay_at(self, step):
        """The decay applied by optimizer step number `step` (1-based), or None for no update."""
        since = step - self.start_step
        if since <= 0 or since % self.every:
            return None
        decay = min(self.decay, (1 + since) / (10 + since)) if self.warmup else self.decay
        return decay**self.every

    @torch.no_grad()
    def _start(self):
        if self.optimizer is not None:
            self.optimizer.start_ema(self.decay)
        else:
            self._shadow = [torch.empty_like(p, dtype=torch.float32).copy_(p) for _, p in self.named]

    def _before_optimizer_step(self, optimizer, args, kwargs):
        """FusedAdamWEMA pre-hook: whether (and with which decay) this step updates the EMA."""
        decay = self.decay_at(self.steps + 1) if self.started else None
        return args, {**kwargs, "ema": decay is not None, "ema_decay": decay}

    @torch.no_grad()
    def step(self):
        """Call after each optimizer step taken (the fused pre-hook assumes the same count)."""
        self.steps += 1
        if self.optimizer is None and self.started:
            decay = self.decay_at(self.steps)
            if decay is not None:
                ck.ema_update_(self._shadow, [p for _, p in self.named], decay)
        if not self.started and self.steps >= self.start_step:
            self._start()

    @contextmanager
    def swapped_in(self):
        """Within the block the model holds the EMA weights (in its dtype), restored on exit.

        Before the EMA starts there is nothing to swap: the model keeps its own weights.
        Yields whether the EMA weights are in.
        """
        if not self.started:
            yield False
            return
        params = [p for _, p in self.named]
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, self.shadow)
        try:
            yield True
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)

    def state_tensors(self):
        """{param name: fp32 EMA tensor} (what ema.safetensors holds), or None before the start."""
        shadow = self.shadow
        return None if shadow is None else {n: s for (n, _), s in zip(self.named, shadow)}

    def state_dict(self):
        return {"steps": self.steps}

    @torch.no_grad()
    def load_state_dict(self, state_dict, tensors=None):
        """Restore from state_dict() and state_tensors() (None: no EMA had started)."""
        self.steps = int(state_dict["steps"])
        if tensors is None:
            if self.optimizer is None:
                self._shadow = None
            return
        names = [n for n, _ in self.named]
        if set(tensors) != set(names):
            missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
            raise ValueError(f"EMA tensors do not match the model: missing {missing[:3]}, extra {extra[:3]}")
        if not self.started:
            self._start()
        for n, s in zip(names, self.shadow):
            s.copy_(tensors[n])
