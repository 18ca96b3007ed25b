"""The backend interface, and `single` (one process) as its plain implementation.

A backend owns: the device (and, for the distributed ones, the process group), wrapping the model
and building its optimizer, mixed-precision backward/step (grad scaler, clipping), and the
model/optimizer state for checkpoints, saved through `storage/`. The distributed backends subclass
it in their own files (`distributed.py` and the files beside it).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable, Optional

import torch

from colodiffusion.config import Config
from colodiffusion.storage import checkpoint


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

    def shutdown(self, clean: bool = True) -> None:
        """Release the process group; `clean=False` after a failure (no rank waits for the others)."""

    def explain_failure(self, exc: BaseException) -> Optional[Exception]:
        """A clearer error for `exc` if it is this backend's (a collective that timed out names the rank
        that stopped answering), else None."""
        return None

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
        norm = self.clip_grads(model, grad_clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def clip_grads(self, model: torch.nn.Module, grad_clip: float) -> torch.Tensor:
        """Clip the global gradient norm to `grad_clip` (0: no clipping); return the pre-clip norm."""
        params = [p for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))

    # -- checkpoints ----------------------------------------------------------------------------
    # `save` is called on every rank with the same temporary folder; `shared` is identical on all
    # ranks (written once), `per_rank` differs (RNG streams) and is written by each rank.
    def save(self, folder: Path, model, optimizer, ema: Optional[dict], shared: dict, per_rank: dict) -> None:
        if self.is_main:
            checkpoint.save_tensors(folder / "unet.safetensors", self.unwrap(model).state_dict())
            if ema is not None:
                checkpoint.save_tensors(folder / "ema.safetensors", ema)
            torch.save({**shared, "optimizer": optimizer.state_dict(), "backend": self.extra_state()},
                       folder / "state.pt")
        torch.save(per_rank, folder / f"rank_{self.rank}.pt")

    def load(self, folder: Path, model, optimizer, ema: Optional[dict]) -> tuple[dict, dict]:
        """Restore model, optimizer and EMA (in place); return (shared, per_rank) state."""
        from colodiffusion.parallel.sharded_checkpoint import is_sharded, load_sharded

        if is_sharded(folder):  # written by ddp/fsdp: DCP reshards it into this one process
            load_sharded(folder, self.unwrap(model), optimizer, ema)
            shared = checkpoint.load_state(folder / "state.pt")
            self.load_extra_state(shared.pop("backend", {}))
            rank_file = folder / f"rank_{self.rank}.pt"
            return shared, (checkpoint.load_state(rank_file) if rank_file.exists() else {})
        self.unwrap(model).load_state_dict(checkpoint.load_tensors(folder / "unet.safetensors"))
        if ema is not None:
            ema_file = folder / "ema.safetensors"
            src = checkpoint.load_tensors(ema_file if ema_file.exists() else folder / "unet.safetensors")
            for k, v in ema.items():
                v.copy_(src[k])
        shared = checkpoint.load_state(folder / "state.pt")
        optimizer.load_state_dict(shared.pop("optimizer"))
        self.load_extra_state(shared.pop("backend", {}))
        rank_file = folder / f"rank_{self.rank}.pt"
        per_rank = checkpoint.load_state(rank_file) if rank_file.exists() else {}
        return shared, per_rank

    def full_state_dict(self, model, optimizer=None) -> dict[str, torch.Tensor]:
        """Full (unsharded) UNet weights for export, in fp32 (from the optimizer's master copies when it
        keeps them); meaningful on the main rank."""
        return plain_copy(self.unwrap(model), optimizer).state_dict()

    def full_ema_state_dict(self, ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full (unsharded) EMA tensors for export; every rank calls it, meaningful on the main rank."""
        return ema

    def plain_model(self, model) -> torch.nn.Module:
        """A plain (unwrapped, unsharded, uncompiled, fp32) module of the same architecture, for
        inference and export."""
        return plain_copy(self.unwrap(model))

    def extra_state(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def plain_copy(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> torch.nn.Module:
    """An eager fp32 copy of the UNet for sampling and export: no compiled wrappers (they would
    still call the original module), weights from the optimizer's fp32 masters when it keeps them."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules()
                if getattr(m, "_compiled_call_impl", None) is not None]
    for m, _ in compiled:
        m._compiled_call_impl = None
    try:
        out = copy.deepcopy(model)
    finally:
        for m, impl in compiled:
            m._compiled_call_impl = impl
    out.float().to(memory_format=torch.contiguous_format)
    master_of = getattr(optimizer, "master_of", None)  # train/master_weights.py's optimizer
    if master_of is not None:
        masters = master_of()
        with torch.no_grad():
            for src, dst in zip(model.parameters(), out.parameters()):
                if id(src) in masters:
                    dst.copy_(masters[id(src)])
    return out
