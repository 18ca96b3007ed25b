"""Sampling and diffusers-format export: everything a trained model is used through.

May import: `config`, `diffusion`, `storage`, `models`. The loop uses it for its sample grids; the
commands (`cli`, `export`, `evaluate`) for everything else."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from colodiffusion.diffusion import make_sampler
from colodiffusion.models.loading import load_model


def make_pipeline(tokenizer, text_encoder, vae, unet, noise_scheduler) -> StableDiffusionPipeline:
    scheduler = DDIMScheduler.from_config(noise_scheduler.config, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def resolve_model_path(path: str | Path) -> Path:
    """A diffusers folder, or a run folder (whose final/ is used); single files are loaded by `load_pipeline`."""
    p = Path(path)
    if (p / "model_index.json").exists():
        return p
    if (p / "final" / "model_index.json").exists():
        return p / "final"
    raise FileNotFoundError(f"'{p}' is neither a diffusers model folder nor a run folder with final/")


def load_pipeline(path: str | Path, device: Optional[torch.device] = None, dtype=None,
                  original_config: Optional[str] = None, tokenizer: Optional[str] = None) -> StableDiffusionPipeline:
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    p = Path(path)
    if (p / "model_index.json").exists() or (p / "final" / "model_index.json").exists():
        pipe = StableDiffusionPipeline.from_pretrained(
            resolve_model_path(p), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    else:  # a single file (original_config: its YAML, if any), a checkpoint folder of any backend, or a
        # run folder without final/ (its newest checkpoint); checkpoints give their EMA when they have one
        m = load_model(p, ema=None, original_config=original_config, tokenizer=tokenizer)
        pipe = make_pipeline(m.tokenizer, m.text_encoder, m.vae, m.unet, m.noise_scheduler).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25,
             guidance: float = 4.0, sampler: str = "ddim", height: Optional[int] = None,
             width: Optional[int] = None, batch_size: int = 64) -> list[Image.Image]:
    """One image per (prompt, seed); each image's noise comes from its own seeded generator, so an
    image does not depend on what else is in the batch."""
    pipe.scheduler = make_sampler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = list(prompts[i:i + batch_size]), seeds[i:i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in chunk_seeds]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   height=height, width=width, output_type="pil")
        images.extend(out.images)
    return images


def make_grid(images: Sequence[Image.Image], cols: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def export_diffusers(out_dir: Path, tokenizer, text_encoder, vae, unet, noise_scheduler) -> Path:
    """Write a diffusers folder that `StableDiffusionPipeline.from_pretrained` loads."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # else tokenizer.json keeps the last call's padding (transformers sets it per call)
        backend.no_truncation()
        backend.no_padding()
    make_pipeline(tokenizer, text_encoder, vae, unet, noise_scheduler).save_pretrained(out_dir)
    return out_dir
