"""Checkpoints as folders: `<name>.safetensors` weights plus `state.pt` (optimizer, RNG, data
position, schedule), written to a temporary folder, fsynced and renamed into place, so a crash
mid-write never leaves a half checkpoint under a real name. `latest` names the newest one.
State files are read with `torch.load(weights_only=True)`: loading never runs code.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

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
    _fsync_dir(path)


def save(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
         keep: int) -> Path:
    """Write checkpoint `root/step_XXXXXXXX`; keep the newest `keep` complete ones."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, sd in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
    torch.save(state, tmp / "state.pt")
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
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and (p / "state.pt").exists())


def find_latest(root: Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    path = Path(path)
    if not (path / "state.pt").exists():
        raise FileNotFoundError(f"'{path}' is not a checkpoint folder (no state.pt)")
    tensors = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return tensors, state
