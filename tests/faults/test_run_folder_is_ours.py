"""A run folder is ours, marked and locked: a user's folder is never emptied, a received run folder's
links are never written through, two trainers never share a folder, and a resume never continues
checkpoints with a config that changes what they mean (issue 22, items 1, 3, 5 and 9)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from colodiffusion.config import ConfigError, load_config
from colodiffusion.train import loop, run_folder

from common import TINY


class _OneProcess:
    is_main, world_size, rank = True, 1, 0

    def barrier(self):
        pass


ONE = _OneProcess()


def _cfg(run: Path, *extra: str):
    return load_config(None, [*TINY, f"run.dir={run}", *extra])


def _claim(run: Path, *extra: str):
    """What `train` does to the folder before and after the data check."""
    lock = run_folder.check(_cfg(run, *extra), ONE, run)
    try:
        run_folder.prepare(_cfg(run, *extra), ONE, run)
    except Exception:
        _free(lock)
        raise
    return lock


def _free(lock) -> None:
    if lock is not None:  # (main before the lock returned None)
        lock.release()


def _users_folder(root: Path) -> dict[Path, bytes]:
    files = {root / "holiday.jpg": b"a photo", root / "samples" / "mine.png": b"my sample",
             root / "metrics.jsonl": b'{"my": "numbers"}\n', root / "tensorboard" / "events": b"mine",
             root / "checkpoints" / "notes.txt": b"my notes", root / "components" / "x.bin": b"mine"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@pytest.mark.parametrize("extra", [(), ("run.overwrite=true",)])
def test_a_folder_that_was_never_a_run_is_refused_not_emptied(tmp_path, extra):
    files = _users_folder(tmp_path / "mine")
    with pytest.raises(ConfigError) as err:
        _claim(tmp_path / "mine", *extra)
    msg = str(err.value)
    assert "is not empty and is not a run folder of ours" in msg and "\n" not in msg
    assert all(p.read_bytes() == data for p, data in files.items())
    assert not (tmp_path / "mine" / ".colodiffusion.lock").exists()


def test_run_dir_root_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="run.dir '/' is not empty and is not a run folder of ours"):
        run_folder.check(_cfg(Path("/")), ONE, Path("/"))


def test_an_empty_folder_becomes_a_marked_run_folder(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    _free(_claim(run))
    assert (run / ".colodiffusion.json").is_file() and (run / "config.yaml").is_file()
    (run / "samples" / "step_00000001.png").write_bytes(b"ours")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    _free(_claim(run))  # ours now: an earlier attempt's logs are cleared
    assert not (run / "metrics.jsonl").exists()


def test_a_received_run_folder_with_links_is_refused_unwritten(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.yaml").write_text("someone else's\n")
    (outside / "log.jsonl").write_text("someone else's\n")
    run = tmp_path / "received"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "config.yaml").symlink_to(outside / "config.yaml")
    (run / "samples").symlink_to(outside)
    os.link(outside / "log.jsonl", run / "bad_samples.jsonl")
    for extra in (("train.resume=auto",), ("run.overwrite=true",)):
        with pytest.raises(ConfigError) as err:
            _claim(run, *extra)
        assert "holds links" in str(err.value) and "cp -rL" in str(err.value)
    assert (outside / "config.yaml").read_text() == "someone else's\n"
    assert (outside / "log.jsonl").read_text() == "someone else's\n"
    assert sorted(p.name for p in outside.iterdir()) == ["config.yaml", "log.jsonl"]
    (run / "config.yaml").unlink()
    (run / "samples").unlink()
    with pytest.raises(ConfigError, match="hard link"):
        _claim(run, "train.resume=auto")
    (run / "bad_samples.jsonl").unlink()
    # Links that stay inside, as wandb leaves them in RUN/wandb/, write nowhere else: a run with them resumes.
    (run / "wandb" / "run-1" / "logs").mkdir(parents=True)
    (run / "wandb" / "run-1" / "logs" / "debug.log").write_text("")
    (run / "wandb" / "latest-run").symlink_to("run-1")
    (run / "wandb" / "debug.log").symlink_to("run-1/logs/debug.log")
    _free(_claim(run, "train.resume=auto"))
    (run / "wandb" / "debug.log").unlink()
    (run / "wandb" / "debug.log").symlink_to("latest-run/../../../outside/log.jsonl")  # out, through a link
    with pytest.raises(ConfigError, match="symbolic link to .*, outside it"):
        _claim(run, "train.resume=auto")


def test_a_second_trainer_in_the_same_folder_gets_one_sentence(tmp_path):
    run = tmp_path / "run"
    first = _claim(run)
    with pytest.raises(ConfigError) as err:
        loop.train(_cfg(run, "train.max_steps=1"))
    msg = str(err.value)
    assert f"is in use by pid {os.getpid()}" in msg and "two runs never share a folder" in msg and "\n" not in msg
    assert (run / "config.yaml").is_file()  # the first run's folder is left as it was
    _free(first)
    _free(_claim(run))  # free again once the first one is done


def test_the_lock_is_held_for_the_whole_run_and_released_after(run_dir, monkeypatch):
    seen = []
    real = loop.Trainer.train_step

    def step_and_try_a_second_trainer(trainer):
        with pytest.raises(ConfigError, match="is in use by"):
            run_folder.check(_cfg(run_dir, "train.resume=auto"), ONE, run_dir)
        seen.append(trainer.state.step)
        return real(trainer)

    monkeypatch.setattr(loop.Trainer, "train_step", step_and_try_a_second_trainer)
    loop.train(_cfg(run_dir, "train.max_steps=1", "train.checkpoint_every=0"))
    assert seen == [0]
    _free(run_folder.check(_cfg(run_dir, "train.resume=auto"), ONE, run_dir))


def test_resume_refuses_a_config_that_changes_what_the_checkpoints_mean(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    run = tmp_path / "run"
    _free(_claim(run))
    (run / "checkpoints" / "step_00000002").mkdir()
    saved = (run / "config.yaml").read_text()
    for extra, keys in [(("train.seed=1",), ["train.seed: 0 -> 1"]),
                        (("train.batch_size=4", "data.resolution=16"), ["train.batch_size: 8 -> 4",
                                                                        "data.resolution: 32 -> 16"]),
                        (("data.source=folder", f"data.path={data}"), ["data.source: 'shapes' -> 'folder'",
                                                                       f"data.path: None -> '{data}'"])]:
        with pytest.raises(ConfigError) as err:
            _claim(run, "train.resume=auto", *extra)
        msg = str(err.value)
        assert all(k in msg for k in keys) and "run.overwrite=true" in msg and "\n" not in msg, msg
        assert (run / "config.yaml").read_text() == saved
    _free(_claim(run, "train.resume=auto", "train.max_steps=3", "train.lr=1e-4"))  # these may change
    assert "max_steps: 3" in (run / "config.yaml").read_text()
