"""The run folder holds one run: continued (`train.resume`), started over (`run.overwrite=true`), or
refused with one sentence that names both choices; two runs are never mixed in one folder.

`check` only reads (it runs before the data is checked); `prepare` writes (after the data is
checked), so a run that stops on bad data or a bad choice leaves no run folder behind (a data
source that indexes its shards under run.dir before the check is undone by `removed_if_refused`).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from colodiffusion.config import Config, ConfigError, to_yaml
from colodiffusion.storage.checkpoint import step_folders
from colodiffusion.train import signals

# Everything a run writes, removed by run.overwrite=true (components too: a tokenizer trained on
# other captions, or another seed's autoencoder, would mix the old run into the new one).
RUN_OUTPUTS = ("checkpoints", "final", "lora", "samples", "tensorboard", "components", "metrics.jsonl",
               "bad_samples.jsonl", ".tmp-final", ".tmp-lora", ".replaced-final", ".replaced-lora")
# A run that never reached a checkpoint restarts from its beginning: its logs go with it.
LOGS = ("metrics.jsonl", "bad_samples.jsonl", "tensorboard", "samples")


def previous_run(run_dir: Path) -> Optional[str]:
    """What an earlier run left that a new one would mix with (None if nothing)."""
    steps = step_folders(run_dir / "checkpoints")
    if steps:
        return f"checkpoints up to step {int(steps[-1].name[5:])}"
    if (run_dir / "final").exists():
        return "a final model in final/"
    return None


def _inside(path: str, folder: Path) -> bool:
    return path == "auto" or Path(path).resolve().is_relative_to(folder.resolve())


def _problem(cfg: Config, run_dir: Path) -> Optional[str]:
    resume = signals.resume_mode(cfg.train.resume)  # 'auto' by itself in a restarted worker
    continues_here = resume is not None and _inside(resume, run_dir)
    if cfg.run.overwrite and cfg.train.resume and continues_here:
        return (f"run.overwrite=true starts the run in '{run_dir}' over and train.resume={cfg.train.resume} "
                "continues it; give only one of them")
    found = previous_run(run_dir)
    if found and not cfg.run.overwrite and not continues_here:  # a checkpoint from elsewhere would mix too
        return (f"run.dir '{run_dir}' already holds a run ({found}); continue it with train.resume=auto, or "
                "start over with run.overwrite=true (which deletes its checkpoints, final/, samples and logs)")
    return None


def check(cfg: Config, backend, run_dir: Path) -> None:
    """Raise ConfigError (on every rank) if this run would mix with the one already in `run_dir`."""
    problem = _problem(cfg, run_dir) if backend.is_main else None
    if not signals.all_ranks(backend, problem is None):
        raise ConfigError(problem or "the run folder check failed on the main rank (see its message)")


@contextmanager
def removed_if_refused(backend, run_dir: Path) -> Iterator[None]:
    """Remove `run_dir` again if it did not exist before and the checks inside the block fail."""
    new = not run_dir.exists()
    try:
        yield
    except Exception:
        if new and backend.is_main:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _remove(run_dir: Path, names) -> list[str]:
    gone = []
    for name in names:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        gone.append(name)
    return gone


def prepare(cfg: Config, backend, run_dir: Path) -> None:
    """Clear what `run.overwrite` asks for (or the logs of an attempt that never checkpointed), then
    create the folders and write config.yaml. A restarted worker (torchrun, SLURM) never clears."""
    if backend.is_main:
        restarted = not cfg.train.resume and signals.restart_count() > 0
        if cfg.run.overwrite and not restarted:
            gone = _remove(run_dir, RUN_OUTPUTS)
            if gone:
                print(f"run.overwrite=true: removed {', '.join(gone)} from {run_dir}")
        elif not step_folders(run_dir / "checkpoints"):
            gone = _remove(run_dir, LOGS)
            if gone:
                print(f"removed {', '.join(gone)} of an earlier attempt in {run_dir} that never reached a checkpoint")
        for sub in ("", "checkpoints", "samples"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    backend.barrier()
