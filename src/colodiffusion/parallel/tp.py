"""Tensor parallelism with DTensor over the UNet's transformer blocks (Megatron-style pairs).

Attention: to_q/to_k/to_v column-wise (each rank computes heads/tp heads), to_out.0 row-wise (one
all-reduce). Feed-forward: the first projection column-wise, net.2 row-wise. GEGLU splits its
projection into (hidden, gate) halves, which a plain column split would pair wrongly, so its output
stays a sharded DTensor and the split gathers it; net.2 then takes the replicated input.
Convolutions, norms and embeddings stay replicated. Models never see torch.distributed: the plan
is applied from here.
"""

from __future__ import annotations

import torch
from diffusers.models.activations import GEGLU
from diffusers.models.attention import BasicTransformerBlock
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from colodiffusion.config import ConfigError


def block_plan(block: BasicTransformerBlock, tp: int) -> dict:
    plan = {}
    for name in ("attn1", "attn2"):
        attn = getattr(block, name, None)
        if attn is None:
            continue
        if attn.heads % tp:
            raise ConfigError(f"parallel.tp={tp} must divide the attention heads ({attn.heads}) of every block.")
        for proj in ("to_q", "to_k", "to_v"):
            plan[f"{name}.{proj}"] = ColwiseParallel()
        plan[f"{name}.to_out.0"] = RowwiseParallel()
    act = block.ff.net[0]
    if isinstance(act, GEGLU):
        plan["ff.net.0.proj"] = ColwiseParallel(use_local_output=False)
        plan["ff.net.2"] = RowwiseParallel(input_layouts=Replicate())
    else:  # GELU and friends act elementwise on the local columns
        plan["ff.net.0.proj"] = ColwiseParallel()
        plan["ff.net.2"] = RowwiseParallel()
    return plan


def parallelize_tp(model: torch.nn.Module, tp_mesh: DeviceMesh) -> torch.nn.Module:
    tp = tp_mesh.size()
    blocks = [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]
    if not blocks:
        raise ConfigError("parallel.tp > 1 needs a model with transformer blocks (the UNet presets have them).")
    for block in blocks:
        parallelize_module(block, tp_mesh, block_plan(block, tp))
        for name in ("attn1", "attn2"):
            attn = getattr(block, name, None)
            if attn is not None:  # the attention processor splits heads by this count
                attn.heads //= tp
    return model
