"""Image-quality scores from local weights: CLIP score and FID (Frechet distance of image features).

Nothing is downloaded and no pickle is read: the models load from a local folder as transformers'
`save_pretrained` writes it (config.json + safetensors weights; `.bin` files and remote code are
refused). A missing or wrong folder is one sentence naming the option.

FID is the Frechet distance between Gaussians fitted to features of generated and of real images.
The standard Inception-v3 features (torch-fidelity, or torchmetrics on top of it) are not used:
torch-fidelity requires torchvision, which pins its own torch build, and reads its weights with an
unrestricted torch.load. Any transformers image encoder works instead (CLIP's vision tower, DINOv2,
ViT: "FD_DINOv2" of Stein et al. 2023 is one such choice); the numbers are comparable only between
runs scored with the same encoder and the same number of images, which `eval` prints with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from colodiffusion.config import ConfigError
from colodiffusion.models import bounds

SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")


def check_folder(folder: str | Path, option: str, what: str) -> Path:
    """The folder, or ConfigError saying what `option` must point to."""
    p = Path(folder)
    if not (p / "config.json").is_file() or not any((p / name).is_file() for name in SAFETENSORS):
        raise ConfigError(f"{option} '{folder}' is not a local {what} folder with safetensors weights (config.json "
                          "and model.safetensors, as save_pretrained writes them); nothing is downloaded.")
    bounds.check_folder(p, what)
    return p


def _pooled(out) -> torch.Tensor:
    """Embeddings from get_*_features (a tensor in older transformers, an output with pooler_output in newer)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _clip_processor(folder: Path, image_size: int):
    from transformers import CLIPImageProcessor

    if (folder / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


class ClipScorer:
    """CLIP score: 100 * max(cosine(image embedding, text embedding), 0), averaged (Hessel et al. 2021,
    as torchmetrics' CLIPScore computes it)."""

    def __init__(self, folder: str | Path, device: torch.device, option: str = "eval.clip_model"):
        from transformers import AutoTokenizer, CLIPModel

        path = check_folder(folder, option, "CLIP (transformers CLIPModel)")
        try:
            self.model = CLIPModel.from_pretrained(path, use_safetensors=True, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{option} '{folder}' cannot be loaded as a CLIP model with its tokenizer "
                              f"({(str(exc).splitlines() or [''])[0][:160]}).") from None
        self.model.eval().to(device)
        self.device = device
        self.processor = _clip_processor(path, self.model.config.vision_config.image_size)
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return torch.nn.functional.normalize(
            _pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1
        )

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        return torch.nn.functional.normalize(_pooled(out).float(), dim=-1)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], batch_size: int = 32) -> float:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = []
        for a in range(0, len(images), batch_size):
            cos = (
                self.image_embeddings(images[a : a + batch_size]) * self.text_embeddings(prompts[a : a + batch_size])
            ).sum(-1)
            scores.append((100 * cos).clamp(min=0).cpu())
        return float(torch.cat(scores).mean())


class ImageFeatures:
    """Pooled features of a local transformers image encoder: CLIP (its projected image embedding), or
    any AutoModel vision backbone (pooler_output, else the mean of its last hidden state)."""

    def __init__(self, folder: str | Path, device: torch.device, option: str = "eval.fid_model"):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPModel

        path = check_folder(folder, option, "image-encoder")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            self.clip = config.model_type == "clip"
            model_cls = CLIPModel if self.clip else AutoModel
            self.model = model_cls.from_pretrained(path, use_safetensors=True, local_files_only=True)
            if self.clip:
                self.processor = _clip_processor(path, config.vision_config.image_size)
            else:
                self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{option} '{folder}' cannot be loaded as an image encoder with its image processor "
                              f"({(str(exc).splitlines() or [''])[0][:160]}).") from None
        self.name = f"{config.model_type} ({path.name})"
        self.model.eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        out = []
        for a in range(0, len(images), batch_size):
            pixels = self.processor(images=list(images[a:a + batch_size]), return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device)
            if self.clip:
                feats = _pooled(self.model.get_image_features(pixel_values=pixels))
            else:
                res = self.model(pixel_values=pixels)
                pooled = getattr(res, "pooler_output", None)
                feats = pooled if pooled is not None else res.last_hidden_state.mean(dim=1)
            out.append(feats.reshape(feats.shape[0], -1).double().cpu().numpy())
        return np.concatenate(out)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two (N, D) feature sets.

    Tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    S_a^(1/2) S_b S_a^(1/2) (same spectrum), with numpy's eigh: no complex parts to discard."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least two images on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ s_b @ root_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)
