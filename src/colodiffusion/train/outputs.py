"""The model files a run writes besides its checkpoints: RUN_DIR/models/epoch_N (train.save_every_n_epochs),
RUN_DIR/lora (a LoRA run's adapter alone) and RUN_DIR/final (the weights, LoRA merged in, with a model
card). Each is written beside its final name and renamed, so a reader never sees half of one."""

from __future__ import annotations

from pathlib import Path

import torch

from colodiffusion.generate import export_diffusers
from colodiffusion.models import Components
from colodiffusion.models.lora import has_lora, lora_shape, merged, save_lora
from colodiffusion.models.single_file import save_single_file
from colodiffusion.storage.sealed import write_file, write_sealed
from colodiffusion.train.metadata import kohya_metadata, write_model_card


def write_epoch_model(run_dir: Path, comps: Components, unet: torch.nn.Module, text_encoder: torch.nn.Module,
                      epoch: int, kind: str) -> None:
    """RUN_DIR/models/epoch_NNNNNN.safetensors|.ckpt|/ (`kind`: train.save_model_as), LoRA merged."""
    unet, text_encoder = merged(unet), merged(text_encoder)
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


def write_final(run_dir: Path, comps: Components, unet: torch.nn.Module, text_encoder: torch.nn.Module, step: int,
                ema: bool) -> None:
    """RUN_DIR/final (and RUN_DIR/lora for a LoRA run), sealed like a checkpoint: a kill (or a full disk:
    one sentence) mid-export leaves neither, and resuming exports them again."""
    again = f"free space and rerun with train.resume=auto, which exports it again from the step {step} checkpoint"
    if has_lora(unet) or has_lora(text_encoder):  # the adapter alone, and final/ with it merged in
        meta = kohya_metadata(run_dir, run_dir / "lora", unet, comps.prediction_type, lora_shape(unet))
        write_sealed(run_dir / "lora", lambda folder: save_lora(folder, unet, text_encoder, metadata=meta), step=step,
                     hint=again)
        unet, text_encoder = merged(unet), merged(text_encoder)
    card = kohya_metadata(run_dir, run_dir / "final", unet, comps.prediction_type)

    def write(folder: Path) -> None:  # the weights and their model card, sealed together
        export_diffusers(folder, comps.tokenizer, text_encoder, comps.vae, unet, comps.noise_scheduler,
                         comps.tokenizer_2, comps.text_encoder_2)
        write_model_card(folder, card, run_dir.name, f"{run_dir.name}/final", comps.is_sdxl)

    write_sealed(run_dir / "final", write, step=step, hint=again)
    print(f"final model ({'EMA' if ema else 'trained'} weights) written to {run_dir / 'final'}")
