"""The sdxl preset under `torchrun --nproc_per_node 2` with FSDP (gloo, CPU): the UNet's added SDXL
conditioning passes through the sharded model, and the gathered final/ is an SDXL folder whose UNet is
bitwise what one process exports from the sharded checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from datagen import make_folder  # noqa: E402
from launch import torchrun  # noqa: E402
from sdxlfolder import make_sdxl_folder  # noqa: E402

pytestmark = pytest.mark.slow


def test_sdxl_fsdp_run_gathers_an_sdxl_final_folder(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from colodiffusion.export import export

    data = make_folder(tmp_path / "data", 8, resolution=32)
    model = make_sdxl_folder(tmp_path / "model", [p.read_text() for p in sorted(data.glob("*.txt"))])
    run = tmp_path / "run"
    proc = torchrun(2, ["-m", "colodiffusion", "train", f"run.dir={run}", "parallel.strategy=fsdp",
                        "model.preset=sdxl", f"model.pretrained={model}", "data.source=folder", f"data.path={data}",
                        "data.resolution=32", "data.crop=random", "train.batch_size=4", "train.max_steps=2",
                        "train.checkpoint_every=2", "train.sample_every=2", "sample.steps=2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run / "samples" / "step_00000002.png").exists()
    final = StableDiffusionXLPipeline.from_pretrained(run / "final").unet.state_dict()
    out = export(run / "checkpoints" / "step_00000002", "diffusers", tmp_path / "exported", ema=True)
    exported = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
