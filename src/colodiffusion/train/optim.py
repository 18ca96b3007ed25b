"""Optimizer, learning-rate schedule and EMA."""

from __future__ import annotations

import math

import torch


def build_optimizer(params, cfg, device: torch.device, text_encoder_params: frozenset = frozenset()) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; those whose id is in `text_encoder_params` form their own
    param group (learning rate model.text_encoder_lr)."""
    t = cfg.train
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in text_encoder_params]}]
    te = [p for p in params if id(p) in text_encoder_params]
    if te:
        groups.append({"params": te, "lr": cfg.model.text_encoder_lr or t.lr})
    kwargs = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    # Fused AdamW is one kernel per step on CUDA; on CPU the foreach path is the fast one.
    # (Not with CPU-offloaded FSDP parameters: those step on the host.)
    if device.type == "cuda" and all(p.device.type == "cuda" for p in params):
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def lr_lambda(cfg):
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_lr_scheduler(optimizer, cfg):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


class EMA:
    """Exponential moving average of named parameters, kept in fp32 beside the model.

    It averages whatever tensors the parameters are: with FSDP each rank's parameters are its
    local shards, so each rank keeps the EMA of its own shard."""

    def __init__(self, named_params, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.names, params = zip(*[(n, p) for n, p in named_params if p.requires_grad])
        self.shadow = [p.detach().clone().float() for p in params]

    def current_decay(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, params, step: int) -> None:
        weight = 1.0 - self.current_decay(step)
        params = [p for p in params if p.requires_grad]
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in params], weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. '{missing[0]}'")
        for t, n in zip(self.shadow, self.names):
            t.copy_(state[n])

    @torch.no_grad()
    def copy_to(self, named_params) -> None:
        lookup = dict(zip(self.names, self.shadow))
        for n, p in named_params:
            if n in lookup:
                p.copy_(lookup[n].to(p.dtype))
