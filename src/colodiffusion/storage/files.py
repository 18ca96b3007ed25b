"""Small file helpers for sealed folders, the latent cache and exported files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def match_umask(files) -> None:
    """Give `files` the mode a plain open() gives under the user's umask (0666 minus it): some
    writers (safetensors) create their files 0600 through a temporary file, which other users of
    an exported model could then not read."""
    files = [Path(f) for f in files]
    if not files:
        return
    mode = _default_mode(files[0].parent)
    for f in files:
        os.chmod(f, mode)


def _default_mode(folder: Path) -> int:
    # A probe file rather than os.umask(), which would change the umask of every thread for a moment.
    probe = folder / f".mode-probe-{os.getpid()}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()


def loads_json(text: str | bytes):
    """`json.loads` for text from a file a user handed us: nesting deeper than Python's stack raises
    ValueError (a JSONDecodeError, as every other malformed input does), not RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text if isinstance(text, str) else "", 0) from None


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every link in it followed, lies in `root` (also followed): what a file read
    from a user's folder must satisfy, so that a link in it never makes us read elsewhere."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def files_inside(root: Path, pattern: str = "*") -> list[Path]:
    """`root.rglob(pattern)` files, sorted; ValueError (one sentence) for one that is a link leading
    out of `root`: a folder handed to us names only its own files."""
    root = Path(root)
    files = sorted(p for p in root.rglob(pattern) if p.is_file() or p.is_symlink())
    for p in files:
        if not inside(p, root):
            raise ValueError(f"'{p}' is a link to '{os.path.realpath(p)}', outside '{root}'; links out of a folder "
                             "handed to us are not followed: copy the file into the folder")
    return [p for p in files if p.is_file()]


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` beside itself and rename it into place: a reader never sees half of it, and a link
    or a hard link at `path` is replaced, never written through."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
