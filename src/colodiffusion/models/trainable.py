"""What the optimizer sees: the UNet alone, or the UNet together with the text encoder.

Fine-tuning the text encoder (fully, or through LoRA) makes it part of the trained model, so that
every backend wraps, checkpoints and averages (EMA) it like the UNet. The model then takes token
ids instead of a finished text context and encodes them itself, inside autograd.
"""

from __future__ import annotations

from typing import Optional

import torch

from colodiffusion.config import LoRAConfig, ModelConfig
from colodiffusion.models.components import Components, encode_context
from colodiffusion.models.lora import apply_lora


class UNetWithTextEncoder(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor):
        return self.unet(x_t, t, self.text_encoder(input_ids)[0])


def trains_text_encoder(model: ModelConfig, lc: LoRAConfig) -> bool:
    return model.train_text_encoder or (lc.rank > 0 and lc.text_encoder)


def build_trainable(model: ModelConfig, lora: LoRAConfig, comps: Components) -> torch.nn.Module:
    """Apply LoRA (if configured) and return the module whose trainable parameters are optimized."""
    if model.train_text_encoder:
        comps.text_encoder.requires_grad_(True)
    apply_lora(comps.unet, comps.text_encoder, lora, model.train_text_encoder)
    if trains_text_encoder(model, lora):
        return UNetWithTextEncoder(comps.unet, comps.text_encoder)
    return comps.unet


def text_encoder_param_ids(model: torch.nn.Module) -> set[int]:
    """Identities of the text encoder's parameters, for their own optimizer param group."""
    return {id(p) for p in model.text_encoder.parameters()} if isinstance(model, UNetWithTextEncoder) else set()


def text_input(token_ids: bool, comps: Components, captions: list[str], device: torch.device,
               time_ids: Optional[torch.Tensor] = None) -> torch.Tensor | dict:
    """The trained model's text input: token ids when it holds the text encoder (`token_ids`, from
    `trains_text_encoder`), else the frozen encoder's output (computed without autograd); for SDXL the
    dict of the UNet's conditioning arguments, both encoders' outputs with the batch's (B, 6) size/crop
    `time_ids`."""
    if token_ids:
        tok = comps.tokenizer
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(device)
    if comps.is_sdxl:
        return encode_context(comps, captions, device, time_ids)
    return encode_context(comps, captions, device).float()


def split(model: torch.nn.Module, comps: Components) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(UNet, text encoder) of a trained model (the frozen encoder when it was not trained)."""
    if isinstance(model, UNetWithTextEncoder):
        return model.unet, model.text_encoder
    return model, comps.text_encoder
