"""Preemption and restarts: SIGTERM / SIGUSR1 finish the step, checkpoint, exit 0.

SLURM (`#SBATCH --signal=USR1@120`, or the SIGTERM before a kill) and Kubernetes ask a job to
stop with a signal. `install()` replaces the handlers so that a signal only sets a flag; the
loop asks `stop_requested(backend, step)` after each step. In distributed runs the flag is
all-reduced through the backend (any rank signalled -> every rank stops after the same step),
every `train.preempt_check_every` steps so that a step does not pay a host sync. A second
signal of the same kind while stopping gets the default action (the process dies).

Restarts: a process restarted by `torchrun --max-restarts` (TORCHELASTIC_RESTART_COUNT > 0) or
requeued by SLURM (SLURM_RESTART_COUNT > 0) resumes from the newest intact checkpoint by itself
when `train.resume` is not set (`resume_mode`).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import torch

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)

_received: Optional[int] = None
_previous: dict[int, object] = {}


def _handler(signum, frame) -> None:
    global _received
    if _received == signum:  # asked twice: stop waiting for the step and the checkpoint
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received = signum


def install() -> None:
    """Catch SIGTERM and SIGUSR1 (main thread only; elsewhere signals keep their default)."""
    global _received
    _received = None
    if threading.current_thread() is not threading.main_thread():
        return
    for s in SIGNALS:
        _previous[s] = signal.signal(s, _handler)


def uninstall() -> None:
    """Give the signals back and forget a stop asked of the run that is over (a later first stage,
    e.g. `cache` or a second run in the same process, must not stop for it)."""
    global _received
    _received = None
    for s, h in list(_previous.items()):
        signal.signal(s, h)
        del _previous[s]


class Stopped(Exception):
    """A stop signal arrived in a phase that has nothing to checkpoint (the tiny preset's first stage):
    the run ends there, and the next start does that phase again."""


def check_stopped(phase: str) -> None:
    """Raise Stopped if a stop signal arrived (call it between the steps of `phase`)."""
    if _received is not None:
        raise Stopped(f"stopped by {received()} during {phase}, before the first checkpoint; the next start "
                      "(train.resume=auto) does it again")


def received() -> Optional[str]:
    return signal.Signals(_received).name if _received is not None else None


def any_rank(backend, flag: bool) -> bool:
    """True if `flag` is true on any rank (a collective in distributed runs: call it on every rank)."""
    if backend.world_size == 1:
        return flag
    t = torch.tensor(1.0 if flag else 0.0, device=backend.device)
    return bool(backend.all_reduce_mean(t).item() > 0)


def all_ranks(backend, flag: bool) -> bool:
    return not any_rank(backend, not flag)


def broadcast_int(backend, value: int) -> int:
    """The main rank's `value` on every rank, through `all_reduce_mean` (the Backend interface):
    the main rank sends (value, 1), the others (0, 0); the ratio of the means is `value`."""
    if backend.world_size == 1:
        return value
    t = torch.tensor([float(value), 1.0] if backend.is_main else [0.0, 0.0], dtype=torch.float64, device=backend.device)
    mean = backend.all_reduce_mean(t).cpu()
    return int(round(float(mean[0] / mean[1])))


def stop_requested(backend, step: int, every: int = 1) -> bool:
    if backend.world_size == 1:
        return _received is not None
    if step % every:
        return False
    return any_rank(backend, _received is not None)


def restart_count() -> int:
    counts = [os.environ.get(k, "0") for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")]
    return max(int(c) if c.isdigit() else 0 for c in counts)


def resume_mode(resume: Optional[str]) -> Optional[str]:
    """`train.resume`, or 'auto' when unset in a restarted/requeued process."""
    if resume:
        return resume
    return "auto" if restart_count() > 0 else None
