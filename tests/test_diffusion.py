import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from tiny_models import StandInUNet
from trainer.diffusion import (
    NoiseSchedule,
    ddim_sample,
    ddim_timesteps,
    diffusion_loss,
    drop_captions,
    training_loss,
)

SD2 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_schedule_matches_diffusers():
    ours = NoiseSchedule().alphas_cumprod
    theirs = DDPMScheduler(**SD2).alphas_cumprod
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    # SD2's endpoints: a_0 = 1 - 0.00085, a_999 ~ 0.0047 (the noisiest step still keeps signal).
    assert abs(ours[0].item() - (1 - 0.00085)) < 1e-7
    assert abs(ours[-1].item() - theirs[-1].item()) < 1e-7 and 0.004 < ours[-1].item() < 0.005


def test_schedule_errors():
    assert NoiseSchedule(num_train_timesteps=500).alphas_cumprod.shape == (500,)
    with pytest.raises(ValueError, match="beta_start"):
        NoiseSchedule(beta_start=0.02, beta_end=0.01)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        NoiseSchedule(num_train_timesteps=1)


def test_add_noise_and_targets_match_diffusers():
    ref = DDPMScheduler(**SD2)
    s = NoiseSchedule()
    x0, noise = torch.randn(5, 4, 3, 5), torch.randn(5, 4, 3, 5)
    t = torch.tensor([0, 1, 500, 998, 999])
    torch.testing.assert_close(s.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.target(x0, noise, t, "epsilon"), noise)
    v = s.target(x0, noise, t, "v_prediction")
    torch.testing.assert_close(v, ref.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-6)
    # v determines x0 from x_t: x0 = sqrt(a) x_t - sqrt(1 - a) v.
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * s.add_noise(x0, noise, t) - (1 - a).sqrt() * v, x0, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        s.target(x0, noise, t, "sample")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_turn_the_loss_into_min_snr_times_x0_error(prediction_type):
    # Min-SNR-gamma defines the loss as min(SNR, gamma) * |x0_hat - x0|^2; the weights must give
    # exactly that when the MSE is taken in the model's own output space.
    s, gamma = NoiseSchedule(), 5.0
    t = torch.tensor([0, 10, 100, 300, 600, 999])
    x0, noise, pred = (torch.randn(6, 4, 2, 2, dtype=torch.float64) for _ in range(3))
    a = s.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if prediction_type == "epsilon":
        x0_hat = (x_t - (1 - a).sqrt() * pred) / a.sqrt()
    else:
        x0_hat = a.sqrt() * x_t - (1 - a).sqrt() * pred
    snr = (a / (1 - a)).flatten()
    expected = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) * (x0_hat - x0).square().flatten(1).mean(1)
    w = s.loss_weights(t, prediction_type, min_snr_gamma=gamma).double()
    target = s.target(x0, noise, t, prediction_type).double()
    got = w * (pred - target).square().flatten(1).mean(1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)
    assert torch.equal(s.loss_weights(t, prediction_type), torch.ones(6))
    with pytest.raises(ValueError, match="min_snr_gamma"):
        s.loss_weights(t, prediction_type, min_snr_gamma=0)


def test_diffusion_loss_is_mse_and_weighted_per_sample():
    pred, target = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(diffusion_loss(pred, target), torch.nn.functional.mse_loss(pred, target))
    w = torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(diffusion_loss(pred, target, w), torch.nn.functional.mse_loss(pred[1], target[1]) / 3)


def test_training_loss_is_reproducible_and_trains():
    model, s = StandInUNet(), NoiseSchedule()
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    loss1 = training_loss(model, s, latents, context, generator=torch.Generator().manual_seed(3))
    loss2 = training_loss(model, s, latents, context, generator=torch.Generator().manual_seed(3))
    assert torch.equal(loss1, loss2) and loss1.ndim == 0
    loss = training_loss(model, s, latents, context, prediction_type="v_prediction", min_snr_gamma=5.0)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_caption_dropout_rate_determinism_and_values():
    context, empty = torch.randn(20000, 2, 3), torch.randn(1, 2, 3)
    out = drop_captions(context, empty, p=0.1, generator=torch.Generator().manual_seed(0))
    dropped = (out == empty).all(dim=(1, 2))
    kept = (out == context).all(dim=(1, 2))
    assert torch.all(dropped ^ kept)  # every row is exactly the caption or exactly the empty one
    # Binomial(20000, 0.1): std 42, so +-200 is a 4.7-sigma band.
    assert abs(dropped.sum().item() - 2000) < 200
    again = drop_captions(context, empty, p=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    other = drop_captions(context, empty, p=0.1, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(out, other)
    assert torch.equal(drop_captions(context, empty, p=0.0), context)
    assert torch.equal(drop_captions(context, empty, p=1.0), empty.expand_as(context))
    with pytest.raises(ValueError, match="probability"):
        drop_captions(context, empty, p=1.5)
    with pytest.raises(ValueError, match="empty embedding"):
        drop_captions(context, torch.randn(1, 2, 4))


def _sd2_ddim(prediction_type):
    # SD2's scheduler settings (scheduler_config.json of the SD2 repositories).
    return DDIMScheduler(**SD2, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="leading", prediction_type=prediction_type)


@pytest.mark.parametrize("steps", [1, 7, 50, 500])
def test_ddim_timesteps_match_diffusers(steps):
    ref = _sd2_ddim("epsilon")
    ref.set_timesteps(steps)
    assert ddim_timesteps(steps) == ref.timesteps.tolist()
    with pytest.raises(ValueError, match="sampling steps"):
        ddim_timesteps(0)


def test_ddim_refuses_more_steps_than_half_the_schedule():
    # 1000 steps visited t=1000 (an IndexError in sampling); 501-999 started at t=steps, not at noise.
    assert ddim_timesteps(500)[0] == 999
    seen = []
    model = lambda x, t, context: seen.append(t[0].item()) or torch.zeros_like(x)  # noqa: E731
    x = ddim_sample(model, NoiseSchedule(), torch.zeros(1, 77, 8), torch.zeros(1, 77, 8), latent_shape=(4, 2, 2),
                    steps=500, guidance=1.0, generator=torch.Generator().manual_seed(0))
    assert seen == ddim_timesteps(500) and torch.isfinite(x).all()
    for steps in (501, 600, 1000):
        with pytest.raises(ValueError, match=rf"\[1, 500\], got {steps}: .* start at t={steps}, not at pure noise"):
            ddim_timesteps(steps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance", [0.0, 0.5, 1.0, 4.0])
def test_ddim_matches_diffusers_step_by_step(prediction_type, guidance):
    model, s = StandInUNet(), NoiseSchedule()
    context, uncond = torch.randn(2, 77, 32), torch.randn(1, 77, 32)
    ours = ddim_sample(model, s, context, uncond, latent_shape=(4, 8, 8), steps=4, guidance=guidance,
                       prediction_type=prediction_type, generator=torch.Generator().manual_seed(0))

    ref = _sd2_ddim(prediction_type)
    ref.set_timesteps(4)
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in ref.timesteps:
            cond = model(x, t.expand(2), context)
            out = cond
            if guidance > 1.0:  # diffusers' pipelines: guidance <= 1 is no guidance
                un = model(x, t.expand(2), uncond.expand_as(context))
                out = un + guidance * (cond - un)
            x = ref.step(out, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_ddim_is_deterministic_for_a_seed():
    model, s = StandInUNet(), NoiseSchedule()
    context, uncond = torch.randn(2, 77, 32), torch.randn(1, 77, 32)

    def run(seed):
        return ddim_sample(model, s, context, uncond, latent_shape=(4, 8, 8), steps=3,
                           generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 4, 8, 8) and a.dtype == torch.float32 and torch.isfinite(a).all()
    for guidance in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance scale must be a finite number >= 0"):
            ddim_sample(model, s, context, uncond, latent_shape=(4, 8, 8), steps=3, guidance=guidance)
