"""Samplers are diffusers schedulers, chosen by name and configured from the training schedule.

Their names also live in `config.SAMPLER_NAMES` (so parsers need not import diffusers); a test
keeps the two in step."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from colodiffusion.config import KARRAS_SAMPLERS

SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}


def make_sampler(name: str, base_config, karras: bool = False):
    """A sampler scheduler sharing `base_config`'s betas and prediction type; `karras` spaces its
    noise levels as Karras et al. (2022) do (k-samplers only: `config.KARRAS_SAMPLERS`)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")
    cls, extra = SAMPLERS[name]
    if karras and name not in KARRAS_SAMPLERS:
        raise ValueError(f"Karras sigmas need a k-sampler ({', '.join(KARRAS_SAMPLERS)}), not '{name}'")
    if name in KARRAS_SAMPLERS:  # always set: `base_config` may be a previous sampler's, Karras or not
        extra = {**extra, "use_karras_sigmas": karras}
    return cls.from_config(explicit(base_config), **extra)


def explicit(config) -> dict:
    """A scheduler config with every value it holds passed on. diffusers marks the keys a config got by
    default (`_use_default_values`) and lets the next class's defaults replace them, so a config made in
    memory and the same config saved and reloaded gave different samplers (DPM++ and Euler took
    'linspace' timestep spacing from one and SD's 'leading' from the other)."""
    return {k: v for k, v in dict(config).items() if k != "_use_default_values"}
