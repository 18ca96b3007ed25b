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
from colodiffusion.parallel.parallelize import parallelize
from colodiffusion.storage import checkpoint, consolidated


class Backend:
    """What the trainer calls: the topology (device, rank, is_main, dp_rank, dp_size, barrier,
    all_reduce_mean, shutdown, explain_failure), the model (prepare, unwrap, autocast, backward, step),
    checkpoints (save, load) and export (full_state_dict, full_ema_state_dict, plain_model). Methods with
    a leading underscore are the hooks a strategy overrides (`_layout`, `_wrap`, `_clip_grads`) and the
    shared pieces of `load`."""
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
    def prepare(
        self, model: torch.nn.Module, make_optimizer: Callable
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """`model` on the device, parallelized (parallel/parallelize.py: tensor parallel, activation
        checkpointing, compile, FSDP, as `_layout` says), then wrapped for the strategy with its optimizer."""
        model = parallelize(model.to(self.device), self.cfg.perf, self.cfg.model.gradient_checkpointing,
                            **self._layout())
        return self._wrap(model, make_optimizer)

    def _layout(self) -> dict:
        """`parallelize`'s tensor-parallel mesh and FSDP plan: none on one process."""
        return {}

    def _wrap(self, model: torch.nn.Module, make_optimizer: Callable) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
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
        norm = self._clip_grads(model, grad_clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _clip_grads(self, model: torch.nn.Module, grad_clip: float) -> torch.Tensor:
        """Clip the global gradient norm to `grad_clip` (0: no clipping); return the pre-clip norm."""
        params = [p for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))

    # -- checkpoints ----------------------------------------------------------------------------
    # One frame for every strategy. `save` runs on every rank with the same temporary folder: the
    # strategy writes its weights, optimizer and EMA in its own format (`_save_weights`), the main rank
    # writes `state.pt` (the loop's `shared` state, who saved it, the backend's own state: the fp16
    # scaler) and each rank `rank_<r>.pt` (its random streams). `load` reads the frame back, after the
    # strategy has checked it can read what wrote the checkpoint (`reads`, `_check_saved_by`).
    reads = ("single", "dcp")  # checkpoint kinds (storage/consolidated.py) this strategy resumes from

    def save(self, folder: Path, model, optimizer, ema: Optional[dict], shared: dict, per_rank: dict):
        """Returns the strategy's pending background write (a Future) or None."""
        pending, state = self._save_weights(folder, model, optimizer, ema)
        if self.is_main:
            torch.save({**shared, **state, "backend": self._extra_state(), "saved_by": self._saved_by()},
                       folder / "state.pt")
        torch.save(per_rank, folder / f"rank_{self.rank}.pt")
        return pending

    def load(self, folder: Path, model, optimizer, ema: Optional[dict]) -> tuple[dict, dict]:
        """Restore model, optimizer and EMA (in place); return (shared, per_rank) state."""
        kind = consolidated.kind(folder)
        shared = checkpoint.load_state(folder / "state.pt")
        shared.pop("format", None)  # checkpoints of earlier versions named their kind here too
        saved_by = shared.pop("saved_by", {})
        if kind not in self.reads:
            raise ValueError(f"it was written by parallel.strategy={saved_by.get('strategy', kind)}; resume it with "
                             f"that strategy, or export it and start {self.name} from the export via model.pretrained")
        self._check_saved_by(saved_by)
        has_ema = self._load_weights(folder, kind, shared, model, optimizer, ema)
        if ema is not None and not has_ema and self.is_main:
            print(f"warning: {folder} holds no EMA weights (saved with train.ema.enabled=false), so the EMA starts "
                  "from the resumed weights")
        self._load_extra_state(shared.pop("backend", {}))
        return shared, self._load_rank_state(folder)

    def _saved_by(self) -> dict:
        return {"strategy": self.name, "world_size": self.world_size}

    def _check_saved_by(self, saved_by: dict) -> None:
        """Raise ValueError when this run cannot resume a checkpoint of a readable kind (engines that
        need the same world size or plugin say so here)."""

    def _save_weights(self, folder: Path, model, optimizer, ema: Optional[dict]) -> tuple[object, dict]:
        """Write model, optimizer and EMA (every rank); return (a pending write or None, what the main
        rank adds to state.pt). One process: safetensors, the optimizer in state.pt."""
        if self.is_main:
            checkpoint.save_tensors(folder / "unet.safetensors", self.unwrap(model).state_dict())
            if ema is not None:
                checkpoint.save_tensors(folder / "ema.safetensors", ema)
        return None, {"optimizer": optimizer.state_dict()}

    def _load_weights(self, folder: Path, kind: str, shared: dict, model, optimizer, ema: Optional[dict]) -> bool:
        """Restore model, optimizer and EMA in place (a checkpoint without EMA seeds it from the
        weights); False when it held no EMA. Reads ddp/fsdp/tp checkpoints too (DCP reshards them)."""
        from colodiffusion.parallel.sharded_checkpoint import load_sharded

        if kind == "dcp":
            return load_sharded(folder, self.unwrap(model), optimizer, ema)
        self.unwrap(model).load_state_dict(checkpoint.load_tensors(folder / "unet.safetensors"))
        optimizer.load_state_dict(shared.pop("optimizer"))
        return self._restore_ema(folder / "ema.safetensors", model, ema)

    def _load_rank_state(self, folder: Path) -> dict:
        """This rank's random streams; {} (with one warning) for a rank the saving run did not have."""
        own = folder / f"rank_{self.rank}.pt"
        saved = len(list(folder.glob("rank_*.pt")))
        if own.exists():
            state = checkpoint.load_state(own)
        elif saved == 0 or self.rank < saved:
            raise ValueError(f"it lacks {own.name}, the random state (noise, timesteps, caption dropout) of rank "
                             f"{self.rank}")
        else:
            state = {}
        if self.is_main and saved < self.world_size:
            print(f"warning: {folder} was saved by {saved} process(es), so ranks {saved}-{self.world_size - 1} start "
                  "fresh random streams (noise, timesteps, caption dropout): training goes on, but not bitwise as "
                  "an uninterrupted run would")
        return state

    def _restore_ema(self, path: Path, model, ema: Optional[dict]) -> bool:
        """The EMA from the tensors at `path`; a checkpoint saved without them (train.ema.enabled=false)
        starts it from the just-loaded weights (returns False: `load` warns)."""
        if ema is None:
            return True
        if not path.exists():
            self._ema_from_model(model, ema)
            return False
        src = checkpoint.load_tensors(path)
        for k, v in ema.items():
            v.copy_(src[k])
        return True

    def _ema_from_model(self, model, ema: dict) -> None:
        """EMA := the current (just loaded) weights, for a checkpoint that holds none."""
        with torch.no_grad():
            for name, p in self.unwrap(model).named_parameters():
                if name in ema:
                    ema[name].copy_(p.detach())

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

    def _extra_state(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def _load_extra_state(self, state: dict) -> None:
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
