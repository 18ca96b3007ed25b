"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP).

Model, optimizer and EMA go into `<checkpoint>/dcp/` keyed by parameter name (never by rank), so
DCP reshards on load: a checkpoint written by fsdp on 2 ranks loads into ddp on 1 rank, single, or
fsdp on 4. Each rank writes only its shards; the EMA is saved as whatever tensors it holds (with
FSDP, each rank's shard of it). The same functions work for an unsharded model in one process.
The metadata and the non-tensor values are read by `storage/safe_load.py` (no pickle runs code).
`load_full` places a single-process checkpoint's full state into any of these layouts.
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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor, distribute_tensor

from colodiffusion.storage import safe_load

DCP_DIR = "dcp"


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


def load_sharded(folder: Path, model, optimizer, ema: Optional[dict]) -> bool:
    """Collective: restore model, optimizer and EMA (in place) from a DCP checkpoint, resharding
    to however this process group lays them out. A checkpoint without EMA seeds it from the model
    (returns False then)."""
    path = Path(folder) / DCP_DIR
    saved_keys = safe_load.read_dcp_metadata(path).state_dict_metadata.keys()
    has_ema = any(k.startswith("ema.") for k in saved_keys)
    state = _state(model, optimizer, ema if has_ema else None)
    try:
        with warnings.catch_warnings():  # one process without a process group is a supported case here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=safe_load.SafeReader(str(path)), planner=safe_load.SafePlanner())
    except (Exception, CheckpointException) as exc:  # DCP wraps every rank's error in a BaseException
        raise safe_load.refused(path, exc) from None
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if ema is not None and not has_ema:
        with torch.no_grad():  # names as get_model_state_dict spells them (no DDP "module." prefix)
            for name, t in ema.items():
                t.copy_(state["model"][name].detach())
    return has_ema


def load_full(model, optimizer, ema: Optional[dict], weights: dict, optim_state: dict,
              ema_full: Optional[dict]) -> None:
    """Restore a single-process checkpoint (full tensors, optimizer state keyed by parameter index,
    held by every rank) into this layout (DDP, FSDP2, TP): each rank keeps its own shards."""
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=full)
    names = [n for g in get_optimizer_state_dict(model, optimizer)["param_groups"] for n in g["params"]]
    saved = [i for g in optim_state["param_groups"] for i in g["params"]]
    if len(saved) != len(names):
        raise ValueError(f"its optimizer holds {len(saved)} parameters and this model {len(names)}")
    fqn = dict(zip(saved, names))  # both follow the optimizer's parameter order
    named = {"state": {fqn[i]: s for i, s in optim_state["state"].items()},
             "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in optim_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=full)
    if ema is None:
        return
    with torch.no_grad():
        for name, t in ema.items():
            src = (ema_full or weights)[name].to(t.device, t.dtype)
            if isinstance(t, DTensor):  # every rank has the full tensor: slice locally, no scatter
                src = distribute_tensor(src, t.device_mesh, t.placements, src_data_rank=None)
            t.copy_(src)


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
