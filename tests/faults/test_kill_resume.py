"""SIGKILL at 10 moments (half of them inside checkpoint saves, the others at random times while
training), `train.resume=auto` after each, and the run ends bitwise equal to an uninterrupted one.
SIGKILL in every phase before training (tokenizer, text encoder, first stage, scale factor, VAE,
UNet) and while final/ is exported ends the same way. SIGTERM mid-run checkpoints and exits 0; a
restarted torchrun worker resumes by itself."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from faultkit import differences, launch, metrics, run_to_end

from colodiffusion.storage import checkpoint

STEPS = 24
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory, components):
    import shutil

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_dir.mkdir()
    shutil.copytree(components, run_dir / "components")
    done = run_to_end(run_dir, f"train.max_steps={STEPS}")
    assert done.returncode == 0, done.stdout + done.stderr
    return run_dir


def _latest(run_dir: Path):
    return checkpoint.find_latest(run_dir / "checkpoints", log=lambda m: None)


def _wait(proc, ready, what: str, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run exited with {proc.returncode} before {what}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _log_tail(run_dir: Path, since: int) -> str:
    return (run_dir.parent / f"{run_dir.name}.log").read_bytes()[since:].decode(errors="replace")


def _log_size(run_dir: Path) -> int:
    f = run_dir.parent / f"{run_dir.name}.log"
    return f.stat().st_size if f.exists() else 0


# (kind, fault point): kills inside a save stop at a named point of checkpoint.save; random kills
# land a random 0-0.6 s after the attempt logged its first new step (mid-step or mid-save).
SCHEDULE = [
    ("random", None), ("save", "tensors_written"), ("random", None), ("save", "files_written"),
    ("random", None), ("save", "manifest_written"), ("random", None), ("save", "published"),
    ("random", None), ("save", "pruning"),
]


def test_sigkill_ten_times_then_bitwise_equal(new_run, reference, report):
    run_dir = new_run()
    rng = random.Random(int(os.environ.get("FAULT_SEED", "8")))
    args = (f"train.max_steps={STEPS}", "train.resume=auto")
    for kind, point in SCHEDULE:
        latest = _latest(run_dir)
        start = int(latest.name[5:]) if latest else 0
        since = _log_size(run_dir)
        if kind == "save":
            target = max(start + 2, 6)  # the next save (pruning needs a third checkpoint to exist)
            mark = run_dir.parent / "mark"
            mark.unlink(missing_ok=True)
            proc = launch(run_dir, *args, COLODIFFUSION_FAULT_POINT=f"{point}@{target}",
                          COLODIFFUSION_FAULT_MARK=str(mark))
            _wait(proc, mark.exists, f"fault point {point}@{target}")
        else:
            n = len(metrics(run_dir))
            proc = launch(run_dir, *args)
            _wait(proc, lambda: len(metrics(run_dir)) > n, "a new training step")
            time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
        report["faults_injected"]["sigkill"] += 1
        report["kills_inside_save"] += kind == "save"
        log = _log_tail(run_dir, since)
        if latest is not None:  # each attempt resumed from the newest intact checkpoint
            assert f"resumed from {latest} at step {start}" in log, log[-2000:]
        if kind == "save" and point in ("published", "pruning"):
            assert _latest(run_dir).name == f"step_{target:08d}"  # published even though `latest` may lag
        report["kills_survived"] += 1

    done = run_to_end(run_dir, *args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    final = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    diff = differences(final, reference / "checkpoints" / f"step_{STEPS:08d}")
    report["lost"] += [f"kill test: {d}" for d in diff]
    assert not diff, f"resumed run differs from the uninterrupted one in {diff[:5]}"
    # Every replayed step reproduced the same loss as the uninterrupted run, and is logged once.
    ref = {m["step"]: m["loss"] for m in metrics(reference)}
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    for m in metrics(run_dir):
        assert m["loss"] == ref[m["step"]], f"step {m['step']}: loss {m['loss']} != {ref[m['step']]}"
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


# (fault point, the component folders sealed when the kill lands there); the run starts from an
# empty folder, so every phase runs for real.
PHASES = [
    ("tokenizer_written", []), ("text_encoder_written", ["tokenizer"]),
    ("first_stage", ["text_encoder", "tokenizer"]), ("scale_factor", ["text_encoder", "tokenizer"]),
    ("vae_written", ["text_encoder", "tokenizer"]), ("unet_built", ["text_encoder", "tokenizer", "vae"]),
    ("final_written", ["text_encoder", "tokenizer", "vae"]),
]


def _files(folder: Path) -> dict[str, object]:
    """Every file's content; configs without the folder they were loaded from (it names the run)."""
    out: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "manifest.json":  # the manifest hashes the files compared here
            name = p.relative_to(folder).as_posix()
            out[name] = p.read_bytes()
            if p.suffix == ".json":
                out[name] = {
                    k: v for k, v in json.loads(out[name]).items() if k not in ("_name_or_path", "name_or_path")
                }
    return out


def test_sigkill_in_every_component_phase_and_final_export(tmp_path, report):
    from colodiffusion.storage.sealed import is_sealed

    args = ("train.max_steps=4", "train.resume=auto")
    reference = tmp_path / "reference"
    done = run_to_end(reference, *args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run_dir = tmp_path / "run"
    for point, sealed in PHASES:
        mark = tmp_path / "mark"
        mark.unlink(missing_ok=True)
        proc = launch(run_dir, *args, COLODIFFUSION_FAULT_POINT=point, COLODIFFUSION_FAULT_MARK=str(mark))
        _wait(proc, mark.exists, f"fault point {point}")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
        report["faults_injected"]["sigkill"] += 1
        # Under a real name only sealed folders: what the kill interrupted is not there, or hidden.
        named = sorted(p.name for p in (run_dir / "components").iterdir() if not p.name.startswith("."))
        assert named == sealed and all(is_sealed(run_dir / "components" / n) for n in named), (point, named)
        assert not (run_dir / "final").exists()
        report["kills_survived"] += 1
    assert (run_dir / ".tmp-final").is_dir()  # the export was cut short; the run had finished training

    done = run_to_end(run_dir, *args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "resumed from" in done.stdout and "step_00000004 at step 4" in done.stdout
    diff = differences(run_dir / "checkpoints" / "step_00000004", reference / "checkpoints" / "step_00000004")
    for part in ("components", "final"):
        a, b = _files(run_dir / part), _files(reference / part)
        # final/README.md, the model card, names its run folder and training times: present in both, not equal.
        diff += [f"{part}/{k}" for k in sorted(a.keys() | b.keys())
                 if a.get(k) != b.get(k) and not (part == "final" and k == "README.md" and k in a and k in b)]
    report["lost"] += [f"phase kill test: {d}" for d in diff[:10]]
    assert not diff, f"resumed run differs from the uninterrupted one in {diff[:5]}"
    assert not (run_dir / ".tmp-final").exists()
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_checkpoints_exits_0_and_restart_resumes(sig, new_run, reference, report):
    run_dir = new_run()
    proc = launch(run_dir, f"train.max_steps={STEPS}", "train.checkpoint_every=0")
    _wait(proc, lambda: len(metrics(run_dir)) >= 3, "three training steps")
    proc.send_signal(getattr(signal, sig))
    assert proc.wait(120) == 0
    report["faults_injected"][sig.lower()] += 1
    log = _log_tail(run_dir, 0)
    stopped = _latest(run_dir)
    assert stopped is not None and f"stopped by {sig} at step {int(stopped.name[5:])}" in log, log[-2000:]
    assert 3 <= int(stopped.name[5:]) < STEPS
    assert not (run_dir / "final").exists()  # preempted, not finished
    # A torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) resumes with train.resume unset.
    done = run_to_end(run_dir, f"train.max_steps={STEPS}", "train.checkpoint_every=0",
                      TORCHELASTIC_RESTART_COUNT="1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"resumed from {stopped}" in done.stdout
    diff = differences(run_dir / "checkpoints" / f"step_{STEPS:08d}", reference / "checkpoints" / f"step_{STEPS:08d}")
    report["lost"] += [f"{sig} test: {d}" for d in diff]
    assert not diff, diff[:5]
    report["kills_survived"] += 1
