"""What a run is made of, built in order by `train.loop.train`: the step count, the sample prompts,
the model's components (speed/memory levers on), the training state (backend-wrapped model,
optimizer, LR schedule, EMA, loader, RNG streams, numerical guard) and the held-out evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from colodiffusion.config import Config, ConfigError
from colodiffusion.data import sample_prompts
from colodiffusion.data.latents import cached_components
from colodiffusion.data.loader import ResumableLoader
from colodiffusion.models import Components
from colodiffusion.models.trainable import build_trainable, text_encoder_param_ids
from colodiffusion.parallel import Backend
from colodiffusion.train import guards, signals
from colodiffusion.train.clip_fid_probe import HeldOut, QualityProbe
from colodiffusion.train.first_stage import frozen_components
from colodiffusion.train.optim import EMA, build_lr_scheduler, build_optimizer
from colodiffusion.train.perf import apply_perf
from colodiffusion.train.val_loss import ValidationSet, build_validation


@dataclass
class State:
    """Everything the loop mutates; the checkpoints (train/loop.py: `shared_state`, `rank_state`,
    `Trainer.resume`) round-trip it exactly."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: Optional[EMA]
    loader: ResumableLoader
    noise_gen: torch.Generator  # timesteps, noise, VAE posterior samples (on the device)
    data_gen: torch.Generator  # caption dropout (on the CPU: no device sync to read it)
    guard: guards.NumericalGuard  # skips and counts non-finite steps (train/guards.py)
    step: int = 0
    val: Optional[ValidationSet] = None  # held-out samples for the validation loss (train/val_loss.py)
    quality: Optional[QualityProbe] = None  # CLIP score / FID on held-out captions (main rank, eval.every)


def apply_max_epochs(cfg: Config, backend: Backend, dataset) -> None:
    """`train.max_epochs` (the original project's knob) as a step count: the smaller of it and
    train.max_steps becomes train.max_steps, so the LR schedule spans the run that will happen."""
    train_cfg = cfg.train
    if not train_cfg.max_epochs:
        return
    steps = max(1, train_cfg.max_epochs * batches_per_epoch(cfg, backend, dataset) // train_cfg.grad_accum)
    if steps < train_cfg.max_steps:
        if backend.is_main:
            print(f"train.max_epochs={train_cfg.max_epochs}: {steps} steps of {train_cfg.batch_size} "
                  f"over {len(dataset)} samples")
        train_cfg.max_steps = steps


def batches_per_epoch(cfg: Config, backend: Backend, dataset) -> int:
    """Micro-batches per rank in one pass over the data (what train.max_epochs and save_every_n_epochs count)."""
    micro = max(1, cfg.train.batch_size // backend.dp_size // cfg.train.grad_accum)
    return max(1, len(dataset) // backend.dp_size // micro)


def choose_sample_prompts(cfg: Config, backend: Backend, dataset, bad: frozenset = frozenset()) -> None:
    """sample.prompts unset: the grid shows captions from the data (the demo's prompts for shapes),
    never those of samples known to be bad (`bad`: their indices)."""
    if cfg.sample.prompts or not cfg.train.sample_every:
        return
    cfg.sample.prompts = sample_prompts(cfg, dataset, bad)
    if backend.is_main and cfg.data.source != "shapes":
        print(f"sample.prompts is not set: sample grids use captions from the data: {cfg.sample.prompts}")


def build_model(cfg: Config, backend: Backend, run_dir: Path, dataset) -> Components:
    """The main rank builds (and for tiny, trains) the frozen parts first; the others then load them."""
    def make(show: bool) -> Components:
        return frozen_components(cfg, dataset, cached_components(cfg) or run_dir / "components", backend.device, show)

    comps, stopped = None, None
    if backend.is_main:
        try:
            comps = make(True)
        except signals.Stopped as exc:
            stopped = exc
    backend.barrier()
    if signals.any_rank(backend, stopped is not None):  # every rank ends with the main rank
        raise stopped or signals.Stopped("stopped by a signal on the main rank during the first stage")
    if comps is None:
        comps = make(False)
    if cfg.data.source != "latents":  # training from the latent cache needs neither on the accelerator
        comps.text_encoder.to(backend.device)
        comps.vae.to(backend.device)
        if comps.is_sdxl:
            comps.text_encoder_2.to(backend.device)
    # The model conversions; tensor parallel, activation checkpointing, compile and FSDP follow in
    # backend.prepare (parallel/parallelize.py), after the LoRA adapters.
    apply_perf(comps.unet, cfg.perf, cfg.precision, backend.device)
    return comps


def encode_once(cfg: Config, backend: Backend, comps: Components, dataset):
    """The shapes data with every image encoded once, in memory (data.cache_latents; null: when the run
    reads each image more than once), else `dataset` itself. Every rank encodes all of them (its share
    changes each epoch). Measured on the default run (2-core CPU, 2026-12-04): the autoencoder's encode
    takes 1.5 ms an image, so 20,000 images read 2.4 times each cost 74 s of encoding during training and
    27-29 s once."""
    d = cfg.data
    reads = cfg.train.max_steps * cfg.train.batch_size
    on = d.cache_latents if d.cache_latents is not None else reads > len(dataset)
    if not on or d.source != "shapes" or comps.is_sdxl:
        return dataset
    from dataclasses import replace

    from colodiffusion.data.latents import EncodedShapes
    from colodiffusion.data.views import SampleView

    t0 = time.perf_counter()
    if isinstance(dataset, SampleView):  # a held-out split: encode the source, keep the view
        source = dataset.parts[0].source
        encoded = EncodedShapes(source, comps.vae, backend.device)
        parts = [replace(p, source=encoded) if p.source is source else p for p in dataset.parts]
        out = SampleView(parts, dataset.caption_tags, dataset.seed)
    else:
        encoded = out = EncodedShapes(dataset, comps.vae, backend.device)
    if backend.is_main:
        print(f"data.cache_latents: {len(encoded)} images encoded once in {time.perf_counter() - t0:.0f} s "
              f"(the run reads {reads / len(dataset):.1f} per image)")
    return out


def build_state(cfg: Config, backend: Backend, comps: Components, dataset) -> State:
    train_cfg = cfg.train
    per_rank = train_cfg.batch_size // backend.dp_size
    if train_cfg.batch_size % backend.dp_size or per_rank % train_cfg.grad_accum:
        raise ConfigError(
            f"train.batch_size ({train_cfg.batch_size}) must split evenly over {backend.dp_size} data-parallel "
            f"rank(s) and train.grad_accum ({train_cfg.grad_accum}) micro-batches."
        )
    torch.manual_seed(train_cfg.seed)  # global-RNG users (LoRA init) start the same however the components were made
    # the UNet, with LoRA adapters and/or the text encoder if configured
    trainable = build_trainable(cfg.model, cfg.train.lora, comps)
    te_params = frozenset(text_encoder_param_ids(trainable))
    guard = guards.NumericalGuard(cfg, backend)
    model, optimizer = backend.prepare(
        trainable, lambda params, **kw: build_optimizer(params, cfg, backend.device, te_params, **kw))
    ema = (EMA(backend.unwrap(model).named_parameters(), train_cfg.ema.decay, train_cfg.ema.warmup, optimizer)
           if train_cfg.ema.enabled else None)
    loader = ResumableLoader(dataset, per_rank // train_cfg.grad_accum, seed=train_cfg.seed, rank=backend.dp_rank,
                             world_size=backend.dp_size, num_workers=cfg.data.num_workers,
                             bad_log=Path(cfg.run.dir) / "bad_samples.jsonl",
                             max_bad_fraction=cfg.data.max_bad_fraction, block_shuffle=cfg.data.shuffle == "block",
                             pin_memory=backend.device.type == "cuda")
    noise_gen = torch.Generator(backend.device).manual_seed(train_cfg.seed * 7919 + 1 + backend.dp_rank)
    data_gen = torch.Generator("cpu").manual_seed(train_cfg.seed * 7919 + 2 + backend.dp_rank)
    return State(model, optimizer, build_lr_scheduler(optimizer, cfg.train), ema, loader, noise_gen, data_gen, guard)


def build_evaluation(cfg: Config, backend: Backend, comps: Components, state: State, val_data) -> None:
    """The held-out samples of the validation loss (every rank) and the CLIP/FID probe (main rank)."""
    if val_data is not None and cfg.train.val_every:
        state.val = build_validation(val_data, cfg.train.val_samples, comps.vae, backend.device)
    if cfg.eval.every and backend.is_main:  # (config validation made sure there is held-out data)
        held_out = HeldOut.read(val_data, cfg.eval.num_images)
        state.quality = QualityProbe(held_out, cfg.eval.clip_model, cfg.eval.fid_model, backend.device)
