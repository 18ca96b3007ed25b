"""SDXL's conditioning: two frozen CLIP text encoders and size/crop micro-conditioning (Podell et al. 2023).

The text context is what `StableDiffusionXLPipeline.encode_prompt` computes: each encoder's penultimate
hidden states, padded to its tokenizer's max length, concatenated along the features (768 + 1280 = 2048
for SDXL base), and the pooled, projected output of the second encoder as `text_embeds`. `time_ids`
are six numbers per sample: the image's original (height, width) before resizing, the top-left corner
(top, left) of the crop taken from the resized image, and the target (height, width) trained at; the
pipeline's defaults (original = target, no crop) are what an uncropped image at its own size gives.

A context is then a dict of the UNet's keyword arguments (`encoder_hidden_states`, `added_cond_kwargs`)
instead of SD's single tensor; `unet_call` passes either on, so the objective and the loop handle both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def is_sdxl_folder(root: Path) -> bool:
    """A diffusers folder of SDXL's layout (its second text encoder is what sets it apart)."""
    return (Path(root) / "text_encoder_2").is_dir()


@torch.no_grad()
def encode_prompts_sdxl(parts: Any, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, L, D1 + D2), pooled (B, P)) from `parts.tokenizer/text_encoder` and `parts.tokenizer_2/
    text_encoder_2`, exactly as the SDXL pipeline computes them (no clip skip)."""
    hidden = []
    for tokenizer, encoder in ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), out.text_embeds  # (the second encoder's projected pooled output)


def sdxl_context(parts: Any, prompts: list[str], device: torch.device,
                 time_ids: Optional[torch.Tensor]) -> dict[str, Any]:
    """The UNet's conditioning keyword arguments for `prompts` and their (B, 6) `time_ids`."""
    context, pooled = encode_prompts_sdxl(parts, prompts, device)
    if time_ids is None:
        raise ValueError("an SDXL context needs time_ids (original size, crop top-left, target size per sample)")
    return {"encoder_hidden_states": context.float(),
            "added_cond_kwargs": {"text_embeds": pooled.float(), "time_ids": time_ids.to(device, torch.float32)}}
