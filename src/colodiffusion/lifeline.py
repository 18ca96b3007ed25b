"""A worker dies with its launcher: no orphaned ranks holding GPUs after torchrun is killed.

torchrun starts each worker in a session of its own, so killing torchrun (or the process group
it leads, or the job step around it) leaves the workers running: they wait for ever in a
collective or on the launcher's rendezvous store, holding their GPUs and memory. `bind()` makes
a worker started by a launcher (LOCAL_RANK is set: torchrun, the deepspeed launcher, `main.py`'s
relaunch, which runs torchrun in its process) exit when its parent process dies:

- Linux: the kernel's parent-death signal (`prctl(PR_SET_PDEATHSIG, SIGKILL)`, through ctypes). It
  fires when the parent *thread* that started us exits; torchrun and the deepspeed launcher start
  their workers from their main thread, so that is when the launcher process ends.
- elsewhere, or if prctl fails: a daemon thread that polls `getppid()` every second.

The signal is SIGKILL on purpose. SIGTERM would start our checkpoint-and-exit path
(train/signals.py), which all-reduces the stop flag with the other ranks and so can itself block
on a dead peer; with the launcher gone nobody restarts or collects the job anyway, and the newest
sealed checkpoint is intact (a half-written one is never published), so `train.resume=auto`
continues from it.

This module imports nothing heavy (stdlib only) so that `cli.main` can bind before torch loads.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Optional

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# The parent as early as the worker can see it: `bind` re-checks against it, so a launcher that
# died while this interpreter was still starting up is noticed too.
PARENT_AT_START = os.getppid()


def launched() -> bool:
    """True in a worker started by a launcher (torchrun and the deepspeed launcher set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def bind(parent: Optional[int] = None, use_prctl: bool = True, poll_s: float = 1.0) -> str:
    """Exit when `parent` (default: the parent at start) dies; returns 'prctl' or 'watchdog'."""
    parent = PARENT_AT_START if parent is None else parent
    how = "prctl" if use_prctl and _set_pdeathsig(signal.SIGKILL) else "watchdog"
    if how == "watchdog":
        threading.Thread(target=_watch, args=(parent, poll_s), name="lifeline", daemon=True).start()
    if os.getppid() != parent:  # died before the signal was armed: it will never come
        _orphaned(parent)
    return how


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    _orphaned(parent)


def _orphaned(parent: int) -> None:
    print(f"colodiffusion: the launcher (pid {parent}) is gone; this worker exits.", file=sys.stderr, flush=True)
    os._exit(1)  # no cleanup that could wait on a dead peer (see the module docstring)
