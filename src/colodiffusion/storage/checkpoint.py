"""Checkpoints as folders that are either complete and verified, or ignored.

A save writes everything into `.tmp-step_XXXXXXXX/` through the backend (every rank writes its
part), fsyncs it, writes `manifest.json` last (size and SHA-256 of every file), fsyncs again and
renames the folder to `step_XXXXXXXX/` in one atomic `os.replace`; `latest` is updated after that
and is only a hint for people: readers scan the folders and trust the manifest, not the pointer.
A kill -9 at any moment therefore leaves either the new checkpoint complete or none of it under a
real name, and the previous one untouched:

- killed while writing: a stale `.tmp-*` folder, removed by the next save or resume;
- re-saving a step that exists: the old folder is renamed to `.replaced-*` before the new one
  takes its name, and renamed back by `recover` if the kill came in between;
- pruning old checkpoints renames them to `.deleted-*` first, so a half-deleted folder never
  carries a real name.

Loading verifies the manifest (a truncated or garbled file is refused with one sentence). The
manifest guards against accidents only: whoever can write a checkpoint can rewrite its manifest too.
What keeps a crafted checkpoint from running code is how each file is read: safetensors for
weights, `torch.load(weights_only=True)` for our state files, and restricted unpicklers for the
files torch DCP and DeepSpeed pickle themselves (`safe_load.py`, which lists them).

A write that fails on any rank (a full disk: `OSError` from our code, `RuntimeError` from
`torch.save`, `SafetensorError`, DCP's `CheckpointException`) becomes one `CheckpointError` sentence
on every rank, after the ranks agree through `all_ok`, so no rank waits in a barrier for another.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from colodiffusion.config import ConfigError
from colodiffusion.storage import faults
from colodiffusion.storage.files import inside, loads_json, sha256

STEP_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
FORMAT = 1
# What a failed write raises: OSError from our own code, RuntimeError from torch.save,
# SafetensorError from safetensors, and DCP's CheckpointException (a BaseException) around either.
WRITE_ERRORS = (Exception, CheckpointException)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be written or used, in one sentence (exit code 2 in the CLI)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync_tree(path: Path) -> None:
    for p in _files(path):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    for d in sorted({p.parent for p in _files(path)} | {path}, key=lambda d: -len(d.parts)):
        _fsync_dir(d)


def write_manifest(folder: Path, step: int) -> None:
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)}
             for p in _files(folder)}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def verify(folder: Path, hashes: bool = True, within: Optional[Path] = None) -> None:
    """Raise CheckpointError unless every file the manifest lists is there with its size (and hash).
    A name the manifest lists must lead to a file inside the folder (or inside `within`: a Hub cache
    repository, whose snapshot files link to its blobs/), so a received folder's manifest never makes
    us read a file elsewhere."""
    folder = Path(folder)
    try:
        manifest = loads_json((folder / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(m, dict) and type(m.get("size")) is int and
                                                  isinstance(m.get("sha256"), str) for m in files.values()):
            raise TypeError
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{folder}' is incomplete (no {MANIFEST}: its save never finished)") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint '{folder}' has an unreadable {MANIFEST}") from None
    for name, meta in files.items():
        p = folder / name
        if not inside(p, within or folder):
            raise CheckpointError(f"checkpoint '{folder}' has a {MANIFEST} naming '{name}', which leads outside it")
        if not p.is_file():
            raise CheckpointError(f"checkpoint '{folder}' is missing '{name}'")
        size = p.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"checkpoint '{folder}' has a truncated or altered '{name}' "
                                  f"({size} bytes, the manifest says {meta['size']})")
        if hashes and sha256(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint '{folder}' has a corrupt '{name}' (its SHA-256 does not match the "
                                  "manifest)")


def recover(root: Path) -> None:
    """Undo what a crash mid-save left behind (main rank only, while no save runs)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".deleted-")):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".replaced-"):
            final = root / p.name[len(".replaced-"):]
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:  # killed between moving the old folder aside and publishing the new one
                os.replace(p, final)


def _publish(root: Path, tmp: Path, final: Path) -> None:
    aside = root / f".replaced-{final.name}"
    if final.exists():  # re-saving a step (e.g. after resuming from an older checkpoint)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        faults.point("replaced_aside")
    os.replace(tmp, final)
    _fsync_dir(root)
    faults.point("published")
    shutil.rmtree(aside, ignore_errors=True)


def _prune(root: Path, keep: int) -> None:
    try:
        pointer = root / ".latest.tmp"
        pointer.write_text(step_folders(root)[-1].name + "\n")
        os.replace(pointer, root / "latest")
        for old in step_folders(root)[:-keep]:
            dead = root / f".deleted-{old.name}"
            os.replace(old, dead)
            faults.point("pruning")
            shutil.rmtree(dead, ignore_errors=True)
    except OSError as exc:  # the new checkpoint is already published; this is housekeeping
        print(f"warning: checkpoint housekeeping in {root} failed ({exc}); it is retried at the next save")


def save(root: Path, step: int, write: Callable[[Path], Any], keep: int, is_main: bool = True,
         barrier: Callable[[], None] = lambda: None,
         all_ok: Callable[[bool], bool] = lambda ok: ok) -> Path:
    """Write checkpoint `root/step_XXXXXXXX` through `write(folder)` (called on every rank, into
    one temporary folder), then publish it atomically; keep the newest `keep` checkpoints.

    `all_ok(ok)` is a collective in distributed runs (True only if every rank passed True), so
    a write error on any rank (a full disk) stops every rank; the previous checkpoint is intact.
    `write` may return a Future (an asynchronous sharded save): the folder is then published when
    it completes, at the next save or at shutdown (`finish_pending`)."""
    finish_pending()
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    faults.step = step
    error: Optional[BaseException] = None
    pending = None
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        recover(root)
        tmp.mkdir()
    barrier()
    try:
        pending = write(tmp)
    except WRITE_ERRORS as exc:
        error = exc
    barrier()
    if pending is not None and all_ok(error is None):
        # DCP's coordinator (rank 0) completes last, after every rank's shards are written.
        _PENDING.append((pending, (root, tmp, final, step, keep), is_main))
        return final
    if all_ok(error is None) and is_main:
        try:
            _seal(root, tmp, final, step)
        except WRITE_ERRORS as exc:
            error = exc
    if not all_ok(error is None):
        _fail(root, tmp, step, error, is_main)
    if is_main:
        _prune(root, keep)
    barrier()
    return final


def _seal(root: Path, tmp: Path, final: Path, step: int) -> None:
    faults.point("files_written")
    _fsync_tree(tmp)
    write_manifest(tmp, step)
    _fsync_dir(tmp)
    faults.point("manifest_written")
    _publish(root, tmp, final)


def _fail(root: Path, tmp: Path, step: int, error: Optional[BaseException], is_main: bool) -> None:
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = step_folders(root) if is_main else []
    why = _why(error) if error is not None else "a write failed on another rank"
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    raise CheckpointError(f"could not write checkpoint step {step} to {root} ({why}); {kept}, "
                          f"so the run stops: free space and rerun with train.resume=auto") from error


def root_cause(exc: BaseException) -> BaseException:
    """The first rank's exception inside DCP's CheckpointException (which carries one per rank)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        return root_cause(inner[0] if isinstance(inner, tuple) else inner)
    return exc


def _why(error: BaseException) -> str:
    error = root_cause(error)
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    text = str(error).strip()
    errno = re.search(r"os error (\d+)", text)  # safetensors: "... I/O error: File too large (os error 27)"
    if errno:
        return os.strerror(int(errno.group(1)))
    line = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text.splitlines()[0] if text else "")  # torch.save
    return f"a write failed: {type(error).__name__}{': ' + line if line else ''}"


def _finish(root: Path, tmp: Path, final: Path, step: int, keep: int) -> None:
    try:
        _seal(root, tmp, final, step)
    except WRITE_ERRORS as exc:
        _fail(root, tmp, step, exc, True)
    _prune(root, keep)


_PENDING: list = []


def finish_pending() -> None:
    """Wait for asynchronous checkpoint writes and publish them (in order)."""
    while _PENDING:
        future, (root, tmp, final, step, keep), is_main = _PENDING.pop(0)
        try:
            future.result()  # DCP's coordinator gathers every rank's result: all ranks fail together
        except WRITE_ERRORS as exc:
            _fail(root, tmp, step, exc, is_main)
        if is_main:
            _finish(root, tmp, final, step, keep)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    faults.point("tensors_written")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for bad headers/lengths
        raise CheckpointError(f"'{path}' is not a valid safetensors file ({str(exc).splitlines()[0]})") from None


def load_state(path: Path) -> Any:
    """Read a `.pt` state file without executing code (tensors, numbers, strings, containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"'{path}' holds objects other than tensors and plain data; it was refused "
                              "unread because loading it could run code") from None
    except Exception as exc:
        raise CheckpointError(f"'{path}' is not a readable state file ({str(exc).splitlines()[0]})") from None


def step_folders(root: Path) -> list[Path]:
    """Published checkpoint folders, oldest first (not verified)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name))


def find_latest(root: Path, log: Callable[[str], None] = print) -> Optional[Path]:
    """The newest checkpoint that verifies in full; a corrupt newer one is reported and skipped.
    None if `root` holds no checkpoint folder; CheckpointError if it holds some but none is intact."""
    found = step_folders(root)
    problems = []
    for p in reversed(found):
        try:
            verify(p)
        except CheckpointError as exc:
            problems.append(str(exc))
            log(f"skipping {exc}")
            continue
        if problems:
            log(f"falling back to the older checkpoint {p}")
        return p
    if found:
        raise CheckpointError(f"none of the {len(found)} checkpoint(s) in {root} is intact ({problems[0]}); "
                              "give train.resume=PATH to choose one or start a fresh run.dir")
    return None


def resolve(path: Path, log: Callable[[str], None] = print) -> Path:
    """A verified checkpoint: `path` itself, or the newest intact one in a run or checkpoints folder."""
    path = Path(path)
    if (path / MANIFEST).exists() or (path / "state.pt").exists():
        verify(path)
        return path
    for root in (path, path / "checkpoints"):
        if step_folders(root):
            found = find_latest(root, log)
            if found is not None:
                return found
    raise CheckpointError(f"'{path}' is not a checkpoint folder (no {MANIFEST}) and holds no checkpoints")


def manifest_step(folder: Path) -> int:
    return int(json.loads((Path(folder) / MANIFEST).read_text())["step"])
