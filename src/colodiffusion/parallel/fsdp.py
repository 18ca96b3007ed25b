"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the data-parallel
ranks (ZeRO-3, or ZeRO-2 with `parallel.zero=2`), optionally hybrid (`dp_replicate` replica groups,
e.g. one per node) and composed with tensor parallelism on a 2-D mesh.

The order of tensor parallel, activation checkpointing, compile and FSDP: parallelize.py.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

from colodiffusion.config import Config, ConfigError
from colodiffusion.parallel.distributed import DistributedBackend
from colodiffusion.parallel.parallelize import FSDPPlan


class FSDPBackend(DistributedBackend):
    name = "fsdp"

    def __init__(self, cfg: Config):
        if cfg.precision == "fp16":
            raise ConfigError("parallel.strategy=fsdp trains in fp32 or bf16 (precision=bf16), not fp16.")
        super().__init__(cfg)

    def _layout(self) -> dict:
        p = self.cfg.parallel
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if self.precision == "bf16" else MixedPrecisionPolicy())
        offload = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if p.offload == "cpu" else OffloadPolicy()
        dp_mesh = self.mesh["dp_replicate", "dp_shard"] if self.dims.dp_replicate > 1 else self.mesh["dp_shard"]
        return dict(tp_mesh=self.mesh["tp"] if self.dims.tp > 1 else None,
                    fsdp=FSDPPlan(dp_mesh, reshard_after_forward=p.zero == 3, mp_policy=mp, offload_policy=offload))

    def autocast(self):
        # bf16 compute comes from the MixedPrecisionPolicy (with fp32 gradient reduction).
        return contextlib.nullcontext()
