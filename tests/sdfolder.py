"""A tiny diffusers Stable Diffusion folder built from the tests' frozen tiny components (no training,
no downloads): the stand-in for a released model in the Hub and from-scratch tests."""

from pathlib import Path

import torch


def make_diffusers_folder(components: Path, out: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from colodiffusion.config import load_config
    from colodiffusion.diffusion import build_noise_scheduler
    from colodiffusion.generate import export_diffusers
    from colodiffusion.models.presets import build_unet, get_preset

    torch.manual_seed(seed)
    unet = build_unet(get_preset("tiny"))
    export_diffusers(out, CLIPTokenizer.from_pretrained(components / "tokenizer"),
                     CLIPTextModel.from_pretrained(components / "text_encoder"),
                     AutoencoderKL.from_pretrained(components / "vae"), unet,
                     build_noise_scheduler(load_config().diffusion, "epsilon"))
    return out
