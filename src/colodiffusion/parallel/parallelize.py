"""How the model a run trains is parallelized, in one place and one order (torchtitan's):

1. tensor parallel (`tp.py`): the transformer blocks' linears become DTensor shards over the `tp` mesh;
2. activation checkpointing (diffusers' own flags, per block kind);
3. torch.compile of the whole UNet (`nn.Module.compile`: parameter names stay; it compiles at the first
   forward, so it traces the TP shards and sees FSDP's hooks as they will run);
4. FSDP2 (`fully_shard`): each UNet block its own unit, so its all-gather overlaps the previous block's
   compute, then the root.

Every backend's `prepare` calls `parallelize` with the steps its strategy has (single, DDP, DeepSpeed and
Colossal-AI: 2 and 3; DDP wraps the result; FSDP: all four), after the model conversions of `train/perf.py`
(fp8 linears, attention kernels, parameter dtype, memory format) and the LoRA adapters. Steps 2 and 3 act on
the UNet alone when the model also holds the text encoder (model.train_text_encoder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.device_mesh import DeviceMesh

from colodiffusion.config import ConfigError
from colodiffusion.config.schema import PerfConfig


@dataclass
class FSDPPlan:
    """How `fully_shard` wraps the model: its mesh (1-D, or 2-D for HSDP), ZeRO-3 (reshard parameters after
    each forward) or ZeRO-2, and the mixed-precision and offload policies."""
    mesh: DeviceMesh
    reshard_after_forward: bool
    mp_policy: object
    offload_policy: object


def parallelize(model: torch.nn.Module, perf: PerfConfig, gradient_checkpointing: bool = False,
                tp_mesh: Optional[DeviceMesh] = None, fsdp: Optional[FSDPPlan] = None) -> torch.nn.Module:
    """Apply TP -> activation checkpointing -> compile -> FSDP to `model` in place (and return it).
    `gradient_checkpointing` (model.gradient_checkpointing) means `full` where perf.activation_checkpointing
    is none; `tp_mesh` / `fsdp` None skip those steps."""
    unet = getattr(model, "unet", model)  # UNetWithTextEncoder: the levers are the UNet's
    if tp_mesh is not None:
        from colodiffusion.parallel.tp import parallelize_tp

        parallelize_tp(model, tp_mesh)
    ac = perf.activation_checkpointing
    select_checkpointing(unet, "full" if ac == "none" and gradient_checkpointing else ac)
    if perf.compile != "none":
        use_compile_cache(perf.compile_cache)
    compile_unet(unet, perf.compile, perf.compile_mode, options=inductor_options(perf))
    if fsdp is not None:
        apply_fsdp(model, fsdp)
    return model


def select_checkpointing(unet: torch.nn.Module, mode: str) -> None:
    """Activation checkpointing through diffusers' own flags: `full` sets them all; `attention` only
    the transformer models (each BasicTransformerBlock is recomputed); `resnets` only the UNet blocks
    (each ResnetBlock2D is recomputed)."""
    if mode == "none":
        return
    if mode not in ("full", "attention", "resnets"):
        raise ConfigError(f"perf.activation_checkpointing '{mode}' is unknown; use none, full, attention or resnets.")
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    unet.enable_gradient_checkpointing()
    if mode == "full":
        return
    for module in unet.modules():
        if module is unet or not hasattr(module, "gradient_checkpointing"):
            continue
        is_attention = isinstance(module, Transformer2DModel)
        module.gradient_checkpointing = is_attention if mode == "attention" else not is_attention


def compile_unet(unet: torch.nn.Module, how: str, mode: str = "default", backend: str = "inductor",
                 options: dict | None = None) -> None:
    """torch.compile the whole UNet in place (`nn.Module.compile`, so parameter names stay as they are).

    Static shapes (dynamic=False): a training run sees one shape, and a dynamic-shape graph would
    give up kernels specialised for it. `options` are Inductor settings for this compile only."""
    if how == "none":
        return
    if how != "full":
        raise ConfigError(f"perf.compile '{how}' is unknown; use none or full.")
    kwargs: dict = {"dynamic": False, "backend": backend}
    if options and backend == "inductor":
        # torch.compile takes a mode or options, not both: spell the mode out as its options.
        from torch._inductor import list_mode_options

        kwargs["options"] = {**list_mode_options(mode), **options}
    elif mode != "default":
        kwargs["mode"] = mode
    unet.compile(**kwargs)


def inductor_options(p: PerfConfig) -> dict:
    """Inductor settings chosen in `perf` (empty: Inductor's defaults)."""
    names = ("conv_1x1_as_mm", "coordinate_descent_tuning")
    return {n: True for n in names if getattr(p, n)}


def compile_cache_dir(setting: str) -> Path | None:
    """Where compiled graphs persist (see PerfConfig.compile_cache); None leaves torch's default."""
    if setting == "off":
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "colodiffusion" / "torch_compile"


def use_compile_cache(setting: str) -> Path | None:
    """Point Inductor's FX-graph cache, AOTAutograd's cache and Triton's kernel cache at one folder
    that outlives the process: a second run with the same model, shapes and torch skips code
    generation (it still traces). Call before the first compile of the process."""
    folder = compile_cache_dir(setting)
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return folder


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


def apply_fsdp(model: torch.nn.Module, plan: FSDPPlan) -> None:
    from torch.distributed.fsdp import fully_shard

    kwargs = dict(mesh=plan.mesh, mp_policy=plan.mp_policy, offload_policy=plan.offload_policy)
    for unit in shard_units(model):
        fully_shard(unit, reshard_after_forward=plan.reshard_after_forward, **kwargs)
    # The root's parameters are needed again as soon as backward starts: keep them gathered.
    fully_shard(model, reshard_after_forward=False, **kwargs)
