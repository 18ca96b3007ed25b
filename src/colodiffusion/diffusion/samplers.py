"""Samplers are diffusers schedulers, chosen by name and configured from the training schedule."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}


def make_sampler(name: str, base_config):
    """A sampler scheduler sharing `base_config`'s betas and prediction type."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")
    cls, extra = SAMPLERS[name]
    return cls.from_config(base_config, **extra)
