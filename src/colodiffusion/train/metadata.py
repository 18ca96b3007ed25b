"""How a model was made, as the `ss_*` metadata keys kohya's sd-scripts write into a .safetensors
header (and, for a diffusers folder, as the training settings of its model card README.md) and UIs
(AUTOMATIC1111's training-info panel, Civitai, metadata viewers) read.

Built from the run folder an export starts from: its config.yaml, run_info.json (images, effective
batch, caption tags, start time; written by `dataset_info.report`) and metrics.jsonl (steps and the
time of the last one). Values are strings, as in kohya's files. Paths are reduced to their last
component (kohya does the same), so a shared model file does not reveal the trainer's folders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from colodiffusion import __version__
from colodiffusion.config import Config, load_config
from colodiffusion.storage.files import match_umask
from colodiffusion.train.dataset_info import read_run_info

# Base model families by the UNet's cross-attention width (the text encoder's), as kohya names them.
BASE_MODELS = {768: "sd_v1", 1024: "sd_v2"}


def base_model_version(unet, prediction_type: str, preset: str = "custom") -> str:
    """'sd_v1', 'sd_v2', with '_v' for v-prediction (kohya's convention), 'sdxl_base_v1-0' for a UNet with
    SDXL's added conditioning; our own sizes say so."""
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl_base_v1-0" + ("_v" if prediction_type == "v_prediction" else "")
    name = BASE_MODELS.get(int(unet.config.cross_attention_dim), f"colodiffusion_{preset}")
    return name + ("_v" if prediction_type == "v_prediction" else "")


def run_of(source: Path) -> tuple[Optional[Path], Optional[int]]:
    """(run folder, step of the weights) for a run folder, one of its checkpoints or its final/;
    (None, None) for a model made elsewhere."""
    source = Path(source)
    if (source / "state.pt").exists() and (source.parent.parent / "config.yaml").is_file():
        manifest = source / "manifest.json"
        step = json.loads(manifest.read_text()).get("step") if manifest.is_file() else None
        return source.parent.parent, step
    run = source if (source / "config.yaml").is_file() else source.parent if source.name == "final" else None
    if run is None or not (run / "config.yaml").is_file():
        return None, None
    last = _last_metrics(run)
    return run, last.get("step")


def _last_metrics(run: Path) -> dict:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def kohya_metadata(source: str | Path, out: str | Path, unet, prediction_type: str,
                   lora: Optional[tuple[int, float]] = None) -> dict[str, str]:
    """ss_* keys for the file `out` exported from `source`; `lora` = (rank, alpha) of an adapter file."""
    run, step = run_of(Path(source))
    cfg = load_config(run / "config.yaml") if run is not None else None
    meta = {"ss_output_name": Path(out).stem,
            "ss_base_model_version": base_model_version(unet, prediction_type, cfg.model.preset if cfg else "custom"),
            "ss_v2": int(unet.config.cross_attention_dim) == 1024,
            "ss_training_comment": f"colodiffusion {__version__}"}
    if lora is not None:
        meta.update({"ss_network_module": "peft.lora", "ss_network_dim": lora[0], "ss_network_alpha": lora[1]})
    if cfg is None:
        meta["ss_sd_model_name"] = Path(source).name
        return {k: str(v) for k, v in meta.items()}
    meta.update(_from_run(cfg, read_run_info(run) or {}, step, _last_metrics(run).get("time")))
    return {k: (v if isinstance(v, str) else json.dumps(v) if isinstance(v, dict) else str(v))
            for k, v in meta.items() if v is not None}


def _from_run(cfg: Config, info: dict, step: Optional[int], finished_at: Optional[float]) -> dict:
    t, d = cfg.train, cfg.data
    batch = info.get("batch_size", t.batch_size)  # the effective one (a small dataset may lower it)
    images = info.get("num_train_images")
    per_epoch = max(1, images // batch) if images else None
    data_dir = info.get("data_dir", Path(d.path).name if d.path else d.source)
    return {
        "ss_sd_model_name": Path(cfg.model.pretrained).name
        if cfg.model.pretrained
        else f"colodiffusion-{cfg.model.preset}",
        "ss_vae_name": Path(cfg.model.vae).name if cfg.model.vae else None,
        "ss_training_started_at": info.get("started_at"),
        "ss_training_finished_at": finished_at,
        "ss_learning_rate": t.lr,
        "ss_unet_lr": t.lr,
        "ss_text_encoder_lr": (cfg.model.text_encoder_lr or t.lr) if cfg.model.train_text_encoder else None,
        "ss_lr_scheduler": t.lr_schedule,
        "ss_lr_warmup_steps": t.warmup_steps,
        "ss_max_train_steps": t.max_steps,
        "ss_steps": step,
        "ss_num_train_images": images,
        "ss_num_batches_per_epoch": per_epoch,
        "ss_num_epochs": math.ceil(t.max_steps / per_epoch) if per_epoch else None,
        "ss_epoch": math.ceil(step / per_epoch) if per_epoch and step else None,
        "ss_total_batch_size": batch,
        "ss_batch_size_per_device": batch // max(1, info.get("dp_size", 1)) // t.grad_accum,
        "ss_gradient_accumulation_steps": t.grad_accum,
        "ss_gradient_checkpointing": cfg.model.gradient_checkpointing or cfg.perf.activation_checkpointing != "none",
        "ss_mixed_precision": {"fp32": "no"}.get(cfg.precision, cfg.precision),
        "ss_optimizer": {"adamw": "torch.optim.AdamW", "adamw8bit": "AdamW8bit"}.get(
            cfg.perf.optimizer, cfg.perf.optimizer
        )
        + f"(weight_decay={t.weight_decay},betas=({t.adam_beta1}, {t.adam_beta2}))",
        "ss_max_grad_norm": t.grad_clip,
        "ss_seed": t.seed,
        "ss_noise_offset": cfg.diffusion.offset_noise,
        "ss_min_snr_gamma": cfg.diffusion.min_snr_gamma,
        "ss_caption_dropout_rate": cfg.diffusion.caption_dropout,
        "ss_resolution": f"({d.resolution}, {d.resolution})",
        "ss_enable_bucket": d.bucketing,
        "ss_flip_aug": d.random_flip,
        "ss_random_crop": d.crop == "random",
        "ss_cache_latents": d.source == "latents",
        "ss_dataset_dirs": {data_dir: {"n_repeats": 1, "img_count": images}} if images else None,
        "ss_tag_frequency": {data_dir: info["tag_frequency"]} if info.get("tag_frequency") else None,
    }


# Keys of the model card's settings table that are not settings (or are too long for a table).
NOT_SETTINGS = ("ss_output_name", "ss_training_comment", "ss_tag_frequency", "ss_dataset_dirs")


def write_model_card(folder: str | Path, meta: dict[str, str], title: str, where: str, sdxl: bool = False) -> Path:
    """README.md of an exported diffusers folder, as the Hub shows it: the card data (library, pipeline,
    tags), how to load it (from `where`, the folder's name as the user knows it: it may be written in a
    temporary folder first) and the training settings (`meta`: kohya_metadata's keys, without ss_)."""
    from huggingface_hub import ModelCard, ModelCardData

    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image",
                         tags=["text-to-image", "stable-diffusion-xl" if sdxl else "stable-diffusion", "colodiffusion"])
    rows = "\n".join(f"| {k[3:]} | {v} |" for k, v in meta.items() if k not in NOT_SETTINGS)
    started = f"from {meta['ss_sd_model_name']} " if "ss_sd_model_name" in meta else ""
    card = ModelCard(f"""---
{data.to_yaml()}
---

# {title}

A text-to-image model ({meta.get("ss_base_model_version", "custom")}) trained {started}with colodiffusion {__version__}.

```python
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained("{where}")
image = pipe("a prompt").images[0]
```

## Training settings

| setting | value |
|---|---|
{rows}
""")
    out = Path(folder) / "README.md"
    card.save(out)
    match_umask([out])
    return out
