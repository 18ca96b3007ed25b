"""Which checkpoint a run resumes from: the loop's policy over the sealed folders of `storage/checkpoint.py`.

`train.resume=auto` takes the newest intact checkpoint of the run folder (a corrupt newer one is
reported and skipped); a path names one checkpoint, or a run/checkpoints folder to search. The main
rank chooses and verifies; every rank then agrees on the step through the backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from colodiffusion.storage.checkpoint import MANIFEST, CheckpointError, find_latest, manifest_step, recover, resolve
from colodiffusion.train import signals


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
