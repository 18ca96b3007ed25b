"""The seed's three recipes run through the seed's entry point (`python main.py -t -b ...`) with a
tiny model, and `colodiffusion train -c` refuses a recipe whose trainer.devices does not match the
launch with one sentence. The ddp recipe asks main.py for 2 devices, so main.py starts torchrun
itself (as the seed's Lightning Trainer did), and its train.max_epochs decides the step count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["trainer.accelerator=auto", "precision=32", "first_stage.steps=2", "first_stage.scale_samples=16",
        "train.batch_size=8", "train.sample_every=0", "train.log_every=1", "train.warmup_steps=1"]

pytestmark = pytest.mark.slow


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def main_py(logdir: Path, recipe: str, *overrides: str) -> Path:
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "-t", "-b", f"configs/{recipe}.yaml", "-l", str(logdir),
                           *TINY, *overrides], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    (run_dir,) = list(logdir.iterdir())
    assert run_dir.name.endswith(recipe)
    return run_dir


def logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"step"' in line]


def test_ddp_recipe_launches_its_devices_and_stops_by_epochs(tmp_path):
    # 16 samples over 2 ranks at a global batch of 8: 2 steps an epoch, so 1 epoch = 2 steps
    run_dir = main_py(tmp_path, "train_ddp", "trainer.devices=2", "train.max_epochs=1", "data.num_samples=16")
    steps = [r["step"] for r in logged(run_dir)]
    assert steps[-1] == 2
    assert (run_dir / "final" / "unet").is_dir() and (run_dir / "checkpoints" / "step_00000002" / "rank_1.pt").is_file()


def test_deepspeed_recipe_runs_through_main_py(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'colodiffusion[deepspeed]')")
    run_dir = main_py(tmp_path, "train_deepspeed", "trainer.devices=1", "train.max_steps=2", "data.num_samples=64")
    assert [r["step"] for r in logged(run_dir)][-1] == 2
    assert (run_dir / "checkpoints" / "step_00000002" / "ds" / "state").is_dir()
    assert (run_dir / "final" / "unet").is_dir()


def test_colossalai_recipe_runs_through_main_py(tmp_path):
    try:
        import colossalai.booster  # noqa: F401
    except Exception as exc:
        pytest.skip(f"Colossal-AI does not import here ({type(exc).__name__}: {exc}); see docs/engines.md")
    # gemini (the recipe's plugin) needs CUDA; torch_ddp is Colossal-AI's CPU path
    run_dir = main_py(tmp_path, "train_colossalai", "trainer.devices=1", "parallel.plugin=torch_ddp",
                      "train.max_steps=2", "data.num_samples=64")
    assert [r["step"] for r in logged(run_dir)][-1] == 2
    assert (run_dir / "checkpoints" / "step_00000002" / "colossalai" / "model.safetensors").is_file()
    assert (run_dir / "final" / "unet").is_dir()


def test_cli_refuses_a_recipe_launched_with_the_wrong_number_of_processes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "colodiffusion", "train", "-c", "configs/train_deepspeed.yaml",
                           f"run.dir={tmp_path / 'run'}", "trainer.accelerator=auto"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "trainer.devices=4 but 1 process(es) were launched" in proc.stderr and "Traceback" not in proc.stderr
