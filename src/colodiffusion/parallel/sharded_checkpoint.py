"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP).

Model, optimizer and EMA go into `<checkpoint>/dcp/` keyed by parameter name (never by rank), so
DCP reshards on load: a checkpoint written by fsdp on 2 ranks loads into ddp on 1 rank, single, or
fsdp on 4. Each rank writes only its shards; the EMA is saved as whatever tensors it holds (with
FSDP, each rank's shard of it). The same functions work for an unsharded model in one process.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

DCP_DIR = "dcp"


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / DCP_DIR / ".metadata").exists()


def _state(model, optimizer, ema: Optional[dict]) -> dict:
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        state["ema"] = dict(ema)
    return state


def save_sharded(folder: Path, model, optimizer, ema: Optional[dict], async_group=None):
    """Collective: every rank writes its shards. Given `async_group` (a CPU process group), tensors
    are copied to host memory now and written by a background thread: returns its future."""
    state = _state(model, optimizer, ema)
    path = str(Path(folder) / DCP_DIR)
    if async_group is not None:
        return dcp.async_save(state, checkpoint_id=path, process_group=async_group)
    dcp.save(state, checkpoint_id=path)
    return None


def load_sharded(folder: Path, model, optimizer, ema: Optional[dict]) -> None:
    """Collective: restore model, optimizer and EMA (in place) from a DCP checkpoint, resharding
    to however this process group lays them out. A checkpoint without EMA seeds it from the model."""
    path = Path(folder) / DCP_DIR
    saved_keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys()
    has_ema = any(k.startswith("ema.") for k in saved_keys)
    state = _state(model, optimizer, ema if has_ema else None)
    with warnings.catch_warnings():  # one process without a process group is a supported case here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if ema is not None and not has_ema:
        with torch.no_grad():  # names as get_model_state_dict spells them (no DDP "module." prefix)
            for name, t in ema.items():
                t.copy_(state["model"][name].detach())


def full_model_state(model) -> dict[str, torch.Tensor]:
    """Collective: full (unsharded) weights on the CPU of rank 0 (an empty dict elsewhere)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_tensors(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Collective: gather sharded tensors (e.g. the EMA) to full CPU tensors, kept where `keep`."""
    out = {}
    for name, t in tensors.items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[name] = full.detach().cpu()
    return out
