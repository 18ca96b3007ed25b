"""A folder of images with same-name .txt captions (a.jpg + a.txt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def to_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, center-crop, scale to [-1, 1] CHW float32."""
    img = img.convert("RGB")
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class FolderDataset(Dataset):
    def __init__(self, path: str, resolution: int, random_flip: bool = False):
        self.root, self.resolution, self.random_flip = Path(path), resolution, random_flip
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise ValueError(f"data.path '{path}' holds no images ({', '.join(sorted(IMAGE_EXTS))})")

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, i: int) -> str:
        txt = self.files[i].with_suffix(".txt")
        return txt.read_text(encoding="utf-8").strip() if txt.exists() else ""

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as img:
            x = to_tensor(img, self.resolution)
        if self.random_flip and torch.rand(1, generator=torch.Generator().manual_seed(i)).item() < 0.5:
            x = x.flip(-1)
        return {"pixel_values": x, "caption": self.caption(i)}

    def captions(self):
        return [self.caption(i) for i in range(len(self))]
