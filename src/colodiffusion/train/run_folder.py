"""The run folder holds one run: continued (`train.resume`), started over (`run.overwrite=true`), or
refused with one sentence that names both choices; two runs are never mixed in one folder.

`check` claims the folder (storage/owned.py: it must be new, empty or a run folder of ours, it is
locked for the run, and it may hold no links) and reads what is there; it runs before the data is
checked. `prepare` writes (after the data is checked), so a run that stops on bad data or a bad
choice leaves no run folder behind (a data source that indexes its shards under run.dir before the
check is undone by `removed_if_refused`). A resume that would change what the checkpoints mean
(`MEANING`: the data, the model, the seed, the batch) is refused before config.yaml is rewritten.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import OmegaConf

from colodiffusion.config import Config, ConfigError, to_yaml
from colodiffusion.storage import owned
from colodiffusion.storage.checkpoint import MANIFEST, step_folders
from colodiffusion.storage.files import write_text_atomic
from colodiffusion.train import signals

# Everything a run writes, removed by run.overwrite=true (components too: a tokenizer trained on
# other captions, or another seed's autoencoder, would mix the old run into the new one).
RUN_OUTPUTS = ("checkpoints", "final", "lora", "samples", "tensorboard", "components", "metrics.jsonl",
               "bad_samples.jsonl", ".tmp-final", ".tmp-lora", ".replaced-final", ".replaced-lora")
# A run that never reached a checkpoint restarts from its beginning: its logs go with it.
LOGS = ("metrics.jsonl", "bad_samples.jsonl", "tensorboard", "samples")
# What a checkpoint's weights, optimizer state and data position were made with: a resume that changes
# one of them would continue another run's checkpoints as if they were this one's.
MEANING = ("model.preset", "model.pretrained", "model.init", "model.revision", "model.variant", "model.vae",
           "model.text_encoder", "model.tokenizer", "model.train_text_encoder", "model.prediction_type",
           "train.lora.rank", "train.lora.alpha", "train.lora.target_modules", "train.lora.text_encoder",
           "train.seed", "train.batch_size", "train.grad_accum", "train.optimizer",
           "data.source", "data.path", "data.resolution", "data.val_fraction", "data.val_path", "data.class_path",
           "data.repeats", "diffusion.num_train_timesteps", "diffusion.beta_start", "diffusion.beta_end",
           "diffusion.beta_schedule")
PATH_KEYS = {"model.pretrained", "model.vae", "model.text_encoder", "model.tokenizer", "data.path", "data.val_path",
             "data.class_path"}


def previous_run(run_dir: Path) -> Optional[str]:
    """What an earlier run left that a new one would mix with (None if nothing)."""
    steps = step_folders(run_dir / "checkpoints")
    if steps:
        return f"checkpoints up to step {int(steps[-1].name[5:])}"
    if (run_dir / "final").exists():
        return "a final model in final/"
    return None


def is_legacy_run(run_dir: Path) -> bool:
    """What a version before the run marker left: checkpoint folders, or a sealed final/ or component."""
    return bool(step_folders(run_dir / "checkpoints")) or (run_dir / "final" / MANIFEST).is_file() or \
        any((run_dir / "components").glob(f"*/{MANIFEST}"))


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


def check(cfg: Config, backend, run_dir: Path) -> Optional[owned.FolderLock]:
    """Claim `run_dir` for this run (the main rank holds the returned lock until it releases it), or
    raise ConfigError on every rank: someone else's folder, another trainer in it, links in it, or a
    run this one would mix with."""
    lock, problem, new = None, None, not run_dir.exists()
    if backend.is_main:
        try:
            lock = owned.claim(run_dir, "run", "run.dir", legacy=is_legacy_run)
            problem = _problem(cfg, run_dir)
        except ConfigError as exc:
            problem = str(exc)
    if not signals.all_ranks(backend, problem is None):
        if lock is not None:
            if new:
                shutil.rmtree(run_dir, ignore_errors=True)
            lock.release()
        raise ConfigError(problem or "the run folder check failed on the main rank (see its message)")
    return lock


def continues_checkpoints(cfg: Config, run_dir: Path) -> bool:
    """Whether this run resumes from a checkpoint of `run_dir` (the one its config.yaml describes)."""
    mode = signals.resume_mode(cfg.train.resume)
    return mode is not None and _inside(mode, run_dir) and bool(step_folders(run_dir / "checkpoints"))


def _plain(node: Any, path: str, default: Any = None) -> Any:
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _same(key: str, saved: Any, now: Any) -> bool:
    if saved == now:
        return True
    if key in PATH_KEYS and isinstance(saved, str) and isinstance(now, str):  # the same folder, spelt otherwise
        return Path(saved).exists() and Path(saved).resolve() == Path(now).resolve()
    return False


def changed_meaning(cfg: Config, run_dir: Path) -> Optional[str]:
    """A sentence naming the `MEANING` keys this config changes against the run's config.yaml, or None."""
    saved_file = run_dir / "config.yaml"
    if not continues_checkpoints(cfg, run_dir) or not saved_file.is_file():
        return None
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_file), resolve=False)
    except Exception:  # YAML errors come in many types
        return (f"'{saved_file}' cannot be read, so nothing says what the checkpoints in '{run_dir}' were trained "
                "with; restore it, or start over with run.overwrite=true")
    now = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)), resolve=False)
    defaults = OmegaConf.to_container(OmegaConf.create(to_yaml(Config())), resolve=False)
    # A key an older version did not write had its default then.
    was = {k: _plain(saved, k, _plain(defaults, k)) for k in MEANING}
    changed = [k for k in MEANING if not _same(k, was[k], _plain(now, k))]
    if not changed:
        return None
    diffs = ", ".join(f"{k}: {was[k]!r} -> {_plain(now, k)!r}" for k in changed)
    return (f"train.resume would continue the checkpoints in '{run_dir}' with a config that changes what they were "
            f"trained with ({diffs}); resume with the run's own values (its config.yaml), or start over with "
            "run.overwrite=true or in another run.dir")


@contextmanager
def removed_if_refused(backend, run_dir: Path) -> Iterator[None]:
    """Remove `run_dir` again if it did not exist before, this run claimed it and the checks inside the
    block fail (a folder another trainer made meanwhile is its own)."""
    new, before = not run_dir.exists(), owned.locks_of(run_dir)
    try:
        yield
    except Exception:
        claimed = owned.locks_of(run_dir) - before
        if new and backend.is_main and claimed:
            shutil.rmtree(run_dir, ignore_errors=True)
        owned.release_fds(claimed)
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
    create the folders and write config.yaml. A restarted worker (torchrun, SLURM) never clears. A
    resume whose config changes what the checkpoints mean is refused first (on every rank)."""
    problem = changed_meaning(cfg, run_dir) if backend.is_main else None
    if not signals.all_ranks(backend, problem is None):
        raise ConfigError(problem or "the run's config.yaml check failed on the main rank (see its message)")
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
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
    backend.barrier()
