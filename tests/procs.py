"""Finding the processes the tests started, by a marker in their environment (Linux /proc).

The root conftest puts `SESSION=<random id>` into the environment of the pytest process, and each
test's `TEST=<random id>`; every process a test starts inherits both, also torchrun's workers
(which run in sessions of their own and are re-parented to init when torchrun dies). So a
process is ours if its /proc/<pid>/environ carries our id: never by command name, so processes
of other test runs on the same machine (another id) are never counted or killed.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

SESSION = "COLODIFFUSION_TEST_SESSION"
TEST = "COLODIFFUSION_TEST_ID"
LAUNCH = "COLODIFFUSION_TEST_LAUNCH"
PROC = Path("/proc")


def new_id() -> str:
    return uuid.uuid4().hex


def _read_environ(pid: int) -> bytes:
    try:
        return (PROC / str(pid) / "environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return b""


def _environ(pid: int, settle_s: float = 1.0) -> bytes:
    """The environment `pid` started with. A child of this process can read as empty for a moment
    after Popen returned: the kernel closes the close-on-exec pipe Popen waits on before it has set
    up the new program's environment, and a test's teardown scan can land in between on a loaded
    machine (seen once on CI: a leaked child went unnoticed until the session's end). Such a child
    gets up to `settle_s` to finish its exec."""
    env = _read_environ(pid)
    if env or ppid(pid) != os.getpid():
        return env
    end = time.monotonic() + settle_s
    while not env and _alive(pid) and time.monotonic() < end:
        time.sleep(0.01)
        env = _read_environ(pid)
    return env


def _alive(pid: int) -> bool:
    """Running, sleeping or stopped; a zombie has exited (it only waits to be reaped)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def getenv(pid: int, key: str) -> str | None:
    """The value of `key` in the environment process `pid` started with (None if unset or unreadable)."""
    prefix = f"{key}=".encode()
    for item in _environ(pid).split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


def ppid(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def carries(pid: int, key: str, value: str) -> bool:
    return getenv(pid, key) == value


def marked(key: str, value: str) -> list[int]:
    """Live processes (other than this one) whose environment has key=value."""
    if not PROC.is_dir():
        return []
    pids = [int(p.name) for p in PROC.iterdir() if p.name.isdigit() and int(p.name) != os.getpid()]
    return [p for p in pids if carries(p, key, value) and _alive(p)]


def wait_gone(key: str, value: str, timeout: float) -> list[int]:
    """Wait up to `timeout` s for every process marked key=value to exit; the ones still alive."""
    end = time.monotonic() + timeout
    left = marked(key, value)
    while left and time.monotonic() < end:
        time.sleep(0.1)
        left = marked(key, value)
    return left


def kill(key: str, value: str, pids: list[int]) -> None:
    """SIGKILL `pids`, each only if it still carries key=value (a pid may have been reused)."""
    for pid in pids:
        if carries(pid, key, value):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        try:
            cmd = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = "?"
        out.append(f"pid {pid}: {cmd[:200]}")
    return "; ".join(out)
