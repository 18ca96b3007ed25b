"""The run folder's life: components built on their own seeds and sealed, one run per folder
(continued, started over or refused), metrics without repeated steps, nothing written before the
data is checked."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from colodiffusion.config import ConfigError, load_config
from colodiffusion.data import build_dataset, dataset_args
from colodiffusion.storage.sealed import is_sealed, write_sealed
from colodiffusion.train import loop
from colodiffusion.train.first_stage import frozen_components
from colodiffusion.train.telemetry import Telemetry

from common import TINY

FAST = [*TINY, "first_stage.steps=1", "first_stage.scale_samples=8", "data.num_samples=16"]


def _build(folder: Path):
    cfg = load_config(None, FAST)
    return frozen_components(cfg, build_dataset(*dataset_args(cfg)), folder, torch.device("cpu"), show_progress=False)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("built") / "components"
    return folder, _build(folder)


def test_component_init_does_not_depend_on_parts_already_on_disk(built, tmp_path):
    """A run killed in its first stage finds tokenizer and text encoder on disk; the autoencoder it
    then trains, and the UNet, must be the ones an uninterrupted run builds."""
    folder, full = built
    partial = tmp_path / "components"
    for part in ("tokenizer", "text_encoder"):
        shutil.copytree(folder / part, partial / part)
    torch.manual_seed(1234)  # whatever the global RNG holds, no part depends on it
    resumed = _build(partial)
    assert _same(resumed.vae, full.vae)
    assert resumed.scaling_factor == full.scaling_factor
    assert _same(resumed.unet, full.unet)
    assert _same(resumed.text_encoder, full.text_encoder)


def test_every_component_folder_is_sealed(built):
    folder, _ = built
    for part in ("tokenizer", "text_encoder", "vae"):
        assert is_sealed(folder / part), part
    assert not list(folder.glob(".*"))  # no temporary folders left


def test_half_written_component_is_rebuilt_with_one_line(built, tmp_path, capsys):
    folder, full = built
    broken = tmp_path / "components"
    shutil.copytree(folder, broken)
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # as if cut by a kill
    (broken / ".tmp-vae").mkdir()  # a write that never finished
    (broken / ".tmp-vae" / "config.json").write_text("{")
    rebuilt = _build(broken)
    out = capsys.readouterr().out
    assert out.count("built again") == 1 and str(broken / "vae") in out
    assert _same(rebuilt.vae, full.vae) and is_sealed(broken / "vae")
    assert not (broken / ".tmp-vae").exists()


def test_write_sealed_publishes_all_or_nothing(tmp_path):
    target = tmp_path / "final"

    def crash(folder):
        (folder / "a.bin").write_bytes(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_sealed(target, crash)
    assert not target.exists()
    write_sealed(target, lambda f: (f / "a.bin").write_bytes(b"complete"), step=7)
    assert is_sealed(target) and (target / "a.bin").read_bytes() == b"complete"
    assert json.loads((target / "manifest.json").read_text())["step"] == 7
    with pytest.raises(RuntimeError):  # a failed re-write leaves the published folder as it was
        write_sealed(target, crash)
    assert is_sealed(target) and (target / "a.bin").read_bytes() == b"complete"
    (target / "a.bin").write_bytes(b"altered!")
    assert not is_sealed(target)
    write_sealed(target, lambda f: (f / "b.bin").write_bytes(b"new"))  # replaces the altered folder
    assert is_sealed(target) and sorted(p.name for p in target.iterdir()) == ["b.bin", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def _tb_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_resumed_run_cuts_metrics_and_tensorboard_back_to_its_step(tmp_path):
    from colodiffusion.config import load_config
    from colodiffusion.train.trackers import Trackers

    cfg = load_config(None, [f"run.dir={tmp_path}"])  # log.report_to=tensorboard, the default
    first = Telemetry(tmp_path, 10, 0, trackers=Trackers(cfg, tmp_path, 0))
    for step in range(1, 7):
        first.log(step, {"loss": float(step)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # cut by a kill
    resumed = Telemetry(tmp_path, 10, 3, trackers=Trackers(cfg, tmp_path, 3))  # the newest checkpoint was step 3
    for step in (4, 5):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"]) for m in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert _tb_scalars(tmp_path / "tensorboard", "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def _cfg(run_dir: Path, *extra: str):
    return load_config(None, [*TINY, f"run.dir={run_dir}", *extra])


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_existing_run_is_continued_or_started_over_never_mixed(run_dir):
    loop.train(_cfg(run_dir, "train.max_steps=2"))
    (run_dir / "bad_samples.jsonl").write_text('{"key": "old", "reason": "truncated"}\n')
    final = (run_dir / "final" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(ConfigError) as err:
        loop.train(_cfg(run_dir, "train.max_steps=1"))
    msg = str(err.value)
    assert "checkpoints up to step 2" in msg and "train.resume=auto" in msg and "run.overwrite=true" in msg
    assert (run_dir / "final" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == final
    assert _steps(run_dir) == [1, 2]

    loop.train(_cfg(run_dir, "train.max_steps=3", "train.resume=auto"))  # continued
    assert _steps(run_dir) == [1, 2, 3]
    assert is_sealed(run_dir / "final") and json.loads((run_dir / "final" / "manifest.json").read_text())["step"] == 3

    with pytest.raises(ConfigError, match="give only one of them"):
        loop.train(_cfg(run_dir, "train.max_steps=1", "run.overwrite=true", "train.resume=auto"))

    loop.train(_cfg(run_dir, "train.max_steps=1", "run.overwrite=true"))  # started over
    assert _steps(run_dir) == [1]
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_00000001"]
    assert not (run_dir / "bad_samples.jsonl").exists()
    assert json.loads((run_dir / "final" / "manifest.json").read_text())["step"] == 1


def test_empty_data_folder_leaves_no_run_folder(tmp_path):
    (tmp_path / "images").mkdir()
    run = tmp_path / "run"
    with pytest.raises(ConfigError):
        loop.train(_cfg(run, "data.source=folder", f"data.path={tmp_path / 'images'}"))
    assert not run.exists()


def test_a_run_that_never_checkpointed_restarts_with_fresh_logs(run_dir):
    run_dir.joinpath("metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    run_dir.joinpath("bad_samples.jsonl").write_text('{"key": "old"}\n')
    loop.train(_cfg(run_dir, "train.max_steps=1", "train.checkpoint_every=0"))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1] and lines[0]["loss"] != 9.0
    assert not (run_dir / "bad_samples.jsonl").exists()


def test_tokenizer_is_the_same_in_every_process():
    """The BPE trainer numbers symbols in a per-process hash order unless told otherwise; a resumed
    run (a new process) must train the very tokenizer the killed one did."""
    import os
    import subprocess
    import sys

    code = ("import json; from colodiffusion.data.shapes import caption_corpus; "
            "from colodiffusion.models.tokenizer import train_clip_tokenizer; "
            "t = train_clip_tokenizer(caption_corpus()); print(json.dumps(sorted(t.get_vocab().items())))")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "TRANSFORMERS_VERBOSITY": "error"}
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    assert all(o.returncode == 0 for o in outs), outs[0].stderr[-2000:]
    assert outs[0].stdout.splitlines()[-1] == outs[1].stdout.splitlines()[-1]


class _OneProcess:
    is_main, world_size, rank = True, 1, 0

    def barrier(self):
        pass


def test_run_folder_choices_without_training(tmp_path, monkeypatch):
    from colodiffusion.train import run_folder

    run, other = tmp_path / "run", tmp_path / "other"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 2}\n')
    (other / "checkpoints" / "step_00000009").mkdir(parents=True)
    one = _OneProcess()

    def check(*extra):
        run_folder.check(_cfg(run, *extra), one, run).release()  # (the lock is the run's: released at its end)

    with pytest.raises(ConfigError, match="checkpoints up to step 2"):
        check()
    with pytest.raises(ConfigError, match="already holds a run"):  # another run's checkpoint would mix in
        check(f"train.resume={other / 'checkpoints' / 'step_00000009'}")
    with pytest.raises(ConfigError, match="give only one of them"):
        check("run.overwrite=true", f"train.resume={run / 'checkpoints' / 'step_00000002'}")
    check("train.resume=auto")
    check("run.overwrite=true", f"train.resume={other / 'checkpoints' / 'step_00000009'}")

    # A worker restarted by torchrun continues the run it started, even with run.overwrite=true.
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    check("run.overwrite=true")
    run_folder.prepare(_cfg(run, "run.overwrite=true"), one, run)
    assert (run / "checkpoints" / "step_00000002").is_dir() and (run / "metrics.jsonl").exists()
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    run_folder.prepare(_cfg(run, "run.overwrite=true"), one, run)
    assert not (run / "checkpoints" / "step_00000002").exists() and not (run / "metrics.jsonl").exists()
    assert (run / "config.yaml").is_file()
