"""Sealed folders that are not checkpoints: a run's frozen components (tokenizer, text encoder,
first-stage VAE), its exported final/ model and LoRA adapter, a latent cache's components.

They are written the way `storage/checkpoint.py` writes a checkpoint: into a hidden temporary
sibling, fsynced, `manifest.json` (size and SHA-256 of every file) written last, then one atomic
`os.replace` to the real name. A kill at any moment therefore leaves the complete folder under its
name, or nothing under its name (a stale `.tmp-NAME`/`.replaced-NAME`, never read, removed by the
next write of that folder).
A folder under its name without a valid manifest (altered, or written by an older version) is not
sealed, and its owner rebuilds it rather than trusting it.

A write that fails (a full disk: `OSError`, safetensors' `SafetensorError`, torch.save's `RuntimeError`)
removes the temporary folder and becomes one `CheckpointError` sentence; what was under the name stays.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError

from colodiffusion.config import ConfigError
from colodiffusion.storage import faults
from colodiffusion.storage.checkpoint import (MANIFEST, CheckpointError, _fsync_dir, _fsync_tree, _why, verify,
                                              write_manifest)


def is_write_error(exc: BaseException) -> bool:
    """A failed write (full disk, quota, I/O error) rather than a bug: OSError, SafetensorError, or the
    RuntimeError torch.save raises when its stream cannot be written."""
    return isinstance(exc, (OSError, SafetensorError)) or isinstance(exc, RuntimeError) and any(
        s in str(exc) for s in ("enforce fail", "PytorchStreamWriter", "file write failed"))


def write_sealed(folder: Path, write: Callable[[Path], Any], step: int = 0,
                 hint: str = "free space and try again") -> Path:
    """Fill a temporary folder through `write(tmp)`, seal it (manifest naming `step`) and rename it to
    `folder`, replacing whatever was there. Fault point `NAME_written`: files written, not sealed.
    A failed write is one sentence ending in `hint`; the folder under its name is left as it was."""
    folder = Path(folder)
    tmp, aside = folder.with_name(f".tmp-{folder.name}"), folder.with_name(f".replaced-{folder.name}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in (tmp, aside):  # left by a kill: never trusted, so never restored
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        faults.point(f"{folder.name}_written")
        _fsync_tree(tmp)
        write_manifest(tmp, step)
        _fsync_dir(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_error(exc):
            raise
        kept = "the one already there is unchanged" if folder.exists() else "nothing was written under that name"
        raise CheckpointError(f"could not write '{folder}' ({_why(exc)}); {kept}: {hint}") from exc
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


def check_replaceable(folder: Path, key: str) -> None:
    """ConfigError unless `folder` is new, empty or a sealed folder of ours (which a write may replace
    whole): a user's own folder is never swapped away."""
    folder = Path(folder)
    if folder.is_symlink() or folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key} '{folder}' exists and is not a folder; give a new folder.")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST).is_file():
        raise ConfigError(f"{key} '{folder}' is not empty and is not a model folder we wrote (it has no {MANIFEST}), "
                          "and writing replaces the folder whole: give a new folder, or remove that one first.")


def write_file(path: Path, write: Callable[[Path], Any]) -> Path:
    """Write one file through `write(tmp)` beside `path` and rename it into place: a reader sees the old
    file or the new one, never half of one, and a link at `path` is replaced, not written through. A
    failed write is one sentence; the file under its name is left as it was."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"'{path}' is a folder; give a file name.")
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if not is_write_error(exc):
            raise
        kept = "the one already there is unchanged" if path.exists() else "nothing was written under that name"
        raise CheckpointError(f"could not write '{path}' ({_why(exc)}); {kept}: free space and try again") from exc
    return path
