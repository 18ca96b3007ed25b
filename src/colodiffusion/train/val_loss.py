"""The validation loss: the training objective on held-out samples at fixed timesteps and noise.

Each held-out sample is encoded once (the VAE posterior mean, not a draw) and scored at
`VAL_TIMESTEPS` evenly spaced timesteps, with noise from a generator seeded by the sample's position
in the validation data alone (not by train.seed, the rank count or the batch size), so the same
weights give the same number in any run and a change of the number is a change of the model.
Training's RNG streams are not touched: a run trains identically with or without validation.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from colodiffusion.config import ConfigError
from colodiffusion.data.loader import collate
from colodiffusion.data.transforms import BadSample, Filtered, size_conditioning

VAL_TIMESTEPS = 4  # timesteps per sample: (k + 0.5) / 4 of the schedule, k = 0..3
NOISE_SEED = 1_000_033  # base seed of the fixed noise (sample i uses NOISE_SEED + i)


@dataclass
class ValidationSet:
    latents: torch.Tensor  # (N, C, H, W) scaled posterior means, on the CPU
    captions: list[str]
    contexts: Optional[torch.Tensor] = None  # (N, L, D) from a latent cache; else encoded at each validation
    skipped: int = 0  # held-out samples that could not be read
    time_ids: Optional[torch.Tensor] = None  # (N, 6) SDXL size/crop conditioning of each sample

    def __len__(self) -> int:
        return len(self.captions)

    def noise(self, i: int) -> torch.Tensor:
        """(VAL_TIMESTEPS, C, H, W) noise of sample i, the same on every device and in every run."""
        g = torch.Generator().manual_seed(NOISE_SEED + i)
        return torch.randn((VAL_TIMESTEPS, *self.latents.shape[1:]), generator=g)


def read_items(view, limit: int) -> tuple[list[dict], int]:
    """Up to `limit` held-out samples spread over `view` (`SampleView.eval_item`), and how many were bad."""
    n = len(view)
    m = min(n, limit)
    items, skipped = [], 0
    for k in (j * n // m for j in range(m)):
        try:
            items.append(view.eval_item(k))
        except (BadSample, Filtered):
            skipped += 1
    return items, skipped


@torch.no_grad()
def build_validation(view, limit: int, vae, device: torch.device, batch_size: int = 16) -> ValidationSet:
    items, skipped = read_items(view, limit)
    if not items:
        raise ConfigError(f"none of the {skipped} validation samples can be read; check data.val_path / the data")
    captions = [it["caption"] for it in items]
    if "latent_mean" in items[0]:  # a latent cache: stored moments and text contexts
        scale = float(vae.config.scaling_factor)
        latents = torch.stack([it["latent_mean"] for it in items]).float() * scale
        return ValidationSet(latents, captions, torch.stack([it["context"] for it in items]).float(), skipped)
    pixels = torch.stack([it["pixel_values"] for it in items])
    chunks = []
    for a in range(0, len(pixels), batch_size):
        x = pixels[a:a + batch_size].to(device, vae.dtype)
        chunks.append(vae.encode(x).latent_dist.mean.float().cpu())
    return ValidationSet(torch.cat(chunks) * float(vae.config.scaling_factor), captions, None, skipped,
                         size_conditioning(collate(items)))


def timesteps(num_timesteps: int) -> torch.Tensor:
    return torch.tensor([int((k + 0.5) * num_timesteps / VAL_TIMESTEPS) for k in range(VAL_TIMESTEPS)])


@torch.no_grad()
def validation_loss(objective, model_fn: Callable, context_fn: Callable[[list[str], Optional[torch.Tensor]], object],
                    vset: ValidationSet, batch_size: int, device: torch.device, rank: int = 0, world_size: int = 1,
                    autocast: Callable = contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted per-sample losses, count) over this rank's share of the (sample, timestep)
    rows; the mean over all ranks is sum / count after summing both. Every rank runs the same number
    of forward passes (padding rows weigh 0): sharded models gather weights collectively in forward.
    `context_fn(captions, time_ids)` gives the rows' text context (`time_ids`: their (n, 6) SDXL sizes)."""
    rows = [(i, k) for i in range(len(vset)) for k in range(VAL_TIMESTEPS)]
    mine = rows[rank::world_size]
    per_rank = math.ceil(len(rows) / world_size)
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [rows[0]] * (per_rank - len(mine))
    ts = timesteps(objective.num_timesteps)
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for a in range(0, per_rank, batch_size):
        chunk = mine[a:a + batch_size]
        idx = [i for i, _ in chunk]
        x0 = vset.latents[idx].to(device)
        t = ts[[k for _, k in chunk]].to(device)
        noise = torch.stack([vset.noise(i)[k] for i, k in chunk]).to(device)
        if vset.contexts is not None:
            context = vset.contexts[idx].to(device)
        else:
            time_ids = vset.time_ids[idx] if vset.time_ids is not None else None
            context = context_fn([vset.captions[i] for i in idx], time_ids)
        with autocast():
            per_sample = objective.per_sample_loss(model_fn, x0, context, t, noise)
        w = torch.tensor(weights[a:a + batch_size], device=device)
        total += (per_sample.float() * w).sum()
        count += w.sum()
    return total, count
