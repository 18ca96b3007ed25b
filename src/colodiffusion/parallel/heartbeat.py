"""Which rank stopped answering: a heartbeat per rank in the launcher's rendezvous store.

Every collective waits at most `parallel.timeout_s` (the process group's timeout), but the error
it then raises names no rank (gloo: "Timed out waiting 5000ms for recv operation to complete").
So each rank runs a daemon thread that bumps a counter in the rendezvous store (torchrun's, at
MASTER_ADDR:MASTER_PORT) every `every` seconds. When a collective fails, `explain` reads the
counters twice, `2 * every` apart: a rank whose counter stood still is frozen, killed or cut off,
and the error names it. A rank whose counter still moves is alive but stuck outside the
collective (its own log says where).

Under NCCL, torch's watchdog enforces the same timeout and ends the process with its own message
(naming the operation) before the error reaches Python; the heartbeat still runs.
"""

from __future__ import annotations

import datetime
import os
import re
import threading
import time
from typing import Optional

import torch.distributed as dist

KEY = "colodiffusion/heartbeat/{}"


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the rank(s) that stopped answering."""


class Heartbeat:
    def __init__(self, store, rank: int, world_size: int, timeout_s: float):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.every = min(10.0, max(0.5, timeout_s / 10))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, rank: int, world_size: int, timeout_s: float) -> Optional["Heartbeat"]:
        """A heartbeat through its own client of the launcher's store; None without one (one process,
        or no MASTER_ADDR/MASTER_PORT), and then errors name no rank."""
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
        if world_size < 2 or not host or not port.isdigit():
            return None
        try:
            store = dist.TCPStore(
                host, int(port), is_master=False, timeout=datetime.timedelta(seconds=min(timeout_s, 60))
            )
        except (RuntimeError, OSError):  # DistNetworkError: training goes on, errors just name no rank
            return None
        return cls(store, rank, world_size, timeout_s)

    def _beat(self) -> None:
        while True:
            try:
                self.store.add(KEY.format(self.rank), 1)
            except Exception:  # the store is gone (its launcher died): nobody is left to read beats
                return
            if self._stop.wait(self.every):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every + 1)

    def counts(self) -> dict[int, int]:
        """Every other rank's beat count (ranks that never beat are left out)."""
        keys = {r: KEY.format(r) for r in range(self.world_size) if r != self.rank}
        present = {r: k for r, k in keys.items() if self.store.check([k])}
        return {r: int(self.store.get(k)) for r, k in present.items()}

    def silent_ranks(self) -> list[int]:
        before = self.counts()
        time.sleep(2 * self.every)
        after = self.counts()
        return [r for r in range(self.world_size) if r != self.rank and after.get(r) == before.get(r)]


def is_collective_failure(exc: BaseException) -> bool:
    """torch.distributed's own errors, and gloo's (plain RuntimeErrors that carry gloo's source path)."""
    msg = str(exc)
    return (
        isinstance(exc, dist.DistError)
        or isinstance(exc, RuntimeError)
        and ("gloo" in msg or "Timed out waiting" in msg)
    )


def explain(
    exc: BaseException, heartbeat: Optional[Heartbeat], rank: int, timeout_s: float
) -> Optional[CollectiveError]:
    """A one-sentence CollectiveError naming the silent rank(s) for a collective failure, else None."""
    if not is_collective_failure(exc):
        return None
    detail = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    timed_out = re.search(r"time(d)? ?out", str(exc), re.IGNORECASE) is not None
    if timed_out:
        return CollectiveError(f"{_who(heartbeat)}, so the collective on rank {rank} gave up after parallel.timeout_s="
                               f"{timeout_s:g} s ({detail}); raise parallel.timeout_s if a rank was only slow.")
    return CollectiveError(f"{_who(heartbeat)}, so the collective on rank {rank} failed ({detail}).")


def _who(heartbeat: Optional[Heartbeat]) -> str:
    if heartbeat is None:
        return "a peer rank stopped answering (no heartbeat store to tell which)"
    try:
        silent = heartbeat.silent_ranks()
    except Exception as exc:
        return f"the rank that stopped answering is unknown (the heartbeat store cannot be read: {exc})"
    if not silent:
        return ("every other rank's heartbeat is alive, so one of them is stuck outside the collective "
                "(its log says where)")
    names = ", ".join(map(str, silent))
    return (
        f"rank{'s' if len(silent) > 1 else ''} {names} stopped answering (heartbeat stopped: frozen, killed or cut off)"
    )
