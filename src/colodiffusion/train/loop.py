"""The training loop: config -> (data, models, backend) -> steps -> checkpoints, metrics, samples -> final/.

Read it top to bottom: `train` builds everything with the `build_*` helpers of train/build.py and a
`Trainer` that holds the run (config, backend, components, state, run folder), restores a checkpoint
if asked, then calls `train_step` until `train.max_steps`. The only host syncs are at the logging
interval (loss and grad norm are accumulated on the device in between).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from colodiffusion.config import Config, ConfigError
from colodiffusion.data import build_datasets, dataset_args
from colodiffusion.data.latents import latents_and_context, sample_latents
from colodiffusion.data.transforms import size_conditioning
from colodiffusion.diffusion import alphas_cumprod, build_objective, drop_captions
from colodiffusion.generate import make_pipeline, render, save_grid
from colodiffusion.models import Components, encode_images
from colodiffusion.models.components import unet_call
from colodiffusion.models.trainable import split, text_input, trains_text_encoder
from colodiffusion.parallel import Backend, build_backend
from colodiffusion.storage import checkpoint
from colodiffusion.train import dataset_info, preflight, run_folder, signals
from colodiffusion.train.build import (State, apply_max_epochs, batches_per_epoch, build_evaluation, build_model,
                                       build_state, choose_sample_prompts, encode_once)
from colodiffusion.train.outputs import write_epoch_model, write_final
from colodiffusion.train.resume import choose_checkpoint, rank_state, restore, shared_state
from colodiffusion.train.telemetry import Telemetry
from colodiffusion.train.trackers import Trackers, device_memory
from colodiffusion.train.trackers import check_available as check_trackers
from colodiffusion.train.val_loss import validation_loss


def train(cfg: Config) -> Path:
    check_trackers(cfg)  # a missing wandb/mlflow stops here, before anything is built
    backend = build_backend(cfg)
    signals.install()  # SIGTERM/SIGUSR1: finish the step, checkpoint, return (train/signals.py)
    clean, lock = False, None
    try:
        run_dir = Path(cfg.run.dir)
        with run_folder.removed_if_refused(backend, run_dir):  # bad data leaves no run folder behind
            lock = run_folder.check(cfg, backend, run_dir)  # ours and locked; continue, start over or refuse
            dataset, val_data = build_datasets(*dataset_args(cfg))
            dataset_info.fit_batch(cfg, backend, dataset)  # 20 images and batch 32: a batch of 20, said once
            apply_max_epochs(cfg, backend, dataset)
            bad = preflight.check(cfg, backend, run_dir, dataset)  # indices of the bad samples it met
        run_folder.prepare(cfg, backend, run_dir)
        choose_sample_prompts(cfg, backend, dataset, bad)
        comps = build_model(cfg, backend, run_dir, dataset)
        dataset_info.report(cfg, backend, dataset, comps.tokenizer, run_dir, bad)  # tokenizer coverage; run_info.json
        dataset = encode_once(cfg, backend, comps, dataset)  # data.cache_latents (shapes)
        state = build_state(cfg, backend, comps, dataset)
        build_evaluation(cfg, backend, comps, state, val_data)
        objective = build_objective(cfg.diffusion, alphas_cumprod(comps.noise_scheduler), comps.prediction_type)
        trainer = Trainer(cfg, backend, comps, state, run_dir, objective)
        trainer.resume()
        if trainer.run():
            trainer.export_final()
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


def epochs_done(step: int, batches: int, grad_accum: int) -> int:
    """Whole epochs finished by `step` optimizer steps (epoch e ends at step e * batches // grad_accum)."""
    return ((step + 1) * grad_accum - 1) // batches if step else 0


# -- the run --------------------------------------------------------------------------------------
class Trainer:
    """One run: what it was built from (config, backend, components, objective), what it changes
    (`state`), and where it writes (`run_dir`)."""

    def __init__(self, cfg: Config, backend: Backend, comps: Components, state: State, run_dir: Path, objective):
        self.cfg, self.backend, self.comps, self.state = cfg, backend, comps, state
        self.run_dir, self.objective = run_dir, objective
        self.token_ids = trains_text_encoder(cfg.model, cfg.train.lora)  # the trained model encodes the captions
        self.telemetry: Optional[Telemetry] = None

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches; returns (loss, grad norm) as device tensors."""
        cfg, backend, comps, state = self.cfg, self.backend, self.comps, self.state
        accum = cfg.train.grad_accum
        total = torch.zeros((), device=backend.device)

        def unet_fn(x_t, timesteps, context):
            return unet_call(state.model, x_t, timesteps, context)

        for _ in range(accum):
            batch = next(state.loader)
            captions = drop_captions(batch["caption"], cfg.diffusion.caption_dropout, state.data_gen)
            if "context" in batch:  # from the latent cache on disk: no VAE or text encoder in the step
                latents, context = latents_and_context(batch, captions, comps.scaling_factor, backend.device,
                                                       state.noise_gen)
            else:
                time_ids = size_conditioning(batch) if comps.is_sdxl else None  # SDXL: sizes and crop of each image
                context = text_input(self.token_ids, comps, captions, backend.device, time_ids)
                if "latent_mean" in batch:  # data.cache_latents: the image's posterior, encoded before training
                    latents = sample_latents(batch, comps.scaling_factor, backend.device, state.noise_gen)
                else:
                    pixels = batch["pixel_values"].to(backend.device, non_blocking=True)
                    latents = encode_images(comps.vae, pixels, state.noise_gen)
            weights = batch.get("loss_weight")  # prior preservation: class images carry data.prior_loss_weight
            if weights is not None:
                weights = torch.tensor(weights, dtype=torch.float32).to(backend.device, non_blocking=True)
            with backend.autocast():
                loss = self.objective.loss(unet_fn, latents, context, state.noise_gen, weights) / accum
            loss = state.guard.inject(loss, state.step)
            backend.backward(loss)
            total += loss.detach()
        # The guard checks the loss and gradients in front of the optimizer.step() that backend.step makes
        # (itself, through a GradScaler or an engine) and skips the update if any is non-finite.
        with state.guard.checking(state.optimizer, total):
            grad_norm = backend.step(state.model, state.optimizer, cfg.train.grad_clip)
        state.lr_scheduler.step()
        state.step += 1
        if state.ema is not None:
            state.ema.update(backend.unwrap(state.model).parameters(), state.step)
        return total, grad_norm

    def run(self) -> bool:
        """Train to `train.max_steps` (True), or until a stop signal, after a checkpoint (False)."""
        train_cfg, backend, state = self.cfg.train, self.backend, self.state
        self.telemetry = telemetry = Telemetry(
            self.run_dir, train_cfg.max_steps, state.step, enabled=backend.is_main,
            trackers=Trackers(self.cfg, self.run_dir, state.step) if backend.is_main else None)
        state.model.train()
        loss_sum = torch.zeros((), device=backend.device)
        n, t0 = 0, time.perf_counter()
        batches = batches_per_epoch(self.cfg, backend, state.loader.dataset)

        def due(every: int) -> bool:
            return bool(every) and (state.step % every == 0 or state.step == train_cfg.max_steps)

        while state.step < train_cfg.max_steps:
            loss, grad_norm = self.train_step()
            loss_sum += loss
            n += 1
            telemetry.advance()
            if due(train_cfg.log_every):
                mean = backend.all_reduce_mean(loss_sum / n)
                dt = time.perf_counter() - t0
                telemetry.log(state.step, {
                    "loss": mean.item(), "lr": state.lr_scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                    "samples_per_s": n * train_cfg.batch_size / dt, "epoch": state.loader.epoch,
                    **state.loader.bad_counts(), **state.guard.check(state.step), **device_memory(backend.device)})
                loss_sum.zero_()
                n, t0 = 0, time.perf_counter()
            t_eval = time.perf_counter()  # (evaluation time is left out of samples_per_s)
            if state.val is not None and due(train_cfg.val_every):
                telemetry.log(state.step, self.validate())
            if due(self.cfg.eval.every):
                self.measure_quality()
            t0 += time.perf_counter() - t_eval
            saved = due(train_cfg.checkpoint_every) or state.step == train_cfg.max_steps
            if saved:
                self.save_checkpoint()
            if due(train_cfg.sample_every):
                self.write_samples()
            epoch = epochs_done(state.step, batches, train_cfg.grad_accum)
            if train_cfg.save_every_n_epochs and epoch > epochs_done(state.step - 1, batches, train_cfg.grad_accum) \
                    and epoch % train_cfg.save_every_n_epochs == 0:
                self.save_epoch_model(epoch)
            if state.step < train_cfg.max_steps and signals.stop_requested(backend, state.step,
                                                                             train_cfg.preempt_check_every):
                if not saved:
                    self.save_checkpoint()
                telemetry.write(f"stopped by {signals.received() or 'a signal on another rank'} at step "
                                f"{state.step} after a checkpoint; continue with train.resume=auto")
                telemetry.close()
                return False
        telemetry.close()
        return True

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        backend, state = self.backend, self.state
        state.guard.check(state.step)  # never checkpoint past the bad-step limit
        ema = state.ema.state_dict() if state.ema is not None else None
        checkpoint.save(
            self.run_dir / "checkpoints", state.step,
            lambda folder: backend.save(folder, state.model, state.optimizer, ema, shared_state(state),
                                        rank_state(state)),
            keep=self.cfg.train.keep_checkpoints, is_main=backend.is_main, barrier=backend.barrier,
            all_ok=lambda ok: signals.all_ranks(backend, ok),
        )

    def resume(self) -> None:
        backend, state, folder = self.backend, self.state, self.run_dir / "checkpoints"
        mode = signals.resume_mode(self.cfg.train.resume)  # 'auto' by itself in a restarted torchrun/SLURM worker
        if not mode:
            return
        path = choose_checkpoint(folder, mode, backend)
        if path is None:
            if backend.is_main:
                print(f"train.resume=auto: no checkpoint in {folder}, starting from step 0")
            return
        try:
            shared, per_rank = backend.load(path, state.model, state.optimizer,
                                            state.ema.state_dict() if state.ema else None)
        except Exception as exc:
            raise ConfigError(f"cannot resume from '{path}': {exc}.") from None
        restore(state, shared, per_rank)
        if backend.is_main:
            print(f"resumed from {path} at step {state.step}")

    # -- evaluation, samples and model files ------------------------------------------------------------
    def validate(self) -> dict:
        """The validation loss of the live weights over all ranks (a host sync, at val time only)."""
        cfg, backend, state = self.cfg, self.backend, self.state
        micro = cfg.train.batch_size // backend.dp_size // cfg.train.grad_accum
        state.model.eval()
        total, count = validation_loss(
            self.objective, lambda x_t, timesteps, context: unet_call(state.model, x_t, timesteps, context),
            lambda captions, time_ids: text_input(self.token_ids, self.comps, captions, backend.device, time_ids),
            state.val, micro, backend.device, backend.dp_rank, backend.dp_size, backend.autocast)
        state.model.train()
        mean = backend.all_reduce_mean(total) / backend.all_reduce_mean(count)
        return {"val_loss": mean.item(), "val_n": len(state.val)}

    @contextmanager
    def inference(self) -> Iterator[Optional[tuple[torch.nn.Module, torch.nn.Module]]]:
        """(UNet, text encoder) as plain modules carrying the EMA weights (the live ones without EMA), on
        the main rank; None on the others. Every rank enters: gathering sharded weights is collective.
        On leaving, a VAE and text encoder that train off the device (data.source=latents) go back to
        the CPU, and the model trains again."""
        backend, state = self.backend, self.state
        weights = dict(backend.full_state_dict(state.model, state.optimizer))
        if state.ema is not None:
            weights.update(backend.full_ema_state_dict(state.ema.state_dict()))
        parts = None
        if backend.is_main:
            unet = backend.plain_model(state.model)
            unet.load_state_dict(weights)
            parts = split(unet.to(backend.device).eval(), self.comps)
        del weights
        try:
            yield parts
        finally:
            if backend.is_main and self.cfg.data.source == "latents":
                self.comps.text_encoder.to("cpu")
                self.comps.vae.to("cpu")
            state.model.train()

    def pipeline(self, unet: torch.nn.Module, text_encoder: torch.nn.Module):
        comps = self.comps
        pipe = make_pipeline(comps.tokenizer, text_encoder, comps.vae, unet, comps.noise_scheduler,
                             comps.tokenizer_2, comps.text_encoder_2)
        return pipe.to(self.backend.device)  # with data.source=latents the VAE and text encoder visit the device here

    def write_samples(self) -> None:
        """RUN_DIR/samples/step_N.png: the grid of the fixed prompts, also sent to the trackers."""
        with self.inference() as parts:
            if parts is None:
                return
            specs = self.cfg.sample.specs()  # each prompt with its own options (--n, --s, --l, --d, ...)
            images = render(self.pipeline(*parts), specs)
            step, name = self.state.step, self.run_dir.name
            grid = save_grid(images, specs, self.run_dir / "samples" / f"step_{step:08d}.png",
                             cols=min(len(images), 4), model=f"{name} step {step}")
        self.telemetry.image(step, "samples", grid)

    def measure_quality(self) -> None:
        """CLIP score / FID of the EMA weights on the held-out captions (collective gather, main rank scores)."""
        with self.inference() as parts:
            if parts is None:
                return
            sample = self.cfg.sample
            scores, _ = self.state.quality.measure(self.pipeline(*parts), sample.steps, sample.guidance,
                                                   sample.sampler, sample.seed)
            self.telemetry.log(self.state.step, scores)

    def save_epoch_model(self, epoch: int) -> None:
        with self.inference() as parts:
            if parts is not None:
                write_epoch_model(self.run_dir, self.comps, *parts, epoch, self.cfg.train.save_model_as)

    def export_final(self) -> None:
        with self.inference() as parts:
            if parts is not None:
                write_final(self.run_dir, self.comps, *parts, self.state.step, ema=self.state.ema is not None)
