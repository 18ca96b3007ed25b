"""Constants shared by the tests (imported by name: `from common import TINY`)."""

import io
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The smallest run that still exercises every part of the trainer.
TINY = [
    "data.num_samples=64", "train.batch_size=8", "first_stage.steps=2", "first_stage.scale_samples=16",
    "train.sample_every=0", "train.log_every=1", "train.warmup_steps=2", "train.lr=1e-3",
]


def run_cli(*argv) -> subprocess.CompletedProcess:
    """`colodiffusion ARGV` through `colodiffusion.cli.main` in this process, its output captured: the
    command's own code, without the ~6 CPU-s a new interpreter spends importing torch, diffusers and
    transformers (a tiny `train` is ~7 CPU-s in a process of its own, ~1 here). What only a process of its
    own shows stays in one: signals, the environment read at import (HF_HUB_OFFLINE), import noise, the
    parser's imports, torchrun. An exception the CLI does not turn into a one-sentence error (exit 2)
    propagates, failing the test with its traceback as a crash of the command would."""
    from colodiffusion.cli import main

    args = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    return subprocess.CompletedProcess(["colodiffusion", *args], code, out.getvalue(), err.getvalue())


def built_once(config, tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name`, filled by `build(folder)` once per test session. Under pytest-xdist the first
    worker that asks builds it under a file lock in the session's shared temp folder and the others read
    it; without xdist it lives in this session's own temp folder. (An xdist worker is told by its config,
    not by PYTEST_XDIST_WORKER, which a pytest started inside a test inherits.)"""
    from filelock import FileLock

    if not hasattr(config, "workerinput"):
        folder = tmp_path_factory.mktemp(name) / name
        build(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # shared by this session's workers
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not folder.exists():
            partial = root / f".{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            build(partial)
            partial.rename(folder)
    return folder


def index_dataset(n: int):
    """A dataset whose sample i carries i (as a 1-element tensor and as its caption): the loader
    tests read back which samples they were dealt."""
    import torch
    from torch.utils.data import Dataset

    class Indices(Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"pixel_values": torch.tensor([float(i)]), "caption": str(i)}

    return Indices()


@contextmanager
def crash_at(step: int):
    """Inside: the loop's training step raises RuntimeError("simulated crash") when it reaches `step`
    (a run that dies mid-way, after the checkpoints before it)."""
    from colodiffusion.train import loop

    real = loop.Trainer.train_step

    def crashing(trainer):
        if trainer.state.step == step:
            raise RuntimeError("simulated crash")
        return real(trainer)

    loop.Trainer.train_step = crashing
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            yield
    finally:
        loop.Trainer.train_step = real
