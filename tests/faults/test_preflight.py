"""Preflight: each problem is found before training, in one sentence."""

from __future__ import annotations

import shutil
import types
from collections import namedtuple

import pytest
import torch
from datagen import make_folder

from colodiffusion.config import ConfigError, load_config
from colodiffusion.data import build_dataset, dataset_args
from colodiffusion.data.transforms import BadSample
from colodiffusion.train import preflight, signals


def _backend():
    return types.SimpleNamespace(device=torch.device("cpu"), world_size=1, dp_size=1, rank=0, is_main=True)


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run.dir={tmp_path / 'run'}", "data.num_samples=16", "train.batch_size=4", *extra])


def _one_sentence(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.count(". ") == 0
    return msg


def test_a_healthy_run_passes(tmp_path):
    cfg = _cfg(tmp_path)
    preflight.check(cfg, _backend(), tmp_path / "run", build_dataset(*dataset_args(cfg)))  # raises on any problem
    assert (tmp_path / "run" / "checkpoints").is_dir()  # the write probe ran, and left nothing behind
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_unwritable_run_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError) as e:
        preflight.check(cfg, _backend(), blocker / "run", build_dataset(*dataset_args(cfg)))
    assert "is not writable" in _one_sentence(e)


def test_not_enough_free_space(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(ConfigError) as e:
        preflight.check(cfg, _backend(), tmp_path / "run", build_dataset(*dataset_args(cfg)))
    assert "1 MiB free but one checkpoint needs about" in _one_sentence(e)


class Broken(torch.utils.data.Dataset):
    """Every sample is bad, the way an image source reports it."""

    def __len__(self):
        return 100

    def key(self, i):
        return f"img{i}.png"

    def __getitem__(self, i):
        raise BadSample("truncated" if i % 4 else "zero_byte")


def test_unreadable_data_says_how_many_were_bad(tmp_path):
    with pytest.raises(ConfigError) as e:
        preflight.check(_cfg(tmp_path), _backend(), tmp_path / "run", Broken())
    msg = _one_sentence(e)
    assert "none of the 64 samples probed can be used (64 bad: 48 truncated, 16 zero_byte, such as 'img0.png')" in msg


class Failing(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        raise OSError("the storage is unreachable")


def test_a_reader_failure_is_one_sentence(tmp_path):
    with pytest.raises(ConfigError) as e:
        preflight.check(_cfg(tmp_path), _backend(), tmp_path / "run", Failing())
    assert "the training data cannot be read (OSError: the storage is unreachable)" in _one_sentence(e)


def _folder_cfg(tmp_path, n, bad):
    """A folder of n images whose first `bad` (in file order) are zero-byte files."""
    root = make_folder(tmp_path / "f", n)
    for path in sorted(p for p in root.iterdir() if p.suffix != ".txt")[:bad]:
        path.write_bytes(b"")
    return _cfg(tmp_path, "data.source=folder", f"data.path={root}", "data.resolution=16")


def test_a_bad_first_sample_does_not_stop_the_run(tmp_path):
    cfg = _folder_cfg(tmp_path, 4, bad=1)
    dataset = build_dataset(*dataset_args(cfg))
    with pytest.raises(BadSample):
        dataset[0]  # the first sample is the bad one
    preflight.check(cfg, _backend(), tmp_path / "run", dataset)


def test_mostly_bad_data_stops_before_training(tmp_path):
    cfg = _folder_cfg(tmp_path, 20, bad=12)
    with pytest.raises(ConfigError) as e:
        preflight.check(cfg, _backend(), tmp_path / "run", build_dataset(*dataset_args(cfg)))
    msg = _one_sentence(e)
    assert "12 of the 20 samples probed of data.path" in msg and "are bad (12 zero_byte, such as '000000" in msg
    assert "data.max_bad_fraction=0.05 allows" in msg


def test_batch_larger_than_the_data(tmp_path):
    cfg = _cfg(tmp_path, "train.batch_size=32")
    with pytest.raises(ConfigError) as e:
        preflight.check(cfg, _backend(), tmp_path / "run", build_dataset(*dataset_args(cfg)))
    assert "fewer than one batch" in _one_sentence(e)


def test_checkpoint_size_estimate_covers_a_real_checkpoint(tmp_path):
    """The estimate is from a meta-device build; compare it with a real tiny checkpoint's bytes."""
    from colodiffusion.models.presets import build_unet, get_preset
    from colodiffusion.storage import checkpoint

    cfg = _cfg(tmp_path)
    unet = build_unet(get_preset("tiny"))
    opt = torch.optim.AdamW(unet.parameters())
    for p in unet.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()

    def write(folder):
        checkpoint.save_tensors(folder / "unet.safetensors", unet.state_dict())
        checkpoint.save_tensors(folder / "ema.safetensors", dict(unet.named_parameters()))
        torch.save({"optimizer": opt.state_dict()}, folder / "state.pt")
    folder = checkpoint.save(tmp_path / "ck", 1, write, keep=1)
    actual = sum(p.stat().st_size for p in folder.iterdir())
    estimate = preflight.checkpoint_bytes(cfg)
    assert actual <= estimate <= 1.5 * actual


def test_restart_resumes_by_itself(monkeypatch):
    assert signals.resume_mode(None) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert signals.resume_mode(None) == "auto"
    assert signals.resume_mode("/some/ckpt") == "/some/ckpt"


def test_signal_sets_the_stop_flag():
    import os
    import signal

    backend = _backend()
    signals.install()
    try:
        assert not signals.stop_requested(backend, 1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.stop_requested(backend, 1) and signals.received() == "SIGUSR1"
    finally:
        signals.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    assert signals.received() is None  # the stop was the finished run's: a later first stage must not see it
    signals.check_stopped("a later first stage")


SECOND_SIGNAL = """
import os, signal, sys
from colodiffusion.train import signals
signals.install()
os.kill(os.getpid(), signal.SIGUSR1)
assert signals.received() == "SIGUSR1", "the first signal only sets the flag"
print("survived the first signal", flush=True)
os.kill(os.getpid(), signal.SIGUSR1)
print("survived the second signal", flush=True)
"""


def test_second_signal_is_not_swallowed():
    """The second SIGUSR1 gets the default action: the process dies of it (in a child process)."""
    import signal
    import subprocess
    import sys

    from faultkit import env

    p = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], capture_output=True, text=True, timeout=60, env=env())
    assert "survived the first signal" in p.stdout, p.stderr
    assert "survived the second signal" not in p.stdout
    assert p.returncode == -signal.SIGUSR1
