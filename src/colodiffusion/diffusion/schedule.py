"""SD's DDPM noise schedule (from diffusers) and the quantities the objectives need."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from colodiffusion.config import DiffusionConfig


def build_noise_scheduler(d: DiffusionConfig, prediction_type: str) -> DDPMScheduler:
    """The training schedule (`d`: diffusion.*); also written into exported pipelines so samplers use the
    same betas."""
    return DDPMScheduler(
        num_train_timesteps=d.num_train_timesteps,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        beta_schedule=d.beta_schedule,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def alphas_cumprod(scheduler: DDPMScheduler) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(torch.float32)
