"""LoRA through peft: adapters on the UNet (and optionally the text encoder), their file, merging.

The adapters are injected with the libraries' own `add_adapter`; the file is written by
`StableDiffusionPipeline.save_lora_weights` from peft's state dict, so any diffusers pipeline
loads it with `load_lora_weights`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from colodiffusion.config import LoRAConfig
from colodiffusion.storage.files import match_umask

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def has_lora(module: torch.nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def apply_lora(unet: torch.nn.Module, text_encoder: torch.nn.Module, lc: LoRAConfig, train_text_encoder: bool) -> None:
    """Freeze the base weights and add trainable adapters (no-op when train.lora.rank is 0); with
    `train_text_encoder` (model.train_text_encoder) the text encoder's own weights stay trainable."""
    if not lc.rank:
        return
    alpha = lc.alpha if lc.alpha is not None else lc.rank
    unet.requires_grad_(False)
    # Gaussian A and zero B: the adapted model starts exactly at the base model.
    unet.add_adapter(LoraConfig(r=lc.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(lc.target_modules)))
    if lc.text_encoder:
        if not train_text_encoder:
            text_encoder.requires_grad_(False)
        # peft directly: transformers' own `add_adapter` insists on a newer peft than diffusers needs.
        inject_adapter_in_model(LoraConfig(r=lc.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                           target_modules=TEXT_ENCODER_TARGETS), text_encoder)


def save_lora(folder: Path, unet: torch.nn.Module, text_encoder: Optional[torch.nn.Module] = None,
              dtype: torch.dtype = torch.float32, metadata: Optional[dict[str, str]] = None) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` in the format `load_lora_weights` reads, with
    `metadata` (e.g. kohya's ss_* training keys) added to its header."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def layers(model):
        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        return {k: v.detach().to("cpu", dtype) for k, v in sd.items()}

    def meta(model):
        return model.peft_config["default"].to_dict()

    te = text_encoder if text_encoder is not None and has_lora(text_encoder) else None
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers(unet), text_encoder_lora_layers=layers(te) if te is not None else None,
        unet_lora_adapter_metadata=meta(unet), text_encoder_lora_adapter_metadata=meta(te) if te is not None else None,
        weight_name=WEIGHT_NAME,
    )
    path = Path(folder) / WEIGHT_NAME
    if metadata:  # diffusers writes its own header keys; ours are added beside them
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        save_file(load_file(str(path)), str(path), metadata={**metadata, **header})
    match_umask([path])
    return path


def lora_shape(module: torch.nn.Module) -> Optional[tuple[int, float]]:
    """(rank, alpha) of a module's adapter, or None without one."""
    config = getattr(module, "peft_config", {}).get("default")
    return (config.r, config.lora_alpha) if config is not None else None


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with every adapter folded into its base weights and the peft layers removed."""
    from diffusers.utils import recurse_remove_peft_layers

    if not has_lora(model):
        return model
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    recurse_remove_peft_layers(out)
    # Both libraries save only the adapter while these are set.
    out._hf_peft_config_loaded = False
    if hasattr(out, "peft_config"):
        del out.peft_config
    return out
