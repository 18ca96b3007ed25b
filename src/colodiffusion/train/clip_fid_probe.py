"""CLIP score and FID of images generated for held-out captions, against the held-out images.

Used during training (eval.every, on the main rank) and by `colodiffusion eval`. The captions, real
images and seeds are fixed once, so two measurements differ only by the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from colodiffusion.generate import generate
from colodiffusion.models.image_metrics import ClipScorer, ImageFeatures, frechet_distance
from colodiffusion.train.val_loss import read_items

MISSING_WEIGHTS = ("CLIP score and FID were not computed: they need local weights, eval.clip_model (or "
                   "--clip-model) a transformers CLIP folder and eval.fid_model (or --fid-model) an image-encoder "
                   "folder; nothing is downloaded")


def to_pil(pixels: torch.Tensor) -> Image.Image:
    arr = ((pixels.permute(1, 2, 0).float().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@dataclass
class HeldOut:
    captions: list[str]
    images: Optional[list[Image.Image]]  # None for a latent cache (no pixels stored)

    @classmethod
    def read(cls, view, n: int) -> "HeldOut":
        items, _ = read_items(view, n)
        images = [to_pil(it["pixel_values"]) for it in items] if items and "pixel_values" in items[0] else None
        return cls([it["caption"] for it in items], images)


class QualityProbe:
    def __init__(self, held_out: HeldOut, clip_model: Optional[str], fid_model: Optional[str], device: torch.device,
                 options: tuple[str, str] = ("eval.clip_model", "eval.fid_model")):
        self.held_out = held_out
        self.clip = ClipScorer(clip_model, device, options[0]) if clip_model else None
        self.features = ImageFeatures(fid_model, device, options[1]) if fid_model else None
        self.real = None
        if self.features is not None and held_out.images is not None:
            self.real = self.features(held_out.images)

    def measure(self, pipe, steps: int, guidance: float, sampler: str, seed: int = 0) -> tuple[dict, list]:
        captions = self.held_out.captions
        images = generate(pipe, captions, [seed + i for i in range(len(captions))], steps=steps,
                          guidance=guidance, sampler=sampler)
        out: dict = {}
        if self.clip is not None:
            out["clip_score"] = self.clip.score(images, captions)
        if self.real is not None:
            out["fid"] = frechet_distance(self.real, self.features(images))
            out["fid_features"] = self.features.name
        out["quality_n"] = len(images)
        return out, images
