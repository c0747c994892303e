"""Training: hand-written data parallelism, UNet, diffusion, EMA, data, sampling."""
