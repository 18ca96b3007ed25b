"""Checkpoints as folders, written to a temporary folder by the backend (every rank writes its
part), fsynced and renamed into place, so a crash mid-write never leaves a half checkpoint under a
real name. `latest` names the newest one. What goes inside is the backend's business: the single
process writes `unet.safetensors`, `ema.safetensors`, `state.pt` and one `rank_<r>.pt` per rank.
State files are read with `torch.load(weights_only=True)`: loading never runs code.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

STEP_RE = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():  # e.g. a sharded checkpoint's dcp/
            _fsync_tree(p)
    _fsync_dir(path)


def save(root: Path, step: int, write: Callable[[Path], None], keep: int, is_main: bool = True,
         barrier: Callable[[], None] = lambda: None) -> Path:
    """Write checkpoint `root/step_XXXXXXXX` through `write(folder)` (called on every rank, into
    one temporary folder), then publish it atomically; keep the newest `keep` complete ones."""
    finish_pending()
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    pending = write(tmp)
    barrier()
    if pending is not None:
        # An asynchronous write (a Future): publish once it is done, at the next save or at
        # shutdown. DCP's coordinator (rank 0) completes last, after every rank's shards are written.
        _PENDING.append((pending, (lambda: _publish(root, tmp, final, keep)) if is_main else None))
        return final
    if is_main:
        _publish(root, tmp, final, keep)
    barrier()
    return final


_PENDING: list = []


def finish_pending() -> None:
    """Wait for asynchronous checkpoint writes and publish them (in order)."""
    while _PENDING:
        future, publish = _PENDING.pop(0)
        future.result()
        if publish is not None:
            publish()


def _publish(root: Path, tmp: Path, final: Path, keep: int) -> None:
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. end of a resumed run): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def load_state(path: Path) -> Any:
    """Read a `.pt` state file without executing code (tensors, numbers, strings, containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and (p / "state.pt").exists())


def find_latest(root: Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve(path: Path) -> Path:
    """A checkpoint folder, or a run/checkpoints folder whose newest checkpoint is meant."""
    path = Path(path)
    if (path / "state.pt").exists():
        return path
    for root in (path, path / "checkpoints"):
        found = find_latest(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"'{path}' is not a checkpoint folder (no state.pt) and holds no checkpoints")
