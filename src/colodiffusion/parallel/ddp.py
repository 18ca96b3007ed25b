"""DDP: every rank holds the whole model; gradients are all-reduced (averaged) during backward."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from colodiffusion.parallel.distributed import DistributedBackend


class DDPBackend(DistributedBackend):
    name = "ddp"

    def _wrap(self, model: torch.nn.Module, make_optimizer):
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids)
        return ddp, make_optimizer(ddp.parameters())

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model
