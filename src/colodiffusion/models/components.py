"""The components of a latent diffusion model (tokenizer, text encoder, VAE, UNet, noise schedule)
and building them fresh from a preset; loading them from files is `models/loading.py`.

The tiny preset also trains its tokenizer on the dataset's captions (no downloads) and, unless
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


def build_fresh_components(
    cfg: Config,
    components_dir: Path,
    captions: Callable[[], Iterable[str]],
    train_vae: Callable[[AutoencoderKL], AutoencoderKL],
) -> Components:
    """Fresh modules from the preset; frozen parts are reused from `components_dir` if saved there."""
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
