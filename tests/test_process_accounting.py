"""The suite's own process accounting (conftest.py, procs.py), run on a small inner test session: a
test that leaves a process running fails; a process still alive at the end of the session (an
orphan re-parented to init) fails the run and is killed; a process of another session is left alone."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import procs

HERE = Path(__file__).resolve().parent
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]

INNER = """
import subprocess, sys
from pathlib import Path

import pytest

SLEEPER = {sleeper!r}


@pytest.fixture(scope="session")
def orphan():
    # A grandchild in a session of its own whose parent exits at once: re-parented to init, as
    # torchrun's workers are when torchrun is killed. Session fixtures carry no test id.
    code = ("import subprocess, sys; print(subprocess.Popen(sys.argv[1:], start_new_session=True, "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")
    pid = subprocess.run([sys.executable, "-c", code, *SLEEPER], capture_output=True, text=True).stdout.strip()
    Path({pidfile!r}).write_text(pid)


def test_uses_the_orphan(orphan):
    pass


def test_leaves_a_child_running():
    subprocess.Popen(SLEEPER)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_leftovers_fail_and_are_killed_and_other_sessions_are_left_alone(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    for name in ("procs.py", "common.py"):
        shutil.copy(HERE / name, inner / name)
    conftest = (HERE / "conftest.py").read_text()
    conftest = re.sub(r"^(TEST_GRACE_S|SESSION_GRACE_S) = \d+", r"\1 = 1", conftest, flags=re.M)
    (inner / "conftest.py").write_text(conftest)
    pidfile = tmp_path / "orphan.pid"
    (inner / "test_inner.py").write_text(INNER.format(sleeper=SLEEPER, pidfile=str(pidfile)))
    # Another test run's process on the same machine: other ids in its environment.
    foreign_env = {**os.environ, procs.SESSION: procs.new_id(), procs.TEST: procs.new_id()}
    foreign = subprocess.Popen(SLEEPER, env=foreign_env)
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(inner)],
                             cwd=inner, capture_output=True, text=True, timeout=300)
        text = out.stdout + out.stderr
        assert out.returncode != 0, text
        assert "the test left 1 process(es) running (now killed)" in text, text
        assert "1 process(es) started by the tests were still alive at the end of the session" in text, text
        orphan = int(pidfile.read_text())
        end = time.monotonic() + 10
        while procs._alive(orphan) and time.monotonic() < end:
            time.sleep(0.05)
        assert not procs._alive(orphan), "the session check did not kill the orphan"
        assert foreign.poll() is None, "a process of another session was killed"
    finally:
        foreign.send_signal(signal.SIGKILL)
        foreign.wait(10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_child_whose_environment_reads_empty_for_a_moment_is_still_found(monkeypatch):
    """The teardown scan can meet a just-started child before the kernel has set up its environment
    (it reads as empty): the scan waits for it instead of missing it."""
    test_id = procs.new_id()
    monkeypatch.setenv(procs.TEST, test_id)
    child = subprocess.Popen(SLEEPER)
    real, reads = procs._read_environ, []

    def empty_at_first(pid):
        if pid == child.pid and len(reads) < 3:
            reads.append(pid)
            return b""
        return real(pid)

    monkeypatch.setattr(procs, "_read_environ", empty_at_first)
    try:
        assert procs.marked(procs.TEST, test_id) == [child.pid] and len(reads) == 3
    finally:
        child.kill()
        child.wait(10)
