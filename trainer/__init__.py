"""Training code: UNet, diffusion objective, data, hand-written DDP, EMA, the main job."""
