"""The components of a latent diffusion model (tokenizer, text encoder, VAE, UNet, noise schedule)
and building them fresh from a preset; loading them from files is `models/loading.py`.

The tiny preset also trains its tokenizer on the dataset's captions (no downloads) and, unless
`model.vae` is given, trains its KL autoencoder first (`train/first_stage.py`). Frozen parts made
this way are saved once under RUN_DIR/components/ so that a resumed run reloads exactly them.

Each part is initialised from its own seed (`component_seed`: train.seed and the part's name) inside
a forked RNG, so a part comes out the same whichever other parts were already on disk (a run killed
in its first stage and resumed builds the very model an uninterrupted run builds), and the global
RNG is left as it was. Each saved part is a sealed folder (`storage/sealed.py`): a folder that is
not sealed (a kill while an older version wrote it, or altered since) is rebuilt, never trusted.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from colodiffusion.config import Config, ConfigError
from colodiffusion.diffusion import build_noise_scheduler
from colodiffusion.models import bounds
from colodiffusion.models.presets import build_text_encoder, build_unet, build_vae, get_preset
from colodiffusion.models.sdxl import sdxl_context
from colodiffusion.models.tokenizer import train_clip_tokenizer
from colodiffusion.storage import faults
from colodiffusion.storage.sealed import is_sealed, write_sealed


@dataclass
class Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    tokenizer_2: Optional[CLIPTokenizer] = None  # SDXL's second tokenizer and text encoder (models/sdxl.py)
    text_encoder_2: Optional[torch.nn.Module] = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

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


def component_seed(seed: int, name: str) -> int:
    """The seed of one component's initialisation (or training), from train.seed and its name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


@contextmanager
def seeded(seed: int, name: str) -> Iterator[None]:
    """Run a component's construction on its own seed; the global RNG is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed(seed, name))
        yield


def reuse_or_build(folder: Path, load: Callable[[Path], object], build: Callable[[], object]):
    """The part sealed in `folder`; if there is none, `build()` is written there sealed (temporary
    folder, manifest, rename) and read back, so a run uses exactly what a resumed run will load."""
    if not is_sealed(folder):
        if folder.exists():
            print(f"{folder} is incomplete or altered (it has no matching manifest.json), so it is built again")
        write_sealed(folder, build().save_pretrained)
    # A received run's components are data like any model folder.
    bounds.check_folder(folder, bounds.PART_NAMES.get(folder.name, folder.name))
    return load(folder)


def build_fresh_components(
    cfg: Config,
    components_dir: Path,
    captions: Callable[[], Iterable[str]],
    train_vae: Callable[[AutoencoderKL], AutoencoderKL],
) -> Components:
    """Fresh modules from the preset; frozen parts are reused from `components_dir` if sealed there."""
    preset, seed = get_preset(cfg.model.preset), cfg.train.seed
    tok_dir, te_dir, vae_dir = (components_dir / s for s in ("tokenizer", "text_encoder", "vae"))
    if preset.needs_pretrained_tokenizer and not is_sealed(tok_dir):
        raise ConfigError(
            f"model.preset={cfg.model.preset} needs model.pretrained: a local diffusers folder with its CLIP "
            "tokenizer and weights (nothing is downloaded)."
        )
    tokenizer = reuse_or_build(tok_dir, CLIPTokenizer.from_pretrained, lambda: train_clip_tokenizer(
        captions(), max_length=preset.text_encoder["max_position_embeddings"]))
    vocab_size = None if preset.needs_pretrained_tokenizer else len(tokenizer)

    def text_encoder_fresh():
        with seeded(seed, "text_encoder"):
            return build_text_encoder(preset, vocab_size=vocab_size)

    def vae_fresh():
        with seeded(seed, "vae"):
            vae = build_vae(preset)
        with seeded(seed, "first_stage"):
            return train_vae(vae)

    text_encoder = reuse_or_build(te_dir, CLIPTextModel.from_pretrained, text_encoder_fresh)
    if cfg.model.vae:
        bounds.check_folder(Path(cfg.model.vae), "VAE")
        vae = AutoencoderKL.from_pretrained(cfg.model.vae)
    else:
        vae = reuse_or_build(vae_dir, AutoencoderKL.from_pretrained, vae_fresh)
    with seeded(seed, "unet"):
        unet = build_unet(preset)
    faults.point("unet_built")
    prediction_type = cfg.model.prediction_type or preset.prediction_type
    return Components(tokenizer, freeze(text_encoder), freeze(vae), unet,
                      build_noise_scheduler(cfg.diffusion, prediction_type))


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str],
                   device: torch.device) -> torch.Tensor:
    """Text context exactly as StableDiffusionPipeline computes it (padded to max length, no mask)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


def encode_context(parts: Any, prompts: list[str], device: torch.device,
                   time_ids: Optional[torch.Tensor] = None) -> torch.Tensor | dict:
    """The UNet's text conditioning from `parts` (Components, a Model or a pipeline): SD's context tensor,
    or for SDXL (a `text_encoder_2`) the dict of its keyword arguments with the (B, 6) `time_ids`."""
    if getattr(parts, "text_encoder_2", None) is not None:
        return sdxl_context(parts, prompts, device, time_ids)
    return encode_prompts(parts.tokenizer, parts.text_encoder, prompts, device)


def unet_call(unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor | dict) -> torch.Tensor:
    """The UNet's prediction under a context tensor (SD) or a dict of keyword arguments (SDXL)."""
    if isinstance(context, dict):
        return unet(x_t, t, **context).sample
    return unet(x_t, t, context).sample


def context_to(context: torch.Tensor | dict, **kwargs) -> torch.Tensor | dict:
    """A context (tensor, or SDXL's nested dict of tensors) moved/cast with `Tensor.to(**kwargs)`."""
    if isinstance(context, dict):
        return {k: context_to(v, **kwargs) for k, v in context.items()}
    return context.to(**kwargs)


def encode_images(vae: AutoencoderKL, pixels: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Scaled latents sampled from the VAE posterior (SD samples, rather than taking the mean)."""
    with torch.no_grad():
        dist = vae.encode(pixels.to(dtype=vae.dtype)).latent_dist
        return dist.sample(generator=generator).float() * vae.config.scaling_factor
