"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the data-parallel
ranks (ZeRO-3, or ZeRO-2 with `parallel.zero=2`), optionally hybrid (`dp_replicate` replica groups,
e.g. one per node) and composed with tensor parallelism on a 2-D mesh.

Order of the calls: the trainer enables activation checkpointing and applies the perf levers, torch.compile
last, before `prepare` (train/build.py: build_model); `nn.Module.compile` only marks the UNet, which
compiles at its first forward, after the wrapping. Here: tensor parallel, then FSDP: each UNet block
is its own unit, so its all-gather overlaps the previous block's compute, then the root.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from colodiffusion.config import Config, ConfigError
from colodiffusion.parallel.distributed import DistributedBackend
from colodiffusion.parallel.tp import parallelize_tp


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks that become FSDP units: UNet down/up blocks and the mid block (in order)."""
    units = []
    for name in ("down_blocks", "mid_block", "up_blocks"):
        child = getattr(model, name, None)
        if isinstance(child, torch.nn.ModuleList):
            units.extend(child)
        elif isinstance(child, torch.nn.Module):
            units.append(child)
    return units


class FSDPBackend(DistributedBackend):
    name = "fsdp"

    def __init__(self, cfg: Config):
        if cfg.precision == "fp16":
            raise ConfigError("parallel.strategy=fsdp trains in fp32 or bf16 (precision=bf16), not fp16.")
        super().__init__(cfg)

    def prepare(self, model: torch.nn.Module, make_optimizer):
        self.remember_architecture(model)
        model = model.to(self.device)
        if self.dims.tp > 1:
            parallelize_tp(model, self.mesh["tp"])
        p = self.cfg.parallel
        dp_mesh = self.mesh["dp_replicate", "dp_shard"] if self.dims.dp_replicate > 1 else self.mesh["dp_shard"]
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if self.precision == "bf16" else MixedPrecisionPolicy())
        offload = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if p.offload == "cpu" else OffloadPolicy()
        kwargs = dict(mesh=dp_mesh, mp_policy=mp, offload_policy=offload)
        for unit in shard_units(model):
            fully_shard(unit, reshard_after_forward=p.zero == 3, **kwargs)
        # The root's parameters are needed again as soon as backward starts: keep them gathered.
        fully_shard(model, reshard_after_forward=False, **kwargs)
        return model, make_optimizer(model.parameters())

    def autocast(self):
        # bf16 compute comes from the MixedPrecisionPolicy (with fp32 gradient reduction).
        return contextlib.nullcontext()
