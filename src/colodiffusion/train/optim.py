"""Optimizer, learning-rate schedule and EMA.

AdamW is our own (fused on CUDA, optionally 8-bit, `perf.optimizer`); Lion (lion-pytorch), Adafactor
(transformers) and Prodigy (prodigyopt) come from the libraries that have them, and the linear,
cosine_with_restarts, polynomial and constant_with_warmup schedules from
`diffusers.optimization.get_scheduler` (train.lr_schedule).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from colodiffusion.config import ConfigError, TrainConfig

# Schedules taken from diffusers (cosine and constant are this module's own, below).
DIFFUSERS_SCHEDULES = ("constant_with_warmup", "linear", "cosine_with_restarts", "polynomial")


def _need_package(package: str, optimizer: str):
    try:
        return __import__(package)
    except ImportError:
        raise ConfigError(f"train.optimizer={optimizer} needs the optional package '{package.replace('_', '-')}': "
                          "pip install 'colodiffusion[optim]'.") from None


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """train.optimizer (lion, adafactor, prodigy) over `params` (tensors or param-group dicts)."""
    train = cfg.train
    betas = (train.adam_beta1, train.adam_beta2)
    if train.optimizer == "lion":
        return _need_package("lion_pytorch", "lion").Lion(
            params, lr=train.lr, betas=betas, weight_decay=train.weight_decay
        )
    if train.optimizer == "prodigy":
        prodigy = _need_package("prodigyopt", "prodigy").Prodigy
        return prodigy(params, lr=train.lr, betas=betas, weight_decay=train.weight_decay,
                       fsdp_in_use=cfg.parallel.strategy == "fsdp")
    if train.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # At the schedule's learning rate, as diffusers' scripts use it (not Adafactor's own relative step).
        return Adafactor(
            params,
            lr=train.lr,
            weight_decay=train.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    raise ConfigError(f"train.optimizer '{train.optimizer}' is not supported.")


def diffusers_scheduler(optimizer, train: TrainConfig):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        train.lr_schedule,
        optimizer,
        num_warmup_steps=train.warmup_steps,
        num_training_steps=train.max_steps,
        num_cycles=train.lr_num_cycles,
        power=train.lr_power,
    )


def build_optimizer(params, cfg, device: torch.device, text_encoder_params: frozenset = frozenset(),
                    adamw: Optional[Callable] = None) -> torch.optim.Optimizer:
    """AdamW (or 8-bit AdamW, `perf.optimizer`) over the trainable parameters; those whose id is in
    `text_encoder_params` form their own param group (learning rate model.text_encoder_lr). Runs over
    fp32 master copies when the parameters are not fp32 (`perf.param_dtype`) or when the optimizer
    lives on the CPU (`perf.optimizer_offload`). `adamw`: an AdamW class a backend requires instead of
    torch's (Colossal-AI's gemini takes only its HybridAdam), built with the same settings."""
    params = [p for p in params if p.requires_grad]
    if adamw is not None:
        train = cfg.train
        return adamw(
            param_groups(params, cfg, text_encoder_params),
            lr=train.lr,
            betas=(train.adam_beta1, train.adam_beta2),
            weight_decay=train.weight_decay,
        )
    perf = getattr(cfg, "perf", None)
    low_precision = any(p.dtype != torch.float32 for p in params)
    if perf is None or not (low_precision or perf.optimizer_offload):
        return make_adamw(param_groups(params, cfg, text_encoder_params), cfg, device)
    from colodiffusion.train.master_weights import MasterWeightOptimizer

    master_device = torch.device("cpu") if perf.optimizer_offload else device
    # Offloaded: the step runs on the host, where torch's fused AdamW is one multi-threaded pass over
    # the states (4.6x faster than foreach on 20M parameters, bench/NOTES.md) and takes the guard's
    # found_inf flag without a host read.
    fused = True if perf.optimizer_offload else None
    return MasterWeightOptimizer(
        params, lambda masters: make_adamw(masters, cfg, master_device, fused=fused), master_device)


def param_groups(params: list, cfg, text_encoder_params: frozenset) -> list[dict]:
    groups = [{"params": [p for p in params if id(p) not in text_encoder_params]}]
    te = [p for p in params if id(p) in text_encoder_params]
    if te:
        groups.append({"params": te, "lr": cfg.model.text_encoder_lr or cfg.train.lr})
    return groups


def make_adamw(params, cfg, device: torch.device, fused: bool | None = None) -> torch.optim.Optimizer:
    """`params`: tensors or param-group dicts. `fused` None: fused where the parameters are plain tensors
    on the CUDA device or the CPU, the foreach path for sharded ones (e.g. FSDP2's on the host)."""
    train = cfg.train
    flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else list(params)
    if train.optimizer != "adamw":  # lion, adafactor, prodigy (make_optimizer above)
        return make_optimizer(params, cfg)
    kwargs = dict(lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), weight_decay=train.weight_decay)
    if getattr(cfg, "perf", None) is not None and cfg.perf.optimizer == "adamw8bit":
        return make_adamw8bit(params, device, kwargs)
    if fused is None:
        # Fused: one kernel per step on CUDA; on a CPU one multi-threaded pass, 3.3x faster than foreach
        # over the 339 tensors of the 4.2M tiny UNet of 2026-12-04 (14.8 -> 4.5 ms a step, 2 cores,
        # bench/NOTES.md). Not for sharded (DTensor) parameters on the host, which keep the foreach path.
        fused = (device.type in ("cuda", "cpu") and all(p.device.type == device.type for p in flat)
                 and not any(hasattr(p, "to_local") for p in flat))
    if fused:
        kwargs["fused"] = True
    optimizer = torch.optim.AdamW(params, **kwargs)
    kernel = {"fused": optimizer.defaults["fused"], "foreach": optimizer.defaults["foreach"]}

    def keep_kernel(opt: torch.optim.Optimizer) -> None:
        # A checkpoint's param groups carry the kernel of the run that saved it (foreach from an FSDP run
        # on the host): this run keeps its own, which its parameters, the guard and a GradScaler rely on.
        for group in opt.param_groups:
            group.update(kernel)

    optimizer.register_load_state_dict_post_hook(keep_kernel)
    return optimizer


def make_adamw8bit(params, device: torch.device, kwargs: dict) -> torch.optim.Optimizer:
    """AdamW with block-wise 8-bit moment states: bitsandbytes on CUDA, else torchao."""
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kwargs)
        except ImportError:
            pass
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        raise ConfigError(
            "perf.optimizer=adamw8bit needs bitsandbytes (CUDA) or torchao: pip install bitsandbytes or torchao."
        ) from None
    return AdamW8bit(params, **kwargs)


def lr_lambda(train: TrainConfig):
    def f(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.lr_schedule == "constant":
            return 1.0
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_lr_scheduler(optimizer, train: TrainConfig):
    if train.lr_schedule in DIFFUSERS_SCHEDULES:
        return diffusers_scheduler(optimizer, train)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))


class EMA:
    """Exponential moving average of named parameters, kept in fp32.

    It follows the fp32 master weights when the optimizer keeps them (`optimizer.master_of()`,
    train/master_weights.py), so it averages the full-precision values rather than their bf16
    roundings, and lives beside them (on the CPU when they are offloaded). The update is one
    in-place `torch._foreach_lerp_` over fp32 tensors: no temporary copy of the weights.
    It averages whatever tensors the parameters are: with FSDP each rank's parameters are its
    local shards, so each rank keeps the EMA of its own shard."""

    def __init__(self, named_params, decay: float, warmup: bool = True, optimizer=None):
        self.decay, self.warmup = decay, warmup
        self.names, params = zip(*[(n, p) for n, p in named_params if p.requires_grad])
        self._masters = optimizer.master_of() if hasattr(optimizer, "master_of") else {}
        self._cached: tuple = ((), [])
        self.shadow = [s.detach().clone().float() for s in self.sources(params)]

    def sources(self, params) -> list[torch.Tensor]:
        """The tensors averaged for `params`: each one's fp32 master if there is one, else itself."""
        ids = tuple(id(p) for p in params)
        if self._cached[0] != ids:  # the parameter list is the same every step: map it once
            self._cached = (ids, [self._masters.get(id(p), p) for p in params])
        return self._cached[1]

    def current_decay(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, params, step: int) -> None:
        weight = 1.0 - self.current_decay(step)
        sources = [s.detach() for s in self.sources([p for p in params if p.requires_grad])]
        if all(s.dtype == t.dtype and s.device == t.device for s, t in zip(sources, self.shadow)):
            torch._foreach_lerp_(self.shadow, sources, weight)
            return
        for t, s in zip(self.shadow, sources):  # low-precision weights without masters: one tensor at a time
            t.lerp_(s.to(t.device, t.dtype), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. '{missing[0]}'")
        for t, n in zip(self.shadow, self.names):
            t.copy_(state[n])
