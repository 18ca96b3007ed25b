"""Which checkpoint a run resumes from (the loop's policy over the sealed folders of `storage/checkpoint.py`),
and the loop's state a checkpoint holds beside the weights: written by `shared_state` (once) and
`rank_state` (per rank), read back by `restore`. The weights, optimizer and EMA are the backend's.

`train.resume=auto` takes the newest intact checkpoint of the run folder (a corrupt newer one is
reported and skipped); a path names one checkpoint, or a run/checkpoints folder to search. The main
rank chooses and verifies; every rank then agrees on the step through the backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from colodiffusion.storage.checkpoint import MANIFEST, CheckpointError, find_latest, manifest_step, recover, resolve
from colodiffusion.train import signals
from colodiffusion.train.build import State


def choose_checkpoint(root: Path, mode: str, backend) -> Optional[Path]:
    """The checkpoint to resume from (`mode` is 'auto' or a path): cleaned up, picked and verified
    on the main rank, then agreed by every rank (they get its step through the backend)."""
    path, error = None, None
    if backend.is_main:
        try:
            recover(root)
            path = find_latest(root) if mode == "auto" else resolve(Path(mode))
        except CheckpointError as exc:
            error = exc
    if backend.world_size == 1:
        if error is not None:
            raise error
        return path
    step = signals.broadcast_int(backend, -2 if error is not None else -1 if path is None else manifest_step(path))
    if step == -2:
        raise error or CheckpointError("the main rank could not choose a checkpoint to resume from (see its message)")
    if step == -1:
        return None
    if backend.is_main:
        return path
    base = root if mode == "auto" else Path(mode)
    for p in (base, base / f"step_{step:08d}", base / "checkpoints" / f"step_{step:08d}"):
        if (p / MANIFEST).exists() and manifest_step(p) == step:
            return p
    raise CheckpointError(f"rank {backend.rank} cannot see checkpoint step {step} under '{base}' (is the run folder on "
                          "a shared filesystem?)")


# -- what a checkpoint holds of the loop ----------------------------------------------------
def shared_state(state: State) -> dict:
    return {"step": state.step, "lr_scheduler": state.lr_scheduler.state_dict(), "loader": state.loader.state_dict(),
            "guard": state.guard.state_dict()}


def rank_state(state: State) -> dict:
    out = {"noise_gen": state.noise_gen.get_state(), "data_gen": state.data_gen.get_state(),
           "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout etc. on the GPU
        out["cuda_rng"] = torch.cuda.get_rng_state()
    return out


def restore(state: State, shared: dict, per_rank: dict) -> None:
    state.step = int(shared["step"])
    state.lr_scheduler.load_state_dict(shared["lr_scheduler"])
    state.loader.load_state_dict(shared["loader"])
    state.guard.load_state_dict(shared.get("guard", {}))
    if per_rank:  # {} only for a rank the saving run did not have (the backend warned)
        state.noise_gen.set_state(per_rank["noise_gen"])
        state.data_gen.set_state(per_rank["data_gen"])
        torch.set_rng_state(per_rank["torch_rng"])
        if "cuda_rng" in per_rank and torch.cuda.is_available():
            torch.cuda.set_rng_state(per_rank["cuda_rng"])
