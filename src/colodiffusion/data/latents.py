"""Training from the latent cache written by `colodiffusion cache` (see data/cache.py), and the
shapes data's in-memory latents (data.cache_latents, `EncodedShapes`).

A cache folder holds manifest.json, shard-NNNNN.safetensors (per sample: VAE posterior `mean` and
`logvar` in fp16, the text encoder's `context` in fp16; captions and keys in the metadata),
empty_context.safetensors (the context of "" for caption dropout) and components/ (the frozen
tokenizer, text encoder and VAE that made it). Shards are memory-mapped: a sample is three row
copies, no decode. The trainer samples latents from the stored moments with its own noise
generator, exactly as it would sample the VAE posterior, so nothing else changes.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from colodiffusion.config import ConfigError
from colodiffusion.models import bounds
from colodiffusion.storage.sealed import is_sealed
from colodiffusion.storage.files import loads_json

MANIFEST = "manifest.json"
_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64}
_REBUILD = "rebuild it with `colodiffusion cache`"


def mmap_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Zero-copy numpy views of a safetensors file's tensors, and its metadata.

    The file is untrusted (a user-given cache): the safetensors library validates the header first
    (its length is bounded, tensors have known dtypes, shapes match their byte ranges, which lie inside
    the file and cover it), so a crafted file is one ValueError, never a huge read or an out-of-range view."""
    try:
        with safe_open(str(path), framework="np"):
            pass
    except (SafetensorError, OSError) as exc:
        detail = (str(exc).splitlines() or [""])[0][:160]
        raise ValueError(f"'{path}' is not a valid safetensors file ({detail}); {_REBUILD}") from None
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = loads_json(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"'{path}' holds tensor '{name}' as {info['dtype']}, not a latent cache dtype; {_REBUILD}")
        a, b = info["data_offsets"]
        out[name] = raw[a:b].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out, meta


def read_manifest(path: str | Path) -> dict:
    """The cache's manifest, with every shard entry a plain file name in the cache folder and a count."""
    file = Path(path) / MANIFEST
    try:
        manifest = loads_json(file.read_text())
        shards = manifest["shards"]
        ok = isinstance(shards, list) and all(
            isinstance(s["file"], str) and Path(s["file"]).name == s["file"] not in ("", ".", "..")
            and type(s["count"]) is int and s["count"] >= 0 for s in shards)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"'{file}' is not a latent cache manifest (shards with a file name and a count); {_REBUILD}")
    return manifest


def _check_shard(file: str, tensors: dict, meta: dict, count: int) -> dict:
    """The shard's captions and keys, after checking it holds `count` rows of everything."""
    try:
        info = {"captions": loads_json(meta["captions"]), "keys": loads_json(meta["keys"])}
        ok = all(isinstance(v, list) and len(v) == count for v in info.values()) and all(
            tensors[k].ndim >= 1 and tensors[k].shape[0] == count for k in ("mean", "logvar", "context"))
    except (KeyError, ValueError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"'{file}' does not hold the {count} samples its manifest lists "
                         f"(mean, logvar, context, captions and keys); {_REBUILD}")
    return info


def cached_components(cfg) -> Optional[Path]:
    """The frozen components a latent cache was made with (used instead of RUN_DIR/components)."""
    if cfg.data.source != "latents" or cfg.model.pretrained:
        return None
    folder = Path(cfg.data.path) / "components"
    if not folder.is_dir():
        return None
    unsealed = [n for n in ("tokenizer", "text_encoder", "vae") if not is_sealed(folder / n)]
    if unsealed:
        raise ConfigError(f"the latent cache '{cfg.data.path}' has incomplete components ({', '.join(unsealed)} "
                          "not sealed: cut short, altered or made by an older version); make it again with "
                          "colodiffusion cache")
    return folder


class LatentDataset(Dataset):
    name = "latents"

    def __init__(self, path: str | Path):
        self.root, self.path = Path(path), str(path)
        if not (self.root / MANIFEST).is_file():
            raise ValueError(f"data.path '{path}' is not a latent cache (no {MANIFEST}; make one with `colodiffusion "
                             "cache`)")
        self.manifest = read_manifest(self.root)
        self.files = [str(self.root / s["file"]) for s in self.manifest["shards"]]
        bounds.check_links(self.root)  # no shard, component or context file that links out of the cache is read
        self.counts = counts = [s["count"] for s in self.manifest["shards"]]
        self.starts = [sum(counts[:k]) for k in range(len(counts))]
        self.n = sum(counts)
        if self.n == 0:
            raise ValueError(f"the latent cache '{path}' holds no samples")
        empty, _ = mmap_safetensors(self.root / "empty_context.safetensors")
        if "context" not in empty:
            raise ValueError(f"'{self.root / 'empty_context.safetensors'}' holds no 'context' tensor; {_REBUILD}")
        self.empty_context = torch.from_numpy(np.array(empty["context"]))
        self._maps: dict = {}
        self._pid = -1
        for k in range(len(self.files)):  # headers only: a damaged shard is found now, not in a worker mid-run
            self._load(k)

    def __len__(self) -> int:
        return self.n

    def _shard(self, k: int) -> tuple[dict, dict]:
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        m = self._maps.get(k)
        if m is None:
            m = self._maps[k] = self._load(k)
        return m

    def _load(self, k: int) -> tuple[dict, dict]:
        tensors, meta = mmap_safetensors(self.files[k])
        return tensors, _check_shard(self.files[k], tensors, meta, self.counts[k])

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


class EncodedShapes(Dataset):
    """The shapes data with each image's autoencoder posterior computed once, in memory
    (data.cache_latents): item i is its caption and the posterior's `latent_mean` and `latent_logvar`
    (float32, on the CPU), and training samples the latents from them (`sample_latents`) with the same
    generator draws as encoding the image would. Valid because a shapes item depends only on its index
    (no random crop or flip) and the autoencoder is frozen once the UNet trains. The images are encoded
    in order, in fixed batches, so a resumed run computes the same numbers."""

    def __init__(self, shapes, vae, device: torch.device, batch_size: int = 64):
        self.shapes, self.name = shapes, "shapes"
        n = len(shapes)
        mean = logvar = None
        with torch.no_grad():
            for start in range(0, n, batch_size):
                idx = range(start, min(n, start + batch_size))
                pixels = torch.stack([shapes[i]["pixel_values"] for i in idx]).to(device, vae.dtype)
                dist = vae.encode(pixels).latent_dist
                if mean is None:
                    mean = torch.empty((n, *dist.mean.shape[1:]), dtype=torch.float32)
                    logvar = torch.empty_like(mean)
                mean[start:start + len(idx)] = dist.mean.float().cpu()
                logvar[start:start + len(idx)] = dist.logvar.float().cpu()
        self.mean, self.logvar = mean, logvar

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"latent_mean": self.mean[i], "latent_logvar": self.logvar[i], "caption": self.shapes.caption_at(i)}


def sample_latents(batch: dict, scaling_factor: float, device: torch.device,
                   generator: torch.Generator) -> torch.Tensor:
    """Scaled latents sampled from the stored posterior moments: the numbers and generator draws of
    `encode_images` on the images they were computed from."""
    mean = batch["latent_mean"].to(device, torch.float32, non_blocking=True)
    std = torch.exp(0.5 * batch["latent_logvar"].to(device, torch.float32, non_blocking=True))
    noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
    return (mean + std * noise) * scaling_factor


def latents_and_context(batch: dict, captions: list[str], scaling_factor: float, device: torch.device,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled latents sampled from the stored posterior, context with dropped captions' context
    replaced by the empty prompt's): the same numbers and RNG draws as encode_images/encode_prompts."""
    latents = sample_latents(batch, scaling_factor, device, generator)
    context = batch["context"].to(device, torch.float32, non_blocking=True)
    # Built on the host, then copied without blocking: torch.tensor(..., device=cuda) would sync.
    dropped = torch.tensor([c == "" for c in captions]).to(device, non_blocking=True)
    empty = batch["empty_context"].to(device, torch.float32, non_blocking=True)
    context = torch.where(dropped[:, None, None], empty, context)
    return latents, context
