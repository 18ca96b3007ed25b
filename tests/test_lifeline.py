"""A worker bound with `lifeline.bind` exits when its launcher dies (prctl on Linux, or the watchdog
thread), and at once if the launcher was already gone when it bound."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import procs

# The "launcher": starts a worker that binds to it, prints the worker's pid, then waits to be killed.
LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(worker.pid, flush=True)
time.sleep(600)
"""
# The worker says how it bound: with prctl asked for, the kernel's signal must be what kills it (a
# silent fall-back to the 0.1 s watchdog would pass the death check alone).
WORKER = """
from colodiffusion import lifeline
print(lifeline.bind(use_prctl={use_prctl}, poll_s=0.1), flush=True)
import time
time.sleep(600)
"""


def _gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not procs._alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("use_prctl", [True, False], ids=["prctl", "watchdog"])
def test_worker_exits_when_its_launcher_is_killed(use_prctl):
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WORKER.format(use_prctl=use_prctl)],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    worker = None
    try:
        worker = int(launcher.stdout.readline())
        assert launcher.stdout.readline().strip() == ("prctl" if use_prctl else "watchdog")  # bound, and how
        assert procs._alive(worker), "the worker exited before its launcher was killed"
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher only: the worker is not in its group's kill
        launcher.wait(10)
        assert _gone(worker, timeout=10), f"worker {worker} outlived its launcher by 10 s"
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
        if worker is not None and procs._alive(worker):
            os.kill(worker, signal.SIGKILL)
        launcher.wait(10)


def test_bind_exits_at_once_when_the_launcher_is_already_gone():
    # A launcher that has exited: the worker's parent is no longer it, as after a re-parenting.
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, timeout=60).stdout)
    code = f"from colodiffusion import lifeline; lifeline.bind(parent={gone}); print('still running')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "still running" not in out.stdout
    assert f"the launcher (pid {gone}) is gone" in out.stderr
