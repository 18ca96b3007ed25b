"""The diffusion math, kept apart from the trainer: schedule, objectives, guidance, samplers.

May import: `config` only (diffusers' schedulers are the library it builds on)."""

from colodiffusion.diffusion.guidance import drop_captions
from colodiffusion.diffusion.objectives import Objective, build_objective
from colodiffusion.diffusion.samplers import SAMPLERS, make_sampler
from colodiffusion.diffusion.schedule import alphas_cumprod, build_noise_scheduler

__all__ = ["Objective", "build_objective", "drop_captions", "SAMPLERS", "make_sampler", "alphas_cumprod",
           "build_noise_scheduler"]
