"""What every torch.distributed backend shares: the process group and mesh (from `ParallelDims`),
collectives, gradient clipping over (possibly sharded) gradients, DCP checkpoints and gathering full
weights for export. `ddp.py` and `fsdp.py` only say how the model is wrapped.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from colodiffusion.config import Config, ConfigError
from colodiffusion.parallel.backend import Backend
from colodiffusion.parallel.dims import ParallelDims, destroy_process_group, init_process_group
from colodiffusion.parallel.heartbeat import Heartbeat, explain
from colodiffusion.parallel.sharded_checkpoint import (
    full_model_state,
    full_tensors,
    load_full,
    load_sharded,
    save_sharded,
)
from colodiffusion.storage import checkpoint


class DistributedBackend(Backend):
    name = "distributed"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.device = init_process_group(cfg.parallel.timeout_s)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.heartbeat = Heartbeat.start(self.rank, self.world_size, cfg.parallel.timeout_s)
        try:
            self.dims = ParallelDims.from_config(cfg, self.world_size)
        except ConfigError:
            self._stop_heartbeat()
            dist.destroy_process_group()
            raise
        self.mesh = self.dims.build_mesh(self.device.type)
        self._dp_rank = self.dims.dp_rank(self.rank)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        # Background checkpoint writes talk over their own (CPU) group, never the training one.
        self._ckpt_group = dist.new_group(backend="gloo") if cfg.parallel.async_checkpoint else None
        self._model_factory = None

    # -- topology -----------------------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        return self._dp_rank

    @property
    def dp_size(self) -> int:
        return self.dims.dp_size

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world_size

    def shutdown(self, clean: bool = True) -> None:
        self._stop_heartbeat()
        try:
            checkpoint.finish_pending()
        except Exception as exc:
            if clean:
                raise
            # The run already failed: say this too, but let the error that ended the run be the one raised.
            print(f"rank {self.rank}: the background checkpoint write failed as well ({exc}); it stays unpublished.",
                  file=sys.stderr)
        destroy_process_group(barrier=clean)

    def explain_failure(self, exc: BaseException) -> Optional[Exception]:
        return explain(exc, self.heartbeat, self.rank, self.cfg.parallel.timeout_s)

    def _stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()

    def prepare(self, model: torch.nn.Module, make_optimizer):
        self._remember_architecture(model)  # first: FSDP changes the model's class, the engines wrap it
        return super().prepare(model, make_optimizer)

    def _remember_architecture(self, model: torch.nn.Module) -> None:
        """Keep a way to build a plain copy for export (diffusers models rebuild from their config)."""
        cls, config = type(model), getattr(model, "config", None)
        adapters = dict(getattr(model, "peft_config", None) or {})  # LoRA: the same layers, so its weights load

        def build():
            plain = cls.from_config(config)
            for name, lora_config in adapters.items():
                plain.add_adapter(lora_config, adapter_name=name)
            return plain
        self._model_factory = build if config is not None and hasattr(cls, "from_config") else None

    # -- step -----------------------------------------------------------------------------------
    def _clip_grads(self, model, grad_clip: float) -> torch.Tensor:
        return clip_grad_norm(list(model.parameters()), grad_clip)  # DTensor-aware, one reduction per mesh

    # -- checkpoints --------------------------------------------------------------------------------
    def _save_weights(self, folder: Path, model, optimizer, ema: Optional[dict]):
        return save_sharded(folder, model, optimizer, ema, async_group=self._ckpt_group), {}

    def _load_weights(self, folder: Path, kind: str, shared: dict, model, optimizer, ema: Optional[dict]) -> bool:
        if kind == "dcp":
            return load_sharded(folder, model, optimizer, ema)
        # a single-process checkpoint: full tensors on every rank, each keeps its shards
        has_ema = (folder / "ema.safetensors").exists()
        load_full(model, optimizer, ema, checkpoint.load_tensors(folder / "unet.safetensors"), shared.pop("optimizer"),
                  checkpoint.load_tensors(folder / "ema.safetensors") if has_ema else None)
        return has_ema

    def full_state_dict(self, model, optimizer=None) -> dict[str, torch.Tensor]:
        return full_model_state(model)

    def full_ema_state_dict(self, ema: dict) -> dict[str, torch.Tensor]:
        return full_tensors(ema, keep=self.is_main)

    def plain_model(self, model) -> torch.nn.Module:
        if self._model_factory is None:
            return super().plain_model(model)
        return self._model_factory()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global gradient norm over plain and sharded (DTensor) gradients, then clip to `max_norm` (0: no
    clipping). Gradients are grouped by device mesh (TP and FSDP params can live on different ones):
    one reduction per mesh, no host sync."""
    groups: dict = defaultdict(list)
    for p in params:
        if p.grad is not None:
            groups[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p)
    norms = []
    for group in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    if not norms:
        return torch.zeros(())
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    if max_norm > 0:
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
