"""First stage: train the tiny preset's KL autoencoder on the data, then measure its latent scale.

SD's 0.18215 is 1 / std of its VAE's latents on its data; we measure ours the same way so that
scaled latents have unit variance, which the noise schedule assumes. Both phases draw from their own
seeded generators; the trained VAE is saved sealed only when both are done, so a kill in either
makes the next start train it again from scratch, with the same result."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm import tqdm

from colodiffusion.config import ConfigError
from colodiffusion.data import caption_corpus
from colodiffusion.data.loader import ResumableLoader
from colodiffusion.models import Components, build_components
from colodiffusion.models.components import component_seed
from colodiffusion.storage import faults
from colodiffusion.train import signals


def frozen_components(
    cfg, dataset, components_dir: Path, device: torch.device, show_progress: bool = True
) -> Components:
    """The run's components; for a preset without given frozen parts this trains its tokenizer on the
    captions and its autoencoder on the images (saved to `components_dir`, reused from there)."""
    return build_components(cfg, components_dir, captions=lambda: caption_corpus(cfg.data, dataset),
                            train_vae=lambda vae: train_autoencoder(vae, dataset, cfg, device, show_progress))


def train_autoencoder(
    vae: AutoencoderKL, dataset, cfg, device: torch.device, show_progress: bool = True
) -> AutoencoderKL:
    fs = cfg.first_stage
    vae = vae.to(device).train()
    gen = torch.Generator(device).manual_seed(component_seed(cfg.train.seed, "first_stage"))
    opt = torch.optim.AdamW(vae.parameters(), lr=fs.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (1 - s / max(1, fs.steps)) ** 0.5)
    loader = ResumableLoader(dataset, first_stage_batch(fs.batch_size, len(dataset)),
                             seed=cfg.train.seed + 1)
    bar = tqdm(range(fs.steps), desc="first stage (autoencoder)", disable=not show_progress, mininterval=1.0)
    for i in bar:
        if i == fs.steps // 2:
            faults.point("first_stage")  # the kill tests stop here, mid-training
        signals.check_stopped("the first stage (autoencoder)")  # SIGTERM: nothing to save yet, stop now
        x = next(loader)["pixel_values"].to(device)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=gen)).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        loss = rec + fs.kl_weight * dist.kl().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if bar.n % 25 == 0:
            bar.set_postfix(recon=f"{rec.item():.4f}", refresh=False)
    vae.eval()
    faults.point("scale_factor")
    gen = torch.Generator(device).manual_seed(component_seed(cfg.train.seed, "scale_factor"))
    vae.register_to_config(scaling_factor=measure_scaling_factor(vae, dataset, fs.scale_samples, device, gen))
    return vae.cpu()


def first_stage_batch(batch_size: int, samples: int) -> int:
    """first_stage.batch_size, or the whole dataset when it holds fewer images (said once, as
    train.batch_size is lowered for a small dataset): a batch of 16 from 10 images cannot be drawn."""
    if samples < 1:
        raise ConfigError("the dataset holds no images to train the autoencoder on; check data.path.")
    if samples >= batch_size:
        return batch_size
    print(f"the dataset has {samples} images, fewer than first_stage.batch_size={batch_size}: training the "
          f"autoencoder with batches of {samples}; set first_stage.batch_size to choose another")
    return samples


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, dataset, n: int, device, gen) -> float:
    loader = ResumableLoader(dataset, min(64, n, len(dataset)), seed=12345)
    zs, seen = [], 0
    while seen < min(n, len(dataset)):
        x = next(loader)["pixel_values"].to(device)
        zs.append(vae.encode(x).latent_dist.sample(generator=gen).float().cpu())
        seen += x.shape[0]
    return float(1.0 / torch.cat(zs).std())
