"""Folders we write into are ours: marked when we make them, locked while we write, and free of links out.

`claim(folder, kind, ...)` is how a run folder (`train`) or a latent cache (`cache --out`) is taken:

- **marked**: an existing folder is written into only if it is empty, carries our marker
  (`.colodiffusion.json`, `{"kind": "run"}`, written when the folder is first claimed) or holds what
  an older version of ours left (`legacy(folder)`); anything else (a home folder, `/`, a project
  folder) is refused with one sentence, so nothing of a user's is ever deleted as "an earlier attempt";
- **locked**: an exclusive `flock` on `.colodiffusion.lock`, held until `release()` (or the process
  ends: the kernel drops it, so a killed run never leaves a stale lock); a second writer gets one
  sentence naming the first one's pid and host;
- **free of links out**: a symbolic link leading outside it, or a file with a second hard link,
  anywhere in it is refused, so writing or appending to what the folder holds (a received run
  folder) never lands outside it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

from colodiffusion.config import ConfigError
from colodiffusion.storage.files import inside, loads_json, write_text_atomic

MARKER = ".colodiffusion.json"
LOCK = ".colodiffusion.lock"
# lock fd -> folder, in this process (a forked child, e.g. a DataLoader worker, closes its copies)
_HELD: dict[int, Path] = {}


def _close_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class FolderLock:
    """An exclusive lock on a claimed folder; `release()` (or process exit) frees it."""

    def __init__(self, fd: int, folder: Path):
        self.fd, self.folder = fd, folder

    def release(self) -> None:
        if _HELD.pop(self.fd, None) is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def locks_of(folder: Path) -> set[int]:
    """The lock descriptors this process holds on `folder` (a set to compare before and after a claim)."""
    return {fd for fd, f in _HELD.items() if f == Path(folder).resolve()}


def release_fds(fds: set[int]) -> None:
    for fd in fds:
        FolderLock(fd, _HELD.get(fd, Path())).release()


def marked_kind(folder: Path) -> Optional[str]:
    """The kind our marker gives the folder ('run', 'cache'), or None."""
    try:
        data = loads_json((Path(folder) / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data.get("kind") if isinstance(data, dict) and isinstance(data.get("kind"), str) else None


def links_in(folder: Path) -> Optional[str]:
    """A sentence about the first symbolic link leading out of `folder`, or file with another hard link,
    under it; None if none. A link that stays inside (wandb's `latest-run` and `debug.log` in RUN/wandb/)
    writes nowhere else, so it is allowed."""
    for p in sorted(Path(folder).rglob("*")):  # rglob lists links but does not descend through them
        if p.is_symlink() and not inside(p, folder):
            return f"'{p}' is a symbolic link to '{os.readlink(p)}', outside it"
        if p.is_file() and p.stat().st_nlink > 1:
            return f"'{p}' has {p.stat().st_nlink - 1} other hard link(s)"
    return None


def claim(folder: Path, kind: str, key: str, legacy: Callable[[Path], bool] = lambda p: False) -> FolderLock:
    """Make or take `folder` for writing (see the module docstring): ConfigError, one sentence, if it is
    someone else's, in use, or holds links."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key} '{folder}' is a file, not a folder; give a new or empty folder.")
    if folder.is_dir() and not (folder / LOCK).exists():  # (with a lock file: the lock says whether it is in use)
        _check_ours(folder, kind, key, legacy)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(f"{key} '{folder}' is not writable ({exc.strerror or exc}); give another {key}.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"{key} '{folder}' is in use by {holder}; two {kind}s never share a folder: wait for it "
                          f"to end or give another {key}.") from None
    _HELD[fd] = folder.resolve()
    lock = FolderLock(fd, folder)
    try:
        _check_ours(folder, kind, key, legacy)  # again, now that nobody else writes here
        problem = links_in(folder)
        if problem:
            raise ConfigError(f"{key} '{folder}' holds links: {problem}; we write only into files of our own, so a "
                              f"received folder must hold plain files: copy it without links (cp -rL).")
        os.ftruncate(fd, 0)
        holder = f"pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%H:%M:%S')})"
        os.pwrite(fd, holder.encode(), 0)
        if marked_kind(folder) is None:
            write_text_atomic(folder / MARKER, json.dumps({"kind": kind, "format": 1}) + "\n")
    except BaseException:
        lock.release()
        raise
    return lock


def _check_ours(folder: Path, kind: str, key: str, legacy: Callable[[Path], bool]) -> None:
    found = marked_kind(folder)
    if found == kind:
        return
    if found is not None:
        raise ConfigError(f"{key} '{folder}' is a {found} folder of ours, not a {kind} folder; give another {key}.")
    others = [p.name for p in folder.iterdir() if p.name != LOCK]
    if not others or legacy(folder):
        return
    raise ConfigError(f"{key} '{folder}' is not empty and is not a {kind} folder of ours (it holds "
                      f"{', '.join(sorted(others)[:3])}{', ...' if len(others) > 3 else ''} and no {MARKER}); we write "
                      f"and delete only in folders we made: give a new or empty {key}.")
