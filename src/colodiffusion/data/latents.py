"""Training from the latent cache written by `colodiffusion cache` (see data/cache.py).

A cache folder holds manifest.json, shard-NNNNN.safetensors (per sample: VAE posterior `mean` and
`logvar` in fp16, the text encoder's `context` in fp16; captions and keys in the metadata),
empty_context.safetensors (the context of "" for caption dropout) and components/ (the frozen
tokenizer, text encoder and VAE that made it). Shards are memory-mapped: a sample is three row
copies, no decode. The trainer samples latents from the stored moments with its own noise
generator, exactly as it would sample the VAE posterior, so nothing else changes.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

MANIFEST = "manifest.json"
_DTYPES = {"F16": np.float16, "BF16": None, "F32": np.float32, "I64": np.int64}


def mmap_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Zero-copy numpy views of a safetensors file's tensors, and its metadata."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        out[name] = raw[a:b].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out, meta


def read_manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def cached_components(cfg) -> Optional[Path]:
    """The frozen components a latent cache was made with (used instead of RUN_DIR/components)."""
    if cfg.data.source != "latents" or cfg.model.pretrained:
        return None
    folder = Path(cfg.data.path) / "components"
    return folder if folder.is_dir() else None


class LatentDataset(Dataset):
    name = "latents"

    def __init__(self, path: str | Path):
        self.root = Path(path)
        if not (self.root / MANIFEST).is_file():
            raise ValueError(f"data.path '{path}' is not a latent cache (no {MANIFEST}; make one with `colodiffusion cache`)")
        self.manifest = read_manifest(self.root)
        self.files = [str(self.root / s["file"]) for s in self.manifest["shards"]]
        counts = [s["count"] for s in self.manifest["shards"]]
        self.starts = [sum(counts[:k]) for k in range(len(counts))]
        self.n = sum(counts)
        if self.n == 0:
            raise ValueError(f"the latent cache '{path}' holds no samples")
        empty, _ = mmap_safetensors(self.root / "empty_context.safetensors")
        self.empty_context = torch.from_numpy(np.array(empty["context"]))
        self._maps: dict = {}
        self._pid = -1

    def __len__(self) -> int:
        return self.n

    def _shard(self, k: int) -> tuple[dict, dict]:
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        m = self._maps.get(k)
        if m is None:
            tensors, meta = mmap_safetensors(self.files[k])
            m = self._maps[k] = (tensors, {"captions": json.loads(meta["captions"]), "keys": json.loads(meta["keys"])})
        return m

    def locate(self, i: int) -> tuple[int, int]:
        k = bisect_right(self.starts, i) - 1
        return k, i - self.starts[k]

    def key(self, i: int) -> str:
        k, r = self.locate(i)
        return self._shard(k)[1]["keys"][r]

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, r = self.locate(i)
        t, meta = self._shard(k)
        return {"latent_mean": torch.from_numpy(np.array(t["mean"][r])),
                "latent_logvar": torch.from_numpy(np.array(t["logvar"][r])),
                "context": torch.from_numpy(np.array(t["context"][r])),
                "caption": meta["captions"][r]}

    def batch_extras(self) -> dict[str, torch.Tensor]:
        return {"empty_context": self.empty_context}

    def captions(self):
        for k in range(len(self.files)):
            yield from self._shard(k)[1]["captions"]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["_pid"] = {}, -1
        return state


def latents_and_context(batch: dict, captions: list[str], scaling_factor: float, device: torch.device,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled latents sampled from the stored posterior, context with dropped captions' context
    replaced by the empty prompt's): the same numbers and RNG draws as encode_images/encode_prompts."""
    mean = batch["latent_mean"].to(device, torch.float32, non_blocking=True)
    std = torch.exp(0.5 * batch["latent_logvar"].to(device, torch.float32, non_blocking=True))
    noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
    context = batch["context"].to(device, torch.float32, non_blocking=True)
    # Built on the host, then copied without blocking: torch.tensor(..., device=cuda) would sync.
    dropped = torch.tensor([c == "" for c in captions]).to(device, non_blocking=True)
    empty = batch["empty_context"].to(device, torch.float32, non_blocking=True)
    context = torch.where(dropped[:, None, None], empty, context)
    return (mean + std * noise) * scaling_factor, context
