"""Build or load the three modules of a latent diffusion model, plus tokenizer and noise schedule.

`model.pretrained` loads a local diffusers folder. Otherwise the preset builds fresh modules; the
tiny preset also trains its tokenizer on the dataset's captions (no downloads) and, unless
`model.vae` is given, trains its KL autoencoder first (`train/first_stage.py`). Frozen parts made
this way are saved once under RUN_DIR/components/ so that a resumed run reloads exactly them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from colodiffusion.config import Config, ConfigError
from colodiffusion.diffusion import build_noise_scheduler
from colodiffusion.models.presets import build_text_encoder, build_unet, build_vae, get_preset
from colodiffusion.models.tokenizer import train_clip_tokenizer


@dataclass
class Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Frozen modules take no gradients, hold no optimizer state and run in eval mode."""
    module.requires_grad_(False)
    return module.eval()


def _has(folder: Path, sub: str) -> bool:
    return (folder / sub).is_dir()


def load_pretrained(path: str | Path, cfg: Config) -> Components:
    """Load a local diffusers-format folder (unet/, vae/, text_encoder/, tokenizer/[, scheduler/]) or a
    single-file LDM checkpoint (`models/single_file.py`)."""
    root = Path(path)
    if root.is_file():
        from colodiffusion.models.single_file import load_single_file

        return load_single_file(root, cfg)
    missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer") if not _has(root, s)]
    if missing:
        raise ConfigError(
            f"model.pretrained '{root}' is not a diffusers model folder: it lacks {', '.join(missing)}/."
        )
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(cfg.model.vae or root, subfolder=None if cfg.model.vae else "vae")
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    prediction_type = cfg.model.prediction_type
    if prediction_type is None and _has(root, "scheduler"):
        prediction_type = DDPMScheduler.load_config(root, subfolder="scheduler").get("prediction_type")
    prediction_type = prediction_type or get_preset(cfg.model.preset).prediction_type
    return Components(tokenizer, freeze(text_encoder), freeze(vae), unet,
                      build_noise_scheduler(cfg, prediction_type))


def build_components(
    cfg: Config,
    components_dir: Path,
    captions: Callable[[], Iterable[str]],
    train_vae: Callable[[AutoencoderKL], AutoencoderKL],
) -> Components:
    """Fresh modules from the preset; frozen parts are reused from `components_dir` if saved there."""
    if cfg.model.pretrained:
        return load_pretrained(cfg.model.pretrained, cfg)
    preset = get_preset(cfg.model.preset)
    tok_dir, te_dir, vae_dir = (components_dir / s for s in ("tokenizer", "text_encoder", "vae"))
    if tok_dir.is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    elif preset.needs_pretrained_tokenizer:
        raise ConfigError(
            f"model.preset={cfg.model.preset} needs model.pretrained: a local diffusers folder with its CLIP "
            "tokenizer and weights (nothing is downloaded)."
        )
    else:
        tokenizer = train_clip_tokenizer(captions(), max_length=preset.text_encoder["max_position_embeddings"])
        tokenizer.save_pretrained(tok_dir)
    torch.manual_seed(cfg.train.seed)
    if te_dir.is_dir():
        text_encoder = CLIPTextModel.from_pretrained(te_dir)
    else:
        text_encoder = build_text_encoder(preset, vocab_size=None if preset.needs_pretrained_tokenizer else len(tokenizer))
        text_encoder.save_pretrained(te_dir)
    if cfg.model.vae:
        vae = AutoencoderKL.from_pretrained(cfg.model.vae)
    elif vae_dir.is_dir():
        vae = AutoencoderKL.from_pretrained(vae_dir)
    else:
        vae = train_vae(build_vae(preset))
        vae.save_pretrained(vae_dir)
    torch.manual_seed(cfg.train.seed)
    unet = build_unet(preset)
    prediction_type = cfg.model.prediction_type or preset.prediction_type
    return Components(tokenizer, freeze(text_encoder), freeze(vae), unet,
                      build_noise_scheduler(cfg, prediction_type))


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str],
                   device: torch.device) -> torch.Tensor:
    """Text context exactly as StableDiffusionPipeline computes it (padded to max length, no mask)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


def encode_images(vae: AutoencoderKL, pixels: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Scaled latents sampled from the VAE posterior (SD samples, rather than taking the mean)."""
    with torch.no_grad():
        dist = vae.encode(pixels.to(dtype=vae.dtype)).latent_dist
        return dist.sample(generator=generator).float() * vae.config.scaling_factor
