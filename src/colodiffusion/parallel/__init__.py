"""Parallel backends behind one small interface; the training loop never branches on a name.

A backend owns: the process group and device, wrapping the model and building its optimizer,
mixed-precision backward/step (grad scaler, clipping), and the model/optimizer state for
checkpoints. `single` is one process; the distributed backends live in their own files.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from colodiffusion.config import Config


class Backend:
    name = "single"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank, self.world_size = 0, 1
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.precision = cfg.precision
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None

    # -- topology -----------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_size(self) -> int:
        return self.world_size

    def barrier(self) -> None:
        pass

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def shutdown(self) -> None:
        pass

    # -- model --------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, make_optimizer: Callable) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = model.to(self.device)
        return model, make_optimizer(model.parameters())

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> torch.Tensor:
        """Unscale, clip, step, zero grads; returns the pre-clip gradient norm (a device tensor)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    # -- checkpoint state ---------------------------------------------------------------------
    def model_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return self.unwrap(model).state_dict()

    def load_model_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.unwrap(model).load_state_dict(state)

    def optimizer_state_dict(self, model, optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, model, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def extra_state(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


BACKENDS: dict[str, type[Backend]] = {"single": Backend}


def build_backend(cfg: Config) -> Backend:
    return BACKENDS[cfg.parallel.strategy](cfg)
