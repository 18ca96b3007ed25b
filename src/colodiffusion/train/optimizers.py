"""Optimizers other than AdamW, and the learning-rate schedules of diffusers, from the libraries that
have them: Lion (lion-pytorch), Adafactor (transformers), Prodigy (prodigyopt);
`diffusers.optimization.get_scheduler` for linear, cosine_with_restarts, polynomial and
constant_with_warmup (train.lr_schedule). `train/optim.py` calls these for the names it does not own.
"""

from __future__ import annotations

import torch

from colodiffusion.config import ConfigError

# Schedules taken from diffusers (cosine and constant are train/optim.py's own).
DIFFUSERS_SCHEDULES = ("constant_with_warmup", "linear", "cosine_with_restarts", "polynomial")


def _need(package: str, optimizer: str):
    try:
        return __import__(package)
    except ImportError:
        raise ConfigError(f"train.optimizer={optimizer} needs the optional package '{package.replace('_', '-')}': "
                          "pip install 'colodiffusion[optim]'.") from None


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """train.optimizer (lion, adafactor, prodigy) over `params` (tensors or param-group dicts)."""
    t = cfg.train
    betas = (t.adam_beta1, t.adam_beta2)
    if t.optimizer == "lion":
        return _need("lion_pytorch", "lion").Lion(params, lr=t.lr, betas=betas, weight_decay=t.weight_decay)
    if t.optimizer == "prodigy":
        return _need("prodigyopt", "prodigy").Prodigy(params, lr=t.lr, betas=betas, weight_decay=t.weight_decay,
                                                      fsdp_in_use=cfg.parallel.strategy == "fsdp")
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # At the schedule's learning rate, as diffusers' scripts use it (not Adafactor's own relative step).
        return Adafactor(params, lr=t.lr, weight_decay=t.weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    raise ConfigError(f"train.optimizer '{t.optimizer}' is not supported.")


def diffusers_scheduler(optimizer, cfg):
    from diffusers.optimization import get_scheduler

    t = cfg.train
    return get_scheduler(t.lr_schedule, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps,
                         num_cycles=t.lr_num_cycles, power=t.lr_power)
