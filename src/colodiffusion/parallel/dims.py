"""`ParallelDims`: the one object that owns the process group and the device mesh (torchtitan's habit).

The world is laid out as a 3-D mesh `(dp_replicate, dp_shard, tp)`. Data-parallel ranks
(`dp_replicate x dp_shard`) read disjoint data and draw their own noise; the `tp` ranks of one
group share the batch and the noise. The degrees must multiply to the world size.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from colodiffusion.config import Config, ConfigError


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int

    def __post_init__(self):
        for name in ("dp_replicate", "dp_shard", "tp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel degree {name} is {getattr(self, name)}; it must be >= 1.")
        if self.dp_replicate * self.dp_shard * self.tp != self.world_size:
            raise ConfigError(
                f"dp_replicate ({self.dp_replicate}) * dp_shard ({self.dp_shard}) * tp ({self.tp}) = "
                f"{self.dp_replicate * self.dp_shard * self.tp}, but the world size is {self.world_size}; "
                "change parallel.dp_replicate / parallel.tp or the number of processes."
            )

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> "ParallelDims":
        """DDP replicates over every rank; FSDP shards over what dp_replicate and tp leave."""
        p = cfg.parallel
        if p.strategy == "ddp":  # (tp and dp_replicate are 1: config/validation.py refuses others at load)
            return cls(world_size, 1, 1, world_size)
        inner = p.dp_replicate * p.tp
        if world_size % inner:
            raise ConfigError(
                f"dp_replicate ({p.dp_replicate}) * tp ({p.tp}) = {inner} does not divide the world size "
                f"({world_size}), so dp_replicate * dp_shard * tp cannot equal it; change parallel.dp_replicate, "
                "parallel.tp or the number of processes."
            )
        return cls(p.dp_replicate, world_size // inner, p.tp, world_size)

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> DeviceMesh:
        return init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.tp),
                                mesh_dim_names=("dp_replicate", "dp_shard", "tp"))

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank of a global rank: the mesh is laid out row-major over
        (dp_replicate, dp_shard, tp), so the tp ranks of one group are consecutive and share it."""
        return rank // self.tp


def launch_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_process_group(timeout_s: Optional[float] = None) -> torch.device:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU) and pick this rank's device.
    Every collective of the group waits at most `timeout_s` (parallel.timeout_s) for the other ranks.

    A plain `python -m colodiffusion train` (no torchrun) gets a one-process group on an in-memory
    store, so the distributed strategies also run, and resume, on one process."""
    rank, local_rank, world_size = launch_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        if "MASTER_ADDR" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size, **kwargs)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return device


def destroy_process_group(barrier: bool = True) -> None:
    """`barrier=False` after a failure: a peer may be gone, and waiting for it would hide the error."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()  # nobody leaves while another rank still talks to it
        dist.destroy_process_group()
