"""`colodiffusion export`: a run, checkpoint, diffusers folder or single file -> diffusers | single-file | lora.

A training checkpoint holds only the trained weights (`unet.safetensors`, `ema.safetensors`); the
frozen parts come from the run's config (`model.pretrained`, or RUN_DIR/components/ for models
built from a preset), and the trained model is rebuilt exactly as training built it (LoRA
adapters, text encoder) before the checkpoint's weights are loaded into it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from colodiffusion.config import Config, ConfigError, load_config
from colodiffusion.models import lora
from colodiffusion.models.single_file import DTYPES, is_single_file, save_single_file
from colodiffusion.train import checkpoint

FORMATS = ("diffusers", "single-file", "lora")


@dataclass
class Model:
    """A trained model, ready to write: UNet and text encoder may still carry LoRA adapters."""
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object

    @property
    def has_lora(self) -> bool:
        return lora.has_lora(self.unet) or lora.has_lora(self.text_encoder)


def _refuse_training(*_args):
    raise ConfigError("the run folder lacks components/ (its frozen parts), so its checkpoints cannot be exported.")


def load_checkpoint_model(ckpt: Path, ema: bool) -> Model:
    """Rebuild the run's model from its config.yaml and load the checkpoint's (or its EMA) weights."""
    from colodiffusion.models.components import build_components
    from colodiffusion.models.trainable import build_trainable, split

    run_dir = ckpt.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"checkpoint '{ckpt}' is not inside a run folder (no {run_dir / 'config.yaml'}).")
    cfg = load_config(run_dir / "config.yaml")
    comps = build_components(cfg, run_dir / "components", captions=_refuse_training, train_vae=_refuse_training)
    trainable = build_trainable(cfg, comps)
    trainable.load_state_dict(checkpoint.load_tensors(ckpt / "unet.safetensors"))
    if ema:
        ema_file = ckpt / "ema.safetensors"
        if not ema_file.exists():
            raise ConfigError(f"checkpoint '{ckpt}' has no EMA weights (train.ema.enabled was false); drop --ema.")
        shadow = checkpoint.load_tensors(ema_file)
        with torch.no_grad():
            for name, p in trainable.named_parameters():
                if name in shadow:
                    p.copy_(shadow[name])
    unet, text_encoder = split(trainable, comps)
    return Model(comps.tokenizer, text_encoder.eval(), comps.vae, unet.eval(), comps.noise_scheduler)


def load_model(source: str | Path, ema: bool = False, original_config: Optional[str] = None,
               tokenizer: Optional[str] = None) -> Model:
    """Any supported source: single file, diffusers folder, checkpoint folder, or run folder."""
    from colodiffusion.models.components import load_pretrained

    src = Path(source)
    if not src.exists():
        raise ConfigError(f"'{src}' does not exist.")
    if is_single_file(src) or (src / "model_index.json").exists():
        cfg = Config()
        cfg.model.pretrained, cfg.model.pretrained_ema = str(src), ema
        cfg.model.original_config, cfg.model.tokenizer = original_config, tokenizer
        if ema and not is_single_file(src):
            raise ConfigError(f"'{src}' is a diffusers folder and holds one set of weights; drop --ema.")
        c = load_pretrained(src, cfg)
        return Model(c.tokenizer, c.text_encoder, c.vae, c.unet.eval(), _own_scheduler(src) or c.noise_scheduler)
    if (src / "state.pt").exists():
        return load_checkpoint_model(src, ema)
    latest = checkpoint.find_latest(src / "checkpoints")
    if latest is not None:
        return load_checkpoint_model(latest, ema)
    if (src / "final" / "model_index.json").exists():
        return load_model(src / "final", ema, original_config, tokenizer)
    raise ConfigError(f"'{src}' is not a run folder, checkpoint folder, diffusers folder or single-file checkpoint.")


def _own_scheduler(src: Path):
    """The source's own noise schedule (betas, prediction type), kept as is by an export."""
    from diffusers import DDPMScheduler

    from colodiffusion.models.single_file import read_meta

    if (src / "scheduler").is_dir():
        return DDPMScheduler.from_pretrained(src, subfolder="scheduler")
    if is_single_file(src):
        meta = read_meta(src)
        if meta and "scheduler" in meta:
            return DDPMScheduler.from_config(meta["scheduler"])
    return None


def export(source: str | Path, fmt: str, out: str | Path, ema: bool = False, dtype: str = "fp32",
           merge_lora: bool = False, original_config: Optional[str] = None, tokenizer: Optional[str] = None) -> Path:
    if fmt not in FORMATS:
        raise ConfigError(f"--format is '{fmt}'; allowed values are: {', '.join(FORMATS)}.")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype is '{dtype}'; allowed values are: {', '.join(DTYPES)}.")
    out = Path(out)
    if fmt == "single-file" and out.suffix not in (".safetensors", ".ckpt"):
        raise ConfigError(f"--out '{out}' must end in .safetensors or .ckpt for --format single-file.")
    m = load_model(source, ema, original_config, tokenizer)
    if fmt == "lora":
        if not m.has_lora:
            raise ConfigError(f"'{source}' was not trained with LoRA (train.lora.rank=0): there is no adapter to write.")
        return lora.save_lora(out, m.unet, m.text_encoder, DTYPES[dtype])
    if m.has_lora:
        if not merge_lora:
            raise ConfigError(
                f"'{source}' is a LoRA run: pass --merge-lora to fold the adapter into the base weights, "
                "or use --format lora to write the adapter file alone."
            )
        m.unet, m.text_encoder = lora.merged(m.unet), lora.merged(m.text_encoder)
    if fmt == "single-file":
        return save_single_file(out, m.unet, m.vae, m.text_encoder, m.tokenizer, m.noise_scheduler, dtype=dtype)
    from colodiffusion.generate import export_diffusers

    cast = DTYPES[dtype]
    unet, te, vae = (copy.deepcopy(x).to(cast) for x in (m.unet, m.text_encoder, m.vae))
    return export_diffusers(out, m.tokenizer, te, vae, unet, m.noise_scheduler)
