"""Start `torchrun` (gloo on CPU) or a plain python process for the distributed tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parents[2] / "src"


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def torchrun(nproc: int, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    # --standalone: a local rendezvous on a free port, so concurrent test runs do not collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def python(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env(), capture_output=True, text=True, timeout=timeout)
