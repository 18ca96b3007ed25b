"""Sealed folders that are not checkpoints: a run's frozen components (tokenizer, text encoder,
first-stage VAE), its exported final/ model and LoRA adapter, a latent cache's components.

They are written the way `storage/checkpoint.py` writes a checkpoint: into a hidden temporary
sibling, fsynced, `manifest.json` (size and SHA-256 of every file) written last, then one atomic
`os.replace` to the real name. A kill at any moment therefore leaves the complete folder under its
name, or nothing under its name (a stale `.tmp-NAME`/`.replaced-NAME`, never read, removed by the
next write of that folder).
A folder under its name without a valid manifest (altered, or written by an older version) is not
sealed, and its owner rebuilds it rather than trusting it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from colodiffusion.storage import faults
from colodiffusion.storage.checkpoint import CheckpointError, _fsync_dir, _fsync_tree, verify, write_manifest


def write_sealed(folder: Path, write: Callable[[Path], Any], step: int = 0) -> Path:
    """Fill a temporary folder through `write(tmp)`, seal it (manifest naming `step`) and rename it to
    `folder`, replacing whatever was there. Fault point `NAME_written`: files written, not sealed."""
    folder = Path(folder)
    tmp, aside = folder.with_name(f".tmp-{folder.name}"), folder.with_name(f".replaced-{folder.name}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in (tmp, aside):  # left by a kill: never trusted, so never restored
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    faults.point(f"{folder.name}_written")
    _fsync_tree(tmp)
    write_manifest(tmp, step)
    _fsync_dir(tmp)
    if folder.exists():  # an unsealed or outdated folder: out of the way first, one rename publishes
        os.replace(folder, aside)
    os.replace(tmp, folder)
    _fsync_dir(folder.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return folder


def is_sealed(folder: Path) -> bool:
    """True if `folder` has a manifest and every file it lists has its size and SHA-256."""
    try:
        verify(Path(folder))
    except (CheckpointError, OSError):
        return False
    return True
