"""Checkpoint files under attack: a crash at every point of a save, truncated and garbled files,
stale leftovers, a full disk, and a malicious pickle whose payload must never run."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

from faultkit import overrides

from colodiffusion.config import ConfigError, load_config
from colodiffusion.storage import checkpoint, faults
from colodiffusion.storage.checkpoint import CheckpointError


class Crash(BaseException):
    """Stands for SIGKILL in-process: nothing after the fault point runs."""


def _write(step: int):
    def write(folder: Path) -> None:
        checkpoint.save_tensors(folder / "unet.safetensors", {"w": torch.full((64,), float(step))})
        torch.save({"step": step}, folder / "state.pt")
    return write


POINTS = ["tensors_written", "files_written", "manifest_written", "replaced_aside", "published", "pruning"]


@pytest.mark.parametrize("point", POINTS)
def test_crash_at_each_point_of_a_save_leaves_an_intact_checkpoint(point, tmp_path, monkeypatch, report):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        checkpoint.save(root, step, _write(step), keep=2)
    resave = point == "replaced_aside"  # only a re-save of an existing step moves a folder aside

    def crash(name):
        if name == point:
            raise Crash(name)
    monkeypatch.setattr(faults, "point", crash)
    with pytest.raises(Crash):
        checkpoint.save(root, 4 if resave else 6, _write(4 if resave else 6), keep=2)
    report["faults_injected"][f"crash@{point}"] += 1
    monkeypatch.undo()

    checkpoint.recover(root)
    latest = checkpoint.find_latest(root, log=lambda m: None)
    expected = 6 if point in ("published", "pruning") else 4
    assert latest.name == f"step_{expected:08d}"
    assert checkpoint.load_state(latest / "state.pt")["step"] == expected
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    for p in checkpoint.step_folders(root):
        checkpoint.verify(p)  # nothing half-written or half-deleted carries a real name
    checkpoint.save(root, 8, _write(8), keep=2)  # and saving goes on
    assert [p.name for p in checkpoint.step_folders(root)][-1] == "step_00000008"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny in-process run with checkpoints at steps 2 and 4."""
    from colodiffusion.train.loop import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(load_config(None, overrides(run_dir, "train.max_steps=4", "train.keep_checkpoints=3")))
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def _resume(run_dir: Path, *extra: str):
    from colodiffusion.train.loop import train

    return train(load_config(None, overrides(run_dir, "train.max_steps=5", "train.resume=auto", *extra)))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garble(p: Path) -> None:
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid: mid + 64] = bytes(64)  # same size: only the hash can tell
    p.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("damage,file", [(_truncate, "unet.safetensors"), (_garble, "state.pt"),
                                         (_garble, "ema.safetensors"), (_truncate, "rank_0.pt"),
                                         (lambda p: p.unlink(), "manifest.json")])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(damage, file, run_copy, capsys, report):
    damage(run_copy / "checkpoints" / "step_00000004" / file)
    report["faults_injected"]["corrupt_checkpoint"] += 1
    _resume(run_copy)
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "falling back to the older checkpoint" in out
    assert "resumed from" in out and "step_00000002 at step 2" in out


@pytest.mark.slow
def test_explicit_corrupt_checkpoint_is_refused_in_one_sentence(run_copy, report):
    _truncate(run_copy / "checkpoints" / "step_00000004" / "unet.safetensors")
    report["faults_injected"]["corrupt_checkpoint"] += 1
    with pytest.raises(ConfigError) as e:
        checkpoint.resolve(run_copy / "checkpoints" / "step_00000004")
    msg = str(e.value)
    assert "truncated" in msg and "\n" not in msg


@pytest.mark.slow
def test_all_corrupt_stops_instead_of_silently_restarting(run_copy, report):
    for step in ("step_00000002", "step_00000004"):
        _garble(run_copy / "checkpoints" / step / "unet.safetensors")
    report["faults_injected"]["corrupt_checkpoint"] += 2
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint"):
        _resume(run_copy)


@pytest.mark.slow
def test_stale_leftovers_and_a_dangling_latest_pointer(run_copy, capsys):
    root = run_copy / "checkpoints"
    (root / ".tmp-step_00000006").mkdir()
    (root / ".tmp-step_00000006" / "unet.safetensors").write_bytes(b"half")
    (root / "latest").write_text("step_00000099\n")  # names a folder that does not exist
    _resume(run_copy)
    assert "resumed from" in capsys.readouterr().out
    assert not (root / ".tmp-step_00000006").exists()
    assert (root / "latest").read_text().strip() == "step_00000005"


class Payload:
    """Unpickling this calls os.mkdir(marker): the side effect the test looks for."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.slow
@pytest.mark.parametrize("file", ["state.pt", "rank_0.pt"])
def test_malicious_pickle_is_refused_and_never_runs(file, run_copy, tmp_path, report):
    folder = run_copy / "checkpoints" / "step_00000004"
    marker = tmp_path / "pwned"
    torch.save({"step": 4, "evil": Payload(marker)}, folder / file)
    checkpoint.write_manifest(folder, 4)  # an attacker can rewrite the manifest too
    report["faults_injected"]["malicious_pickle"] += 1
    with pytest.raises(ConfigError) as e:
        _resume(run_copy, f"train.resume={folder}")
    assert "refused" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists(), "the pickle payload ran"
    with pytest.raises(CheckpointError):
        checkpoint.load_state(folder / file)
    assert not marker.exists(), "the pickle payload ran"


def _enospc(target: str):
    real = os.fsync

    def fsync(fd):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if target in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    return fsync


@pytest.mark.slow
def test_disk_full_during_save_keeps_the_previous_checkpoint_and_stops(run_copy, monkeypatch, report):
    """The filesystem reports ENOSPC when the new checkpoint's files are flushed (fsync): the run
    stops with one sentence, the temporary folder is gone and step 4 is intact; resuming works."""
    from colodiffusion.train.loop import train

    monkeypatch.setattr(os, "fsync", _enospc(".tmp-step_00000006"))
    cfg = load_config(None, overrides(run_copy, "train.max_steps=6", "train.resume=auto"))
    with pytest.raises(CheckpointError) as e:
        train(cfg)
    report["faults_injected"]["disk_full"] += 1
    msg = str(e.value)
    assert "No space left on device" in msg and "step_00000004 is intact" in msg and "\n" not in msg
    root = run_copy / "checkpoints"
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    checkpoint.verify(root / "step_00000004")
    monkeypatch.undo()
    train(cfg)
    checkpoint.verify(root / "step_00000006")


@pytest.mark.slow
def test_disk_full_mid_write_of_a_tensor_file(run_copy, monkeypatch, report):
    from colodiffusion.train.loop import train

    real = checkpoint.save_file

    def half_then_full(tensors, path):
        real(tensors, path)
        _truncate(Path(path))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint, "save_file", half_then_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        train(load_config(None, overrides(run_copy, "train.max_steps=6", "train.resume=auto")))
    report["faults_injected"]["disk_full"] += 1
    assert checkpoint.find_latest(run_copy / "checkpoints", log=lambda m: None).name == "step_00000004"


# -- real write failures: a file-size limit (RLIMIT_FSIZE), not a mocked exception ----------------------
# Under the limit, a write past it fails with EFBIG as on a full disk, and each library reports it its
# own way: safetensors raises SafetensorError, torch.save a RuntimeError, DCP a CheckpointException.

LIMITED = Path(__file__).parent / "limited_rank.py"


def _limited_run(run_dir: Path, limit: int, *extra: str):
    import subprocess
    import sys

    from faultkit import env

    return subprocess.run([sys.executable, str(LIMITED), "train", *overrides(run_dir, "train.max_steps=4", *extra)],
                          env=env(LIMIT_BYTES=str(limit)), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("limit,fails_in", [(1_000_000, "unet.safetensors (safetensors)"),
                                            (7_000_000, "state.pt (torch.save)")])
def test_a_real_write_failure_is_one_sentence_and_loses_nothing(limit, fails_in, new_run, report):
    """The tiny UNet's weights are 4.7 MB and its optimizer state 9.6 MB, so a 1 MB limit fails the first
    safetensors file and a 7 MB limit fails torch.save of state.pt."""
    run_dir = new_run()
    proc = _limited_run(run_dir, limit)
    report["faults_injected"]["write_limit"] += 1
    errors = [
        line.split("error: ", 1)[1] for line in proc.stderr.splitlines() if "error: " in line
    ]  # after a progress bar
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("could not write checkpoint step 2"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    root = run_dir / "checkpoints"
    assert checkpoint.step_folders(root) == [] and [p.name for p in root.iterdir() if p.name != "latest"] == []


# -- state a resume must not silently start afresh ----------------------------------------------------

def _reseal(folder: Path) -> None:
    checkpoint.write_manifest(folder, checkpoint.manifest_step(folder))


@pytest.mark.slow
def test_a_checkpoint_without_ema_warns_and_the_ema_starts_from_its_weights(run_copy, capsys):
    folder = run_copy / "checkpoints" / "step_00000004"
    (folder / "ema.safetensors").unlink()
    _reseal(folder)
    _resume(run_copy, "train.max_steps=4")  # nothing left to train: final/ is written from the resumed EMA
    assert "holds no EMA weights (saved with train.ema.enabled=false), so the EMA starts from the resumed weights" \
        in capsys.readouterr().out
    unet = checkpoint.load_tensors(folder / "unet.safetensors")
    final = checkpoint.load_tensors(run_copy / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final[k], unet[k]) for k in unet)


@pytest.mark.slow
def test_a_missing_rank_file_is_one_sentence_not_fresh_random_streams(run_copy):
    folder = run_copy / "checkpoints" / "step_00000004"
    (folder / "rank_0.pt").unlink()
    _reseal(folder)
    with pytest.raises(ConfigError, match="lacks rank_0.pt, the random state") as e:
        _resume(run_copy, f"train.resume={folder}")
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_checkpoint_of_another_engine_is_refused_in_one_sentence_naming_it(run_copy):
    folder = run_copy / "checkpoints" / "step_00000004"
    (folder / "unet.safetensors").unlink()
    (folder / "ds").mkdir()  # the layout DeepSpeed writes
    torch.save({**torch.load(folder / "state.pt", weights_only=True),
                "saved_by": {"strategy": "deepspeed", "world_size": 2, "zero": 2}}, folder / "state.pt")
    _reseal(folder)
    with pytest.raises(ConfigError, match="it was written by parallel.strategy=deepspeed; resume it with that "
                       "strategy, or export it and start single from the export") as e:
        _resume(run_copy, f"train.resume={folder}")
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_bad_step_counters_continue_across_a_resume(tmp_path, components):
    """Step 1's loss is NaN and skipped; after a resume from step 2 the metrics still count it."""
    from faultkit import metrics

    from colodiffusion.train.loop import train

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(components, run_dir / "components")
    train(load_config(None, overrides(run_dir, "train.max_steps=2", "train.debug_nan_steps=[1]")))
    assert metrics(run_dir)[-1]["bad_steps"] == 1
    train(load_config(None, overrides(run_dir, "train.max_steps=3", "train.resume=auto")))
    assert metrics(run_dir)[-1]["step"] == 3 and metrics(run_dir)[-1]["bad_steps"] == 1


@pytest.mark.cuda  # the global CUDA RNG exists only on a GPU
def test_the_global_cuda_rng_is_in_each_rank_file():
    from types import SimpleNamespace

    from colodiffusion.train.loop import rank_state

    torch.randn(1, device="cuda")  # initialise CUDA and its generator
    state = rank_state(SimpleNamespace(noise_gen=torch.Generator(), data_gen=torch.Generator()))
    assert torch.equal(state["cuda_rng"], torch.cuda.get_rng_state())
    expected = torch.rand(4, device="cuda")
    torch.cuda.set_rng_state(state["cuda_rng"])  # what resume does with it
    assert torch.equal(torch.rand(4, device="cuda"), expected)
