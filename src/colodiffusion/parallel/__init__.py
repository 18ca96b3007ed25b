"""Parallel backends behind one small interface; the training loop never branches on a name.

`backend.py` holds the interface and `single` (one process); `distributed.py` what every
torch.distributed backend shares, and `ddp.py`, `fsdp.py` (with `tp.py`), `deepspeed.py` and
`colossalai.py` one strategy each; `dims.py` owns the device mesh; `parallelize.py` applies tensor
parallel, activation checkpointing, compile and FSDP, in that order, for every backend's `prepare`.
This layer may import `config`, `storage`, `models` and `data`; never the loop (`train/`).
"""

from __future__ import annotations

import os

import torch

from colodiffusion.config import Config, ConfigError
from colodiffusion.parallel.backend import Backend, plain_copy

__all__ = ["Backend", "BACKENDS", "build_backend", "check_devices", "check_launch", "check_world", "plain_copy"]

BACKENDS: dict[str, type[Backend]] = {"single": Backend}


def _register_distributed() -> None:
    from colodiffusion.parallel.ddp import DDPBackend
    from colodiffusion.parallel.fsdp import FSDPBackend

    BACKENDS.update(ddp=DDPBackend, fsdp=FSDPBackend)
    # The engines' own files import DeepSpeed / Colossal-AI only when a backend is built.
    from colodiffusion.parallel.colossalai import ColossalAIBackend
    from colodiffusion.parallel.deepspeed import DeepSpeedBackend

    BACKENDS.update(deepspeed=DeepSpeedBackend, colossalai=ColossalAIBackend)


def check_launch(cfg: Config) -> None:
    """The original project's `trainer.devices` / `trainer.accelerator` against what was actually launched."""
    world, devices, acc = int(os.environ.get("WORLD_SIZE", 1)), cfg.trainer.devices, cfg.trainer.accelerator
    if devices and devices != world:
        raise ConfigError(
            f"trainer.devices={devices} but {world} process(es) were launched; run `torchrun --nproc_per_node "
            f"{devices} -m colodiffusion train ...` (or `python main.py ...`, which launches them), or set "
            f"trainer.devices={world}.")
    check_devices(cfg)
    if acc == "cpu" and torch.cuda.is_available():
        raise ConfigError("trainer.accelerator=cpu but CUDA GPUs are visible; hide them with CUDA_VISIBLE_DEVICES= .")


CUDA_ONLY_PLUGINS = ("gemini", "low_level_zero")


def check_devices(cfg: Config) -> None:
    """Without a CUDA GPU, one sentence naming every setting that needs one and the override for each
    (the original project's recipes ask for three at once: trainer.accelerator=gpu, gemini and fp16)."""
    if torch.cuda.is_available():
        return
    p, needs = cfg.parallel, []
    if p.strategy == "colossalai" and p.colossalai.plugin in CUDA_ONLY_PLUGINS:
        needs.append((f"parallel.colossalai.plugin={p.colossalai.plugin} runs only on CUDA GPUs in Colossal-AI",
                      "parallel.colossalai.plugin=torch_ddp"))
    if cfg.precision == "fp16" and p.strategy in ("deepspeed", "colossalai"):
        needs.append((f"precision=fp16 with parallel.strategy={p.strategy} runs only on CUDA GPUs", "precision=32"))
    if cfg.trainer.accelerator == "gpu":
        needs.append(("trainer.accelerator=gpu asks for a CUDA GPU", "trainer.accelerator=cpu"))
    if needs:
        raise ConfigError(f"{'; '.join(why for why, _ in needs)}, and no CUDA GPU is visible: on a CPU give "
                          f"{' '.join(fix for _, fix in needs)} (the CPU-sized twins, configs/*_tiny.yaml, need none).")


def check_world(cfg: Config, world_size: int) -> None:
    """Before launching `world_size` processes: the machine and the mesh (what each rank would refuse)."""
    check_devices(cfg)
    if cfg.parallel.strategy != "single":
        from colodiffusion.parallel.dims import ParallelDims

        ParallelDims.from_config(cfg, world_size)


def build_backend(cfg: Config) -> Backend:
    check_launch(cfg)
    if cfg.parallel.strategy not in BACKENDS:
        _register_distributed()
    if cfg.parallel.strategy == "single" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError(
            f"parallel.strategy=single runs one process, but {os.environ['WORLD_SIZE']} were launched "
            "(torchrun); set parallel.strategy=ddp or fsdp (or deepspeed, colossalai)."
        )
    return BACKENDS[cfg.parallel.strategy](cfg)
