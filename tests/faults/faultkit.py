"""Shared pieces of the fault-injection suite: tiny run settings, a first stage built once, a
subprocess launcher, and a summary (kills survived, faults injected, anything lost) printed as
one JSON line at the end of the session."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import procs

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

# Tiny and fast: 16x16 latents, batch 4, a checkpoint every 2 steps, metrics every step.
BASE = [
    "first_stage.steps=2", "first_stage.scale_samples=16", "data.num_samples=64", "train.batch_size=4",
    "train.sample_every=0", "train.log_every=1", "train.checkpoint_every=2", "train.keep_checkpoints=2",
    "train.warmup_steps=2",
]

REPORT: dict = {"kills_survived": 0, "kills_inside_save": 0, "faults_injected": Counter(), "lost": []}


def pytest_terminal_summary(terminalreporter):
    if not (REPORT["kills_survived"] or REPORT["faults_injected"] or REPORT["lost"]):
        return
    summary = {**REPORT, "faults_injected": dict(REPORT["faults_injected"])}
    terminalreporter.write_line("fault-injection summary: " + json.dumps(summary, sort_keys=True))


@pytest.fixture
def report():
    return REPORT


def overrides(run_dir: Path, *extra: str) -> list[str]:
    return [f"run.dir={run_dir}", *BASE, *extra]


def env(**extra: str) -> dict:
    e = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COLODIFFUSION_FAULT", "TORCHELASTIC", "SLURM_RESTART"))
    }
    e.update(PYTHONPATH=str(SRC) + os.pathsep + e.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
             TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    e.update(extra)
    return e


def launch(run_dir: Path, *extra: str, **env_extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "colodiffusion", "train", *overrides(run_dir, *extra)]
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    return subprocess.Popen(cmd, env=env(**env_extra), stdout=log, stderr=subprocess.STDOUT)


def run_to_end(run_dir: Path, *extra: str, timeout: float = 240, **env_extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "colodiffusion", "train", *overrides(run_dir, *extra)]
    return subprocess.run(cmd, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)


def start_job(cmd: list[str], log: Path, **env_extra: str) -> tuple[subprocess.Popen, str]:
    """Start a launcher (torchrun, main.py) in a session of its own; its workers, which torchrun starts in
    sessions of their own, are found again by the returned launch id in their environment."""
    launch_id = procs.new_id()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, env=env(**{procs.LAUNCH: launch_id}, **env_extra), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, launch_id


def workers(launch_id: str, launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the launcher's training processes (its children, each with a RANK)."""
    children = [pid for pid in procs.marked(procs.LAUNCH, launch_id) if procs.ppid(pid) == launcher.pid]
    ranks = {pid: procs.getenv(pid, "RANK") for pid in children}
    return {int(rank): pid for pid, rank in ranks.items() if rank is not None}


def stop_job(proc: subprocess.Popen, launch_id: str) -> None:
    """SIGKILL the launcher's process group and every process of the job wherever it was re-parented
    (run in a `finally`, so a failed assertion leaves nothing running)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    procs.kill(procs.LAUNCH, launch_id, procs.marked(procs.LAUNCH, launch_id))
    proc.wait(60)
    left = procs.wait_gone(procs.LAUNCH, launch_id, timeout=30)
    assert not left, f"still alive after SIGKILL: {procs.describe(left)}"


def wait_for_step(proc: subprocess.Popen, run_dir: Path, after: int = 0, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while len(metrics(run_dir)) <= after:
        assert proc.poll() is None, f"the launcher exited with {proc.returncode} before a training step"
        assert time.monotonic() < end, "timed out waiting for a training step"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def components(tiny_components) -> Path:
    """The tokenizer, text encoder and trained first stage, built once (tests/conftest.py: BASE trains
    them with the same first_stage settings, seed and data) and copied into each run."""
    return tiny_components


@pytest.fixture
def new_run(tmp_path, components):
    """A fresh run folder that already holds the shared components."""
    def make(name: str = "run") -> Path:
        run_dir = tmp_path / name
        run_dir.mkdir()
        shutil.copytree(components, run_dir / "components")
        return run_dir
    return make


def metrics(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by a kill
            pass
    return out


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Everything that defines the continuation: weights, EMA, optimizer, schedule, data, RNG."""
    from safetensors.torch import load_file

    out = {}
    for name in ("unet", "ema"):
        out.update({f"{name}.{k}": v for k, v in load_file(str(folder / f"{name}.safetensors")).items()})
    state = torch.load(folder / "state.pt", weights_only=True)
    for i, s in state["optimizer"]["state"].items():
        out.update({f"opt.{i}.{k}": v if torch.is_tensor(v) else torch.tensor(v) for k, v in s.items()})
    out["step"] = torch.tensor(state["step"])
    out["loader"] = torch.tensor([state["loader"]["epoch"], state["loader"]["consumed"]])
    out["lr"] = torch.tensor(state["lr_scheduler"]["_last_lr"])
    for k, v in torch.load(folder / "rank_0.pt", weights_only=True).items():
        out[f"rng.{k}"] = v
    return out


def differences(a: Path, b: Path) -> list[str]:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    if ta.keys() != tb.keys():
        return sorted(set(ta) ^ set(tb))
    return [k for k in ta if not torch.equal(ta[k], tb[k])]
