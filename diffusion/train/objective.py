"""The LoRA training objective (also the demo model's UNet objective):

    t ~ U{0 .. T_train - 1},  eps ~ N(0, I),  w_t = sqrt(a_t) w_0 + sqrt(1 - a_t) eps   (DDPMScheduler.add_noise)
    loss = || eps_theta(w_t, t, e)[:, :C] - eps ||^2                                    (C = latent channels)

conditioned on the same image's CLIP embedding e (an image-variation task: no labels, no text).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unet_eps(model: torch.nn.Module, w_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
             latent_channels: int) -> torch.Tensor:
    """eps_theta(w_t, t, e) through a (possibly DDP-wrapped) UNet, like :meth:`Decoder.eps` but without casting the
    inputs to the weights' dtype (autocast does that under mixed precision): (B, C, h, w) float32."""
    out = model(sample=w_t, timestep=t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": embeds}).sample
    return out[:, :latent_channels].float()


def diffusion_loss(model: torch.nn.Module, scheduler, w0: torch.Tensor, embeds: torch.Tensor,
                   generator: torch.Generator, latent_channels: int) -> torch.Tensor:
    """The epsilon MSE of one batch: w0 (B, C, h, w) float32, embeds (B, D); noise and t from ``generator``."""
    noise = torch.randn(w0.shape, generator=generator, device=generator.device, dtype=torch.float32)
    t = torch.randint(0, int(scheduler.config.num_train_timesteps), (w0.shape[0],), generator=generator,
                      device=generator.device)
    w_t = scheduler.add_noise(w0.to(noise.device), noise, t)
    eps = unet_eps(model, w_t, t, embeds.to(noise.device), latent_channels)
    return F.mse_loss(eps, noise)


def constant_with_warmup(warmup_steps: int):
    """LR factor at optimizer step s: (s + 1) / warmup during the warmup, then 1."""
    return lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0
