"""Shared pieces of the fault-injection suite: tiny run settings, a first stage built once, a
subprocess launcher, and a summary (kills survived, faults injected, anything lost) printed as
one JSON line at the end of the session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

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
    e = {k: v for k, v in os.environ.items() if not k.startswith(("COLODIFFUSION_FAULT", "TORCHELASTIC", "SLURM_RESTART"))}
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


@pytest.fixture(scope="session")
def components(tmp_path_factory) -> Path:
    """The tokenizer, text encoder and trained first stage, built once and copied into each run."""
    from colodiffusion.config import load_config
    from colodiffusion.data import build_dataset
    from colodiffusion.train.first_stage import frozen_components

    root = tmp_path_factory.mktemp("shared")
    cfg = load_config(None, overrides(root / "run"))
    frozen_components(cfg, build_dataset(cfg), root / "components", torch.device("cpu"), show_progress=False)
    return root / "components"


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
