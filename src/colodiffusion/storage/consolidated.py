"""Full weights from any checkpoint the trainer writes, read on one process without a process group
(for export, sampling and evaluation).

Written by (weights; EMA):
- single: `unet.safetensors`; `ema.safetensors`.
- ddp, fsdp, tp: `dcp/` shards (`model.*`), resharded to full tensors by torch DCP; `dcp/` (`ema.*`).
- deepspeed: `ds/state/`, the fp32 ZeRO partitions merged by DeepSpeed's `zero_to_fp32`; `ema.safetensors`
  (ZeRO-1/2) or one partition per rank, `ema_rank_<r>.safetensors` (ZeRO-3).
- colossalai: `colossalai/model.safetensors`; `ema.safetensors`.

Every pickle is read through `safe_load` (no code runs); the caller verifies the manifest first.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from colodiffusion.storage import safe_load
from colodiffusion.storage.checkpoint import CheckpointError, load_tensors

KINDS = {"unet.safetensors": "single", "dcp": "dcp", "ds": "deepspeed", "colossalai": "colossalai"}


def kind(folder: Path) -> str:
    for name, k in KINDS.items():
        if (Path(folder) / name).exists():
            return k
    raise CheckpointError(f"checkpoint '{folder}' holds no weights this trainer writes "
                          f"(none of {', '.join(KINDS)})")


def read_model(folder: Path) -> dict[str, torch.Tensor]:
    """The trained module's full state dict (fp32 from the ZeRO masters for DeepSpeed)."""
    folder = Path(folder)
    k = kind(folder)
    if k == "single":
        return load_tensors(folder / "unet.safetensors")
    if k == "dcp":
        return read_dcp(folder, "model.")
    if k == "deepspeed":
        return read_deepspeed(folder)
    return load_tensors(folder / "colossalai" / "model.safetensors")


def read_ema(folder: Path, shapes: dict[str, torch.Size]) -> Optional[dict[str, torch.Tensor]]:
    """The EMA as full tensors, None when the run kept none; `shapes` (the model's parameter shapes)
    reassemble ZeRO-3 partitions."""
    folder = Path(folder)
    if kind(folder) == "dcp":
        return read_dcp(folder, "ema.") or None
    if (folder / "ema.safetensors").exists():
        return load_tensors(folder / "ema.safetensors")
    parts = sorted(folder.glob("ema_rank_*.safetensors"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not parts:
        return None
    ranks = [load_tensors(p) for p in parts]
    out = {}
    for name, part in ranks[0].items():
        if name not in shapes:
            raise CheckpointError(f"'{parts[0]}' holds an EMA of '{name}', which the model does not have")
        full = torch.cat([r[name].reshape(-1) for r in ranks])  # equal partitions, the last one padded
        if full.numel() < shapes[name].numel():
            raise CheckpointError(f"the EMA partitions in '{folder}' are too small for '{name}'")
        out[name] = full[: shapes[name].numel()].view(shapes[name]).clone()
    return out


def read_dcp(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors saved under `prefix`, full size, on the CPU of this one process."""
    path = Path(folder) / "dcp"
    md = safe_load.read_dcp_metadata(path)
    wanted = {k: torch.empty(m.size, dtype=m.properties.dtype)
              for k, m in safe_load.dcp_tensor_shapes(md, prefix).items()}
    if not wanted:
        return {}
    try:
        with warnings.catch_warnings():  # one process, no process group: what no_dist is for
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(wanted, storage_reader=safe_load.SafeReader(str(path)),
                     planner=safe_load.SafePlanner(allow_partial_load=True), no_dist=True)
    except (Exception, CheckpointException) as exc:
        raise safe_load.refused(path, exc) from None
    return {k[len(prefix):]: v for k, v in wanted.items()}


def read_deepspeed(folder: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation of its ZeRO partitions, with its `torch.load` calls forced to
    `weights_only=True` (see safe_load)."""
    safe_load.import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(folder) / "ds"
    try:
        quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
        with safe_load.weights_only(safe_load.deepspeed_globals()), quiet[0], quiet[1]:  # its progress bars
            state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=safe_load.DEEPSPEED_TAG)
    except Exception as exc:
        raise safe_load.refused(path / safe_load.DEEPSPEED_TAG, exc) from None
    return {k: v.detach().float() if v.is_floating_point() else v for k, v in state.items()}
