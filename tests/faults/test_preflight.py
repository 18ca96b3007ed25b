"""Preflight: each problem is found before training, in one sentence."""

from __future__ import annotations

import shutil
import types
from collections import namedtuple

import pytest
import torch

from colodiffusion.config import ConfigError, load_config
from colodiffusion.data import build_dataset
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
    preflight.check(cfg, _backend(), tmp_path / "run", build_dataset(cfg))


def test_unwritable_run_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError) as e:
        preflight.check(cfg, _backend(), blocker / "run", build_dataset(cfg))
    assert "is not writable" in _one_sentence(e)


def test_not_enough_free_space(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(ConfigError) as e:
        preflight.check(cfg, _backend(), tmp_path / "run", build_dataset(cfg))
    assert "1 MiB free but one checkpoint needs about" in _one_sentence(e)


class Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        raise OSError("image file is truncated")


def test_unreadable_data(tmp_path):
    with pytest.raises(ConfigError) as e:
        preflight.check(_cfg(tmp_path), _backend(), tmp_path / "run", Broken())
    assert "first training sample cannot be read" in _one_sentence(e)


def test_batch_larger_than_the_data(tmp_path):
    cfg = _cfg(tmp_path, "train.batch_size=32")
    with pytest.raises(ConfigError) as e:
        preflight.check(cfg, _backend(), tmp_path / "run", build_dataset(cfg))
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


def test_signal_sets_the_stop_flag_and_second_signal_is_not_swallowed():
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
