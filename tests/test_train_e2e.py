"""Tiny end-to-end runs: exact resume, the exported pipeline, the seed's command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colodiffusion.config import load_config
from colodiffusion.train import loop

from common import ROOT, TINY, crash_at, run_cli


def cfg_for(run_dir, *extra):
    return load_config(None, [*TINY, f"run.dir={run_dir}", *extra])


def final_weights(run_dir: Path, step: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / "unet.safetensors"))


@pytest.mark.slow
def test_resume_is_bitwise_exact(run_dir, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run_dir / "components", other / "components")
    common = ["train.max_steps=6", "train.checkpoint_every=3", "diffusion.caption_dropout=0.3"]
    loop.train(cfg_for(run_dir, *common))
    uninterrupted = final_weights(run_dir, 6)

    with crash_at(3):
        loop.train(cfg_for(other, *common))
    assert not (other / "checkpoints" / "step_00000006").exists()
    loop.train(cfg_for(other, *common, "train.resume=auto"))
    resumed = final_weights(other, 6)
    assert resumed.keys() == uninterrupted.keys()
    for k in uninterrupted:
        assert torch.equal(resumed[k], uninterrupted[k]), k
    ema_a = load_file(str(run_dir / "checkpoints/step_00000006/ema.safetensors"))
    ema_b = load_file(str(other / "checkpoints/step_00000006/ema.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    metrics = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "lr", "samples_per_s"} <= m.keys() for m in metrics)


@pytest.mark.slow
def test_final_folder_loads_in_stable_diffusion_pipeline(run_dir):
    from diffusers import StableDiffusionPipeline

    loop.train(cfg_for(run_dir, "train.max_steps=3", "train.sample_every=3"))
    for name in ("config.yaml", "metrics.jsonl", "checkpoints", "samples/step_00000003.png", "final"):
        assert (run_dir / name).exists(), name
    pipe = StableDiffusionPipeline.from_pretrained(run_dir / "final", safety_checker=None)
    out = pipe("a red circle", num_inference_steps=3, guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)
    assert out.std() > 0  # an image, not a constant
    # the exported UNet carries the EMA weights, every one of them (and they are not the live weights)
    ema = load_file(str(run_dir / "checkpoints/step_00000003/ema.safetensors"))
    live = final_weights(run_dir, 3)
    exported = pipe.unet.state_dict()
    assert ema.keys() == exported.keys()
    assert [k for k in ema if not torch.equal(exported[k], ema[k])] == []
    assert any(not torch.equal(ema[k], live[k]) for k in ema)


@pytest.mark.slow
def test_sample_and_eval_commands(run_dir, tmp_path):
    loop.train(cfg_for(run_dir, "train.max_steps=2"))
    out = subprocess.run([sys.executable, "-m", "colodiffusion", "sample", str(run_dir), "--prompt", "a red circle",
                          "--n-samples", "2", "--steps", "2", "--out", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "s" / "00001.png").exists() and (tmp_path / "s" / "grid.png").exists()
    assert "torchvision" not in out.stderr and "kernels" not in out.stderr  # no import noise from the libraries
    out = run_cli("eval", run_dir, "--json", "--per-combo", "1", "--steps", "2", "--out", tmp_path / "e")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 12
    assert (result["sampler"], result["guidance"]) == ("euler_a", 2.0)  # the judge's own defaults (bench/NOTES.md)
    from PIL import Image

    grid = Image.open(tmp_path / "e" / "eval_grid.png")  # 4 rows of 3 cells, enlarged, each with a label band
    assert grid.width >= 3 * 128 and grid.height > 4 * 128 + 4 * 20
    assert {"prompt_accuracy", "color_accuracy", "shape_accuracy"} <= result.keys()


@pytest.mark.slow
def test_seed_command_line_trains(tmp_path, tiny_components):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  max_steps: 2\n")
    logdir = tmp_path / "logs"
    # pre-place the frozen parts where the seed CLI's run folder will be is not possible (timestamped),
    # so point it at a pre-trained first-stage VAE instead
    out = subprocess.run([sys.executable, str(ROOT / "main.py"), "--logdir", str(logdir), "-t", "--postfix", "test",
                          "-b", str(recipe), *TINY, f"model.vae={tiny_components / 'vae'}"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = list(logdir.iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("_recipe_test")
    assert (runs[0] / "final" / "model_index.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_resumes(run_dir, precision, monkeypatch):
    # The UNet's prediction in the training step comes out of autocast in the asked dtype (fp32 without it).
    seen = []
    real = loop.unet_call

    def recording(*args):
        out = real(*args)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(loop, "unet_call", recording)
    loop.train(cfg_for(run_dir, "train.max_steps=2", "train.checkpoint_every=1", f"precision={precision}"))
    assert seen and set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float16}, seen
    state = torch.load(run_dir / "checkpoints/step_00000002/state.pt", weights_only=True)
    assert ("scaler" in state["backend"]) == (precision == "fp16")
    loop.train(cfg_for(run_dir, "train.max_steps=3", f"precision={precision}", "train.resume=auto"))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


@pytest.mark.slow
def test_finetune_from_a_local_diffusers_folder(run_dir, tmp_path):
    loop.train(cfg_for(run_dir, "train.max_steps=1"))
    base = load_file(str(run_dir / "final/unet/diffusion_pytorch_model.safetensors"))
    tuned_dir = tmp_path / "tuned"
    loop.train(cfg_for(tuned_dir, "train.max_steps=2", f"model.pretrained={run_dir / 'final'}",
                       "train.ema.enabled=false"))
    assert not (tuned_dir / "components").exists()  # nothing rebuilt: everything came from the folder
    tuned = load_file(str(tuned_dir / "final/unet/diffusion_pytorch_model.safetensors"))
    assert tuned.keys() == base.keys()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    te_a = load_file(str(run_dir / "final/text_encoder/model.safetensors"))
    te_b = load_file(str(tuned_dir / "final/text_encoder/model.safetensors"))
    assert all(torch.equal(te_a[k], te_b[k]) for k in te_a)  # frozen: unchanged
