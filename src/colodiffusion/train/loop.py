"""The training loop: config -> (data, models, backend) -> steps -> checkpoints, metrics, samples -> final/.

Read it top to bottom: `train` builds everything with `build_*` helpers, restores a checkpoint if
asked, then runs `train_step` until `train.max_steps`. The only host syncs are at the logging
interval (loss and grad norm are accumulated on the device in between).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from colodiffusion.config import Config, ConfigError
from colodiffusion.data import build_datasets, sample_prompts
from colodiffusion.data.latents import cached_components, latents_and_context
from colodiffusion.data.loader import ResumableLoader
from colodiffusion.data.transforms import size_conditioning
from colodiffusion.diffusion import alphas_cumprod, build_objective, drop_captions
from colodiffusion.generate import export_diffusers, make_pipeline, render, save_grid
from colodiffusion.models import Components, encode_images
from colodiffusion.models.components import unet_call
from colodiffusion.models.lora import has_lora, lora_shape, merged, save_lora
from colodiffusion.models.single_file import save_single_file
from colodiffusion.models.trainable import build_trainable, split, text_encoder_param_ids, text_input
from colodiffusion.parallel import Backend, build_backend
from colodiffusion.storage import checkpoint
from colodiffusion.storage.sealed import write_file, write_sealed
from colodiffusion.train import dataset_info, guards, preflight, run_folder, signals
from colodiffusion.train.first_stage import frozen_components
from colodiffusion.train.metadata import kohya_metadata, write_model_card
from colodiffusion.train.optim import EMA, build_lr_scheduler, build_optimizer
from colodiffusion.train.perf import apply_perf
from colodiffusion.train.resume import choose_checkpoint
from colodiffusion.train.clip_fid_probe import HeldOut, QualityProbe
from colodiffusion.train.telemetry import Telemetry
from colodiffusion.train.trackers import Trackers, device_memory
from colodiffusion.train.trackers import check_available as check_trackers
from colodiffusion.train.val_loss import ValidationSet, build_validation, validation_loss


@dataclass
class State:
    """Everything the loop mutates; `checkpoint_state` / `restore` round-trip it exactly."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: Optional[EMA]
    loader: ResumableLoader
    noise_gen: torch.Generator  # timesteps, noise, VAE posterior samples (on the device)
    data_gen: torch.Generator  # caption dropout (on the CPU: no device sync to read it)
    step: int = 0
    guard: Optional[guards.NumericalGuard] = None  # skips and counts non-finite steps (train/guards.py)
    val: Optional[ValidationSet] = None  # held-out samples for the validation loss (train/val_loss.py)
    quality: Optional[QualityProbe] = None  # CLIP score / FID on held-out captions (main rank, eval.every)


def train(cfg: Config) -> Path:
    check_trackers(cfg)  # a missing wandb/mlflow stops here, before anything is built
    backend = build_backend(cfg)
    signals.install()  # SIGTERM/SIGUSR1: finish the step, checkpoint, return (train/signals.py)
    clean, lock = False, None
    try:
        run_dir = Path(cfg.run.dir)
        with run_folder.removed_if_refused(backend, run_dir):  # bad data leaves no run folder behind
            lock = run_folder.check(cfg, backend, run_dir)  # ours and locked; continue, start over or refuse
            dataset, val_data = build_datasets(cfg)
            dataset_info.fit_batch(cfg, backend, dataset)  # 20 images and batch 32: a batch of 20, said once
            apply_max_epochs(cfg, backend, dataset)
            bad = preflight.check(cfg, backend, run_dir, dataset)  # indices of the bad samples it met
        run_folder.prepare(cfg, backend, run_dir)
        choose_sample_prompts(cfg, backend, dataset, bad)
        comps = build_model(cfg, backend, run_dir, dataset)
        dataset_info.report(cfg, backend, dataset, comps.tokenizer, run_dir, bad)  # tokenizer coverage; run_info.json
        state = build_state(cfg, backend, comps, dataset)
        build_evaluation(cfg, backend, comps, state, val_data)
        resume(cfg, backend, state, run_dir)
        if run_loop(cfg, backend, comps, state, run_dir):
            export_final(cfg, backend, comps, state, run_dir)
        backend.barrier()
        clean = True
        return run_dir
    except signals.Stopped as stop:  # a stop signal before anything could be checkpointed: exit 0
        if backend.is_main:
            print(stop)
        clean = True
        return run_dir
    except Exception as exc:
        clearer = backend.explain_failure(exc)  # e.g. a collective timeout names the rank that went silent
        if clearer is None:
            raise
        raise clearer from exc
    finally:
        signals.uninstall()
        backend.shutdown(clean)
        if lock is not None:
            lock.release()


def apply_max_epochs(cfg: Config, backend: Backend, dataset) -> None:
    """`train.max_epochs` (the original project's knob) as a step count: the smaller of it and train.max_steps
    becomes train.max_steps, so the LR schedule spans the run that will happen."""
    t = cfg.train
    if not t.max_epochs:
        return
    steps = max(1, t.max_epochs * batches_per_epoch(cfg, backend, dataset) // t.grad_accum)
    if steps < t.max_steps:
        if backend.is_main:
            print(f"train.max_epochs={t.max_epochs}: {steps} steps of {t.batch_size} over {len(dataset)} samples")
        t.max_steps = steps


def batches_per_epoch(cfg: Config, backend: Backend, dataset) -> int:
    """Micro-batches per rank in one pass over the data (what train.max_epochs and save_every_n_epochs count)."""
    t = cfg.train
    micro = max(1, t.batch_size // backend.dp_size // t.grad_accum)
    return max(1, len(dataset) // backend.dp_size // micro)


def epochs_done(step: int, batches: int, grad_accum: int) -> int:
    """Whole epochs finished by `step` optimizer steps (epoch e ends at step e * batches // grad_accum)."""
    return ((step + 1) * grad_accum - 1) // batches if step else 0


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
    if cfg.model.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    # Speed/memory levers go on before the backend wraps the model (TP, AC, compile, then FSDP).
    apply_perf(comps.unet, cfg, backend.device)
    return comps


def build_state(cfg: Config, backend: Backend, comps: Components, dataset) -> State:
    t = cfg.train
    per_rank = t.batch_size // backend.dp_size
    if t.batch_size % backend.dp_size or per_rank % t.grad_accum:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must split evenly over {backend.dp_size} data-parallel rank(s) "
            f"and train.grad_accum ({t.grad_accum}) micro-batches."
        )
    torch.manual_seed(t.seed)  # global-RNG users (LoRA init) start the same however the components were made
    trainable = build_trainable(cfg, comps)  # the UNet, with LoRA adapters and/or the text encoder if configured
    te_params = frozenset(text_encoder_param_ids(trainable))
    guard = guards.NumericalGuard(cfg, backend)
    model, optimizer = backend.prepare(
        trainable, lambda params, **kw: guard.wrap(build_optimizer(params, cfg, backend.device, te_params, **kw)))
    ema = EMA(backend.unwrap(model).named_parameters(), t.ema.decay, t.ema.warmup, optimizer) if t.ema.enabled else None
    loader = ResumableLoader(dataset, per_rank // t.grad_accum, seed=t.seed, rank=backend.dp_rank,
                             world_size=backend.dp_size, num_workers=cfg.data.num_workers,
                             bad_log=Path(cfg.run.dir) / "bad_samples.jsonl", max_bad_fraction=cfg.data.max_bad_fraction,
                             block_shuffle=cfg.data.shuffle == "block", pin_memory=backend.device.type == "cuda")
    noise_gen = torch.Generator(backend.device).manual_seed(t.seed * 7919 + 1 + backend.dp_rank)
    data_gen = torch.Generator("cpu").manual_seed(t.seed * 7919 + 2 + backend.dp_rank)
    return State(model, optimizer, build_lr_scheduler(optimizer, cfg), ema, loader, noise_gen, data_gen, guard=guard)


def shared_state(s: State) -> dict:
    return {"step": s.step, "lr_scheduler": s.lr_scheduler.state_dict(), "loader": s.loader.state_dict(),
            "guard": s.guard.state_dict()}


def rank_state(s: State) -> dict:
    state = {"noise_gen": s.noise_gen.get_state(), "data_gen": s.data_gen.get_state(),
             "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout etc. on the GPU
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def build_evaluation(cfg: Config, backend: Backend, comps: Components, s: State, val_data) -> None:
    """The held-out samples of the validation loss (every rank) and the CLIP/FID probe (main rank)."""
    if val_data is not None and cfg.train.val_every:
        s.val = build_validation(val_data, cfg.train.val_samples, comps.vae, backend.device)
    if cfg.eval.every and backend.is_main:  # (config validation made sure there is held-out data)
        held_out = HeldOut.read(val_data, cfg.eval.num_images)
        s.quality = QualityProbe(held_out, cfg.eval.clip_model, cfg.eval.fid_model, backend.device)


def resume(cfg: Config, backend: Backend, s: State, run_dir: Path) -> None:
    mode = signals.resume_mode(cfg.train.resume)  # 'auto' by itself in a restarted torchrun/SLURM worker
    if not mode:
        return
    path = choose_checkpoint(run_dir / "checkpoints", mode, backend)
    if path is None:
        if backend.is_main:
            print(f"train.resume=auto: no checkpoint in {run_dir / 'checkpoints'}, starting from step 0")
        return
    try:
        shared, per_rank = backend.load(path, s.model, s.optimizer, s.ema.state_dict() if s.ema else None)
    except Exception as exc:
        raise ConfigError(f"cannot resume from '{path}': {exc}.") from None
    s.step = int(shared["step"])
    s.lr_scheduler.load_state_dict(shared["lr_scheduler"])
    s.loader.load_state_dict(shared["loader"])
    s.guard.load_state_dict(shared.get("guard", {}))
    if per_rank:  # {} only for a rank the saving run did not have (the backend warned)
        s.noise_gen.set_state(per_rank["noise_gen"])
        s.data_gen.set_state(per_rank["data_gen"])
        torch.set_rng_state(per_rank["torch_rng"])
        if "cuda_rng" in per_rank and torch.cuda.is_available():
            torch.cuda.set_rng_state(per_rank["cuda_rng"])
    if backend.is_main:
        print(f"resumed from {path} at step {s.step}")


def save_checkpoint(cfg: Config, backend: Backend, s: State, run_dir: Path) -> None:
    s.guard.check(s.step)  # never checkpoint past the bad-step limit
    ema = s.ema.state_dict() if s.ema is not None else None
    checkpoint.save(
        run_dir / "checkpoints", s.step,
        lambda folder: backend.save(folder, s.model, s.optimizer, ema, shared_state(s), rank_state(s)),
        keep=cfg.train.keep_checkpoints, is_main=backend.is_main, barrier=backend.barrier,
        all_ok=lambda ok: signals.all_ranks(backend, ok),
    )


def train_step(cfg: Config, backend: Backend, comps: Components, objective, s: State) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `grad_accum` micro-batches; returns (loss, grad norm) as device tensors."""
    accum = cfg.train.grad_accum
    total = torch.zeros((), device=backend.device)

    def unet_fn(x_t, t, context):
        return unet_call(s.model, x_t, t, context)

    for _ in range(accum):
        batch = next(s.loader)
        captions = drop_captions(batch["caption"], cfg.diffusion.caption_dropout, s.data_gen)
        if "latent_mean" in batch:  # from the latent cache: no VAE or text encoder in the step
            latents, context = latents_and_context(batch, captions, comps.scaling_factor, backend.device, s.noise_gen)
        else:
            time_ids = size_conditioning(batch) if comps.is_sdxl else None  # SDXL: sizes and crop of each image
            context = text_input(cfg, comps, captions, backend.device, time_ids)
            latents = encode_images(comps.vae, batch["pixel_values"].to(backend.device, non_blocking=True), s.noise_gen)
        weights = batch.get("loss_weight")  # prior preservation: class images carry data.prior_loss_weight
        if weights is not None:
            weights = torch.tensor(weights, dtype=torch.float32).to(backend.device, non_blocking=True)
        with backend.autocast():
            loss = objective.loss(unet_fn, latents, context, s.noise_gen, weights) / accum
        loss = s.guard.inject(loss, s.step)
        backend.backward(loss)
        total += loss.detach()
    s.guard.before_step(total)
    grad_norm = backend.step(s.model, s.optimizer, cfg.train.grad_clip)  # skips the update if not finite
    s.guard.after_step()
    s.lr_scheduler.step()
    s.step += 1
    if s.ema is not None:
        s.ema.update(backend.unwrap(s.model).parameters(), s.step)
    return total, grad_norm


def run_loop(cfg: Config, backend: Backend, comps: Components, s: State, run_dir: Path) -> bool:
    """Train to `train.max_steps` (True), or until a stop signal, after a checkpoint (False)."""
    t = cfg.train
    objective = build_objective(cfg, alphas_cumprod(comps.noise_scheduler), comps.prediction_type)
    tel = Telemetry(run_dir, t.max_steps, s.step, enabled=backend.is_main,
                    trackers=Trackers(cfg, run_dir, s.step) if backend.is_main else None)
    s.model.train()
    loss_sum = torch.zeros((), device=backend.device)
    n, t0 = 0, time.perf_counter()
    batches = batches_per_epoch(cfg, backend, s.loader.dataset)
    while s.step < t.max_steps:
        loss, grad_norm = train_step(cfg, backend, comps, objective, s)
        loss_sum += loss
        n += 1
        tel.advance()
        if s.step % t.log_every == 0 or s.step == t.max_steps:
            mean = backend.all_reduce_mean(loss_sum / n)
            dt = time.perf_counter() - t0
            tel.log(s.step, {"loss": mean.item(), "lr": s.lr_scheduler.get_last_lr()[0],
                             "grad_norm": float(grad_norm), "samples_per_s": n * t.batch_size / dt,
                             "epoch": s.loader.epoch, **s.loader.bad_counts(), **s.guard.check(s.step),
                             **device_memory(backend.device)})
            loss_sum.zero_()
            n, t0 = 0, time.perf_counter()
        t_eval = time.perf_counter()  # (evaluation time is left out of samples_per_s)
        if s.val is not None and (s.step % t.val_every == 0 or s.step == t.max_steps):
            tel.log(s.step, validate(cfg, backend, comps, objective, s))
        if cfg.eval.every and (s.step % cfg.eval.every == 0 or s.step == t.max_steps):
            measure_quality(cfg, backend, comps, s, tel)
        t0 += time.perf_counter() - t_eval
        saved = t.checkpoint_every and s.step % t.checkpoint_every == 0 or s.step == t.max_steps
        if saved:
            save_checkpoint(cfg, backend, s, run_dir)
        if t.sample_every and (s.step % t.sample_every == 0 or s.step == t.max_steps):
            grid = write_samples(cfg, backend, comps, s, run_dir)
            if grid is not None:
                tel.image(s.step, "samples", grid)
        epoch = epochs_done(s.step, batches, t.grad_accum)
        if t.save_every_n_epochs and epoch > epochs_done(s.step - 1, batches, t.grad_accum) \
                and epoch % t.save_every_n_epochs == 0:
            save_epoch_model(cfg, backend, comps, s, run_dir, epoch)
        if s.step < t.max_steps and signals.stop_requested(backend, s.step, t.preempt_check_every):
            if not saved:
                save_checkpoint(cfg, backend, s, run_dir)
            tel.write(f"stopped by {signals.received() or 'a signal on another rank'} at step {s.step} after a "
                      "checkpoint; continue with train.resume=auto")
            tel.close()
            return False
    tel.close()
    return True


def validate(cfg: Config, backend: Backend, comps: Components, objective, s: State) -> dict:
    """The validation loss of the live weights over all ranks (a host sync, at val time only)."""
    micro = cfg.train.batch_size // backend.dp_size // cfg.train.grad_accum
    s.model.eval()
    total, count = validation_loss(
        objective, lambda x_t, t, context: unet_call(s.model, x_t, t, context),
        lambda captions, time_ids: text_input(cfg, comps, captions, backend.device, time_ids), s.val, micro,
        backend.device, backend.dp_rank, backend.dp_size, backend.autocast)
    s.model.train()
    return {"val_loss": (backend.all_reduce_mean(total) / backend.all_reduce_mean(count)).item(), "val_n": len(s.val)}


def inference_unet(backend: Backend, comps: Components, s: State) -> Optional[torch.nn.Module]:
    """A plain copy of the UNet carrying the EMA weights (or the live weights without EMA).
    Every rank calls it (gathering sharded weights is collective); off the main rank it is None."""
    weights = dict(backend.full_state_dict(s.model, s.optimizer))
    if s.ema is not None:
        weights.update(backend.full_ema_state_dict(s.ema.state_dict()))
    if not backend.is_main:
        return None
    unet = backend.plain_model(s.model)
    unet.load_state_dict(weights)
    return unet.to(backend.device).eval()


def write_samples(cfg: Config, backend: Backend, comps: Components, s: State, run_dir: Path):
    """Write the sample grid of the fixed prompts; return it on the main rank (None elsewhere)."""
    unet = inference_unet(backend, comps, s)
    if not backend.is_main:
        return None
    sc = cfg.sample
    unet, text_encoder = split(unet, comps)
    pipe = make_pipeline(comps.tokenizer, text_encoder, comps.vae, unet, comps.noise_scheduler, comps.tokenizer_2,
                         comps.text_encoder_2)
    pipe.to(backend.device)  # with data.source=latents the VAE and text encoder visit the device only here
    specs = sc.specs()  # each prompt with its own options (--n, --s, --l, --d, ...), labelled in the grid
    images = render(pipe, specs)
    grid = save_grid(images, specs, run_dir / "samples" / f"step_{s.step:08d}.png", cols=min(len(images), 4),
                     model=f"{run_dir.name} step {s.step}")
    if cfg.data.source == "latents":
        comps.text_encoder.to("cpu")
        comps.vae.to("cpu")
    del pipe, unet
    s.model.train()
    return grid


def save_epoch_model(cfg: Config, backend: Backend, comps: Components, s: State, run_dir: Path, epoch: int) -> None:
    """RUN_DIR/models/epoch_NNNNNN.safetensors|.ckpt|/ (train.save_model_as): EMA weights, LoRA merged,
    written beside its final name and renamed, so a reader never sees half a file."""
    unet = inference_unet(backend, comps, s)  # collective
    if not backend.is_main:
        return
    unet, text_encoder = split(unet, comps)
    unet, text_encoder = merged(unet), merged(text_encoder)
    kind = cfg.train.save_model_as
    out = run_dir / "models" / f"epoch_{epoch:06d}{'' if kind == 'diffusers' else '.' + kind}"
    if kind == "diffusers":
        def write(tmp: Path) -> None:
            export_diffusers(tmp, comps.tokenizer, text_encoder, comps.vae, unet, comps.noise_scheduler,
                             comps.tokenizer_2, comps.text_encoder_2)
            write_model_card(tmp, kohya_metadata(run_dir, out, unet, comps.prediction_type),
                             f"{run_dir.name} epoch {epoch}", f"{run_dir.name}/models/{out.name}", comps.is_sdxl)

        write_sealed(out, write)
    else:
        write_file(out, lambda tmp: save_single_file(tmp, unet, comps.vae, text_encoder, comps.tokenizer,
                                                     comps.noise_scheduler))
    print(f"epoch {epoch}: model written to {out}")
    s.model.train()


def measure_quality(cfg: Config, backend: Backend, comps: Components, s: State, tel: Telemetry) -> None:
    """CLIP score / FID of the EMA weights on the held-out captions (collective gather, main rank scores)."""
    unet = inference_unet(backend, comps, s)
    if backend.is_main:
        unet, text_encoder = split(unet, comps)
        pipe = make_pipeline(comps.tokenizer, text_encoder, comps.vae, unet, comps.noise_scheduler, comps.tokenizer_2,
                             comps.text_encoder_2).to(backend.device)
        sc = cfg.sample
        tel.log(s.step, s.quality.measure(pipe, sc.steps, sc.guidance, sc.sampler, sc.seed)[0])
        if cfg.data.source == "latents":
            comps.text_encoder.to("cpu")
            comps.vae.to("cpu")
        del pipe, unet
    s.model.train()


def export_final(cfg: Config, backend: Backend, comps: Components, s: State, run_dir: Path) -> None:
    unet = inference_unet(backend, comps, s)
    if not backend.is_main:
        return
    unet, text_encoder = split(unet, comps)
    # Sealed like a checkpoint: a kill (or a full disk: one sentence) mid-export leaves no final/, and
    # resuming exports it again.
    again = f"free space and rerun with train.resume=auto, which exports it again from the step {s.step} checkpoint"
    if has_lora(unet) or has_lora(text_encoder):  # the adapter alone, and final/ with it merged in
        meta = kohya_metadata(run_dir, run_dir / "lora", unet, comps.prediction_type, lora_shape(unet))
        write_sealed(run_dir / "lora", lambda folder: save_lora(folder, unet, text_encoder, metadata=meta), step=s.step,
                     hint=again)
        unet, text_encoder = merged(unet), merged(text_encoder)
    card = kohya_metadata(run_dir, run_dir / "final", unet, comps.prediction_type)

    def write(folder: Path) -> None:  # the weights and their model card, sealed together
        export_diffusers(folder, comps.tokenizer, text_encoder, comps.vae, unet, comps.noise_scheduler,
                         comps.tokenizer_2, comps.text_encoder_2)
        write_model_card(folder, card, run_dir.name, f"{run_dir.name}/final", comps.is_sdxl)

    write_sealed(run_dir / "final", write, step=s.step, hint=again)
    print(f"final model ({'EMA' if s.ema is not None else 'trained'} weights) written to {run_dir / 'final'}")
