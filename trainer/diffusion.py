"""The diffusion objective and sampler, with Stable Diffusion 2's conventions.

Forward process (DDPM): x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * eps, where a_t is the cumulative
product of (1 - beta) ("alphas_cumprod") and eps ~ N(0, I). The model sees x_t and t and predicts
either eps ("epsilon", SD2-base) or v = sqrt(a_t) * eps - sqrt(1 - a_t) * x_0 ("v_prediction",
SD2-768). Sampling is DDIM with eta = 0 (deterministic given the initial noise) and
classifier-free guidance.

    schedule = NoiseSchedule().to(device)
    context = drop_captions(text_emb, empty_emb, p=0.1, generator=g)
    loss = training_loss(model, schedule, latents, context, generator=g)
    latents = ddim_sample(model, schedule, context, empty_emb, latent_shape=(4, 32, 32))
"""

import math

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _check_prediction_type(prediction_type):
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


class NoiseSchedule:
    """The DDPM noise schedule: per-timestep tables used by training and sampling.

    Stable Diffusion's "scaled_linear" schedule: beta is linear in sqrt(beta) from beta_start to
    beta_end over num_train_timesteps steps. The tables are computed in float64 and stored in
    float32; `.to(device)` moves them next to the timesteps that index them.
    """

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
        if not (isinstance(num_train_timesteps, int) and num_train_timesteps >= 2):
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
        self.num_train_timesteps, self.beta_start, self.beta_end = num_train_timesteps, beta_start, beta_end
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod = alphas_cumprod.float()
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt().float()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt().float()

    def to(self, device):
        for name in ("alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def _at(self, table, t, x):
        # table[t] as a (B, 1, 1, ...) column that broadcasts against x of shape (B, ...).
        return table[t].view(-1, *([1] * (x.ndim - 1)))

    def add_noise(self, x0, noise, t):
        """x_t for clean samples x0 (B, ...), noise like x0, integer timesteps t (B,). fp32 out."""
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0.float() + self._at(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * noise.float()

    def target(self, x0, noise, t, prediction_type):
        """What the model must output at x_t: the noise itself, or v (Salimans & Ho 2022), which
        keeps a unit-scale target at every noise level, where eps is hard to read off at high SNR."""
        _check_prediction_type(prediction_type)
        if prediction_type == "epsilon":
            return noise.float()
        return self._at(self.sqrt_alphas_cumprod, t, x0) * noise.float() - self._at(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * x0.float()

    def snr(self, t):
        """Signal-to-noise ratio a_t / (1 - a_t) at timesteps t."""
        a = self.alphas_cumprod[t]
        return a / (1.0 - a)

    def loss_weights(self, t, prediction_type, min_snr_gamma=None):
        """Per-sample weights of the MSE: ones, or min-SNR-gamma (Hang et al. 2023).

        Min-SNR weights the x0-space error by min(SNR, gamma), which stops easy low-noise steps
        from dominating. The eps-space MSE equals SNR times the x0-space MSE, so eps prediction
        gets min(SNR, gamma) / SNR; the v-space MSE equals (SNR + 1) times it, so v prediction
        gets min(SNR, gamma) / (SNR + 1).
        """
        _check_prediction_type(prediction_type)
        if min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 (or None to disable), got {min_snr_gamma!r}")
        snr = self.snr(t)
        clipped = snr.clamp(max=min_snr_gamma)
        return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1.0)


def diffusion_loss(pred, target, weights=None):
    """Mean squared error in fp32: the mean over each sample, weighted, then the batch mean."""
    per_sample = (pred.float() - target.float()).square().flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def training_loss(model, schedule, latents, context, *, prediction_type="epsilon", min_snr_gamma=None,
                  generator=None):
    """One diffusion training loss: draw t ~ U{0..T-1} and eps ~ N(0, I) per sample, noise the
    latents, ask model(x_t, t, context) for its prediction and return the (weighted) MSE.

    generator: a torch.Generator on latents' device (None: torch's global RNG).
    """
    b = latents.shape[0]
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator, device=latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
    pred = model(schedule.add_noise(latents, noise, t), t, context)
    target = schedule.target(latents, noise, t, prediction_type)
    return diffusion_loss(pred, target, schedule.loss_weights(t, prediction_type, min_snr_gamma))


def drop_captions(context, empty, p=0.1, generator=None):
    """Classifier-free guidance training: each sample's text embedding (B, L, D) is replaced by
    the empty caption's embedding (1, L, D) with probability p, so one model learns both the
    conditional and the unconditional prediction.

    generator: a torch.Generator on context's device (None: torch's global RNG).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1], got {p!r}")
    if empty.shape[1:] != context.shape[1:] or empty.shape[0] != 1:
        raise ValueError(f"empty embedding must have shape (1, {tuple(context.shape[1:])}), got {tuple(empty.shape)}")
    drop = torch.rand(context.shape[0], generator=generator, device=context.device) < p
    return torch.where(drop.view(-1, 1, 1), empty.to(context.dtype), context)


def ddim_timesteps(num_steps, num_train_timesteps=1000):
    """The timesteps DDIM visits, high noise first, with SD2's scheduler settings ("leading"
    spacing, steps_offset 1): 981, 961, ..., 1 for 50 steps of 1000. At most
    num_train_timesteps // 2 steps (500 of 1000, from 999)."""
    most = num_train_timesteps // 2
    if not (isinstance(num_steps, int) and 1 <= num_steps <= most):
        why = ""
        if isinstance(num_steps, int) and num_steps > most:  # the spacing 1000 // steps is then 1
            why = (f": with SD2's leading spacing more steps take every timestep and start at t={num_steps}, "
                   f"not at pure noise (t={num_train_timesteps - 1})")
        raise ValueError(f"number of sampling steps must be an int in [1, {most}], got {num_steps!r}{why}")
    ratio = num_train_timesteps // num_steps
    return [i * ratio + 1 for i in reversed(range(num_steps))]


@torch.no_grad()
def ddim_sample(model, schedule, context, uncond_context, *, latent_shape, steps=50, guidance=7.5,
                prediction_type="epsilon", generator=None):
    """Deterministic DDIM (eta = 0) with classifier-free guidance; returns latents (B, *latent_shape).

    model(x, t, ctx) -> prediction; context: (B, L, D) text embeddings; uncond_context: (1, L, D),
    the empty caption's. guidance: above 1 the prediction is uncond + guidance * (cond - uncond);
    at or below 1 the conditional prediction alone (one model call per step), as diffusers'
    pipelines take it, so an exported pipeline samples as this does. generator: a CPU torch.Generator for the
    initial noise (drawn on CPU so a seed gives the same images on any device).
    """
    _check_prediction_type(prediction_type)
    if not 0 <= guidance < math.inf:  # NaN fails too: it made black images
        raise ValueError(f"guidance scale must be a finite number >= 0, got {guidance!r}")
    b, device = context.shape[0], context.device
    alphas = schedule.alphas_cumprod.to(device)
    timesteps = ddim_timesteps(steps, schedule.num_train_timesteps)
    ratio = schedule.num_train_timesteps // steps

    x = torch.randn((b, *latent_shape), generator=generator, dtype=torch.float32).to(device)
    guided = guidance > 1.0
    if guided:
        # One batched call per step: the unconditional half first, then the conditional half.
        context = torch.cat([uncond_context.to(context.dtype).expand_as(context), context])
    for t in timesteps:
        x_in = torch.cat([x, x]) if guided else x
        out = model(x_in, torch.full((x_in.shape[0],), t, device=device), context).float()
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        a_t = alphas[t]
        # SD2 keeps set_alpha_to_one=False: the last step lands on a_0, not on a clean a = 1.
        a_prev = alphas[t - ratio] if t - ratio >= 0 else alphas[0]
        if prediction_type == "epsilon":
            eps = out
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        else:
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
        # eta = 0: move to the previous noise level along the predicted (x0, eps) pair, no new noise.
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x
