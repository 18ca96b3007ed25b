"""Validation of a loaded `Config`: choices, ranges, paths and the rules between keys.

`validate` raises one `ConfigError` sentence naming the first bad key.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Optional

from colodiffusion.config.compat import PRECISION_ALIASES, folder_subsets
from colodiffusion.config.errors import ConfigError
from colodiffusion.config.prompts import KARRAS_SAMPLERS, check_prompt
from colodiffusion.config.schema import TRACKERS, ColossalAIOptions, Config, DataConfig, _walk, report_to

# Values that must be positive / within a range: key path -> (predicate, what is allowed).
_RANGES = {
    "train.max_steps": (lambda v: v >= 1, "a whole number >= 1"),
    "train.batch_size": (lambda v: v >= 1, "a whole number >= 1"),
    "train.grad_accum": (lambda v: v >= 1, "a whole number >= 1"),
    "train.lr": (lambda v: v > 0, "a number > 0"),
    "train.warmup_steps": (lambda v: v >= 0, "a whole number >= 0"),
    "train.grad_clip": (lambda v: v >= 0, "a number >= 0"),
    "train.checkpoint_every": (lambda v: v >= 0, "a whole number >= 0"),
    "train.keep_checkpoints": (lambda v: v >= 1, "a whole number >= 1"),
    "train.log_every": (lambda v: v >= 1, "a whole number >= 1"),
    "train.sample_every": (lambda v: v >= 0, "a whole number >= 0"),
    "train.max_bad_steps": (lambda v: v >= 0, "a whole number >= 0"),
    "train.preempt_check_every": (lambda v: v >= 1, "a whole number >= 1"),
    "train.ema.decay": (lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)"),
    "data.resolution": (lambda v: v >= 8 and v % 8 == 0, "a multiple of 8, at least 8"),
    "data.num_samples": (lambda v: v >= 1, "a whole number >= 1"),
    "data.num_workers": (lambda v: v >= 0, "a whole number >= 0"),
    "data.min_size": (lambda v: v >= 0, "a whole number >= 0"),
    "data.max_aspect": (lambda v: v == 0 or v >= 1, "0 (off) or a ratio >= 1"),
    "data.bucket_max_aspect": (lambda v: v >= 1, "a ratio >= 1"),
    "data.max_image_pixels": (lambda v: v >= 1, "a whole number >= 1"),
    "data.max_bad_fraction": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "diffusion.caption_dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "diffusion.offset_noise": (lambda v: v >= 0, "a number >= 0"),
    "diffusion.min_snr_gamma": (lambda v: v is None or v > 0, "a number > 0 or null"),
    "diffusion.high_noise_weight": (lambda v: v >= 0, "a number >= 0"),
    "diffusion.num_train_timesteps": (lambda v: v >= 2, "a whole number >= 2"),
    "first_stage.steps": (lambda v: v >= 0, "a whole number >= 0"),
    "first_stage.batch_size": (lambda v: v >= 1, "a whole number >= 1"),
    "sample.steps": (lambda v: v >= 1, "a whole number >= 1"),
    "train.lora.rank": (lambda v: v >= 0, "a whole number >= 0 (0 disables LoRA)"),
    "train.lora.alpha": (lambda v: v is None or v > 0, "a number > 0 or null"),
    "model.text_encoder_lr": (lambda v: v is None or v > 0, "a number > 0 or null"),
    "parallel.zero": (lambda v: v in (1, 2, 3), "1, 2 or 3 (1 only with deepspeed or colossalai)"),
    "parallel.colossalai.shard_param_frac": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "parallel.colossalai.offload_optim_frac": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "parallel.colossalai.offload_param_frac": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "train.max_epochs": (lambda v: v >= 0, "a whole number >= 0 (0: train.max_steps alone decides)"),
    "train.save_every_n_epochs": (lambda v: v >= 0, "a whole number >= 0 (0: no per-epoch models)"),
    "train.val_every": (lambda v: v >= 0, "a whole number >= 0 (0 disables)"),
    "train.val_samples": (lambda v: v >= 1, "a whole number >= 1"),
    "data.val_fraction": (lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    "data.repeats": (lambda v: v >= 1, "a whole number >= 1"),
    "data.keep_tokens": (lambda v: v >= 0, "a whole number >= 0"),
    "data.tag_dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "data.prior_loss_weight": (lambda v: v >= 0, "a number >= 0"),
    "eval.every": (lambda v: v >= 0, "a whole number >= 0 (0 disables)"),
    "eval.num_images": (lambda v: v >= 2, "a whole number >= 2 (FID needs two images to estimate a covariance)"),
    "trainer.devices": (lambda v: v >= 0, "a whole number >= 0 (0: as many processes as were launched)"),
    "parallel.dp_replicate": (lambda v: v >= 1, "a whole number >= 1"),
    "parallel.tp": (lambda v: v >= 1, "a whole number >= 1"),
    "parallel.timeout_s": (lambda v: v > 0, "a number of seconds > 0"),
    "train.lr_num_cycles": (lambda v: v >= 1, "a whole number >= 1"),
    "train.lr_power": (lambda v: v > 0, "a number > 0"),
}


def validate(cfg: Config) -> None:
    """Check choices, ranges and paths; raise ConfigError naming the first bad key."""
    cfg.precision = PRECISION_ALIASES.get(str(cfg.precision), cfg.precision)
    for path, f, value in _walk(cfg):
        allowed = f.metadata.get("choices")
        if allowed is not None and value is not None and value not in allowed:
            raise ConfigError(f"config key '{path}' is '{value}'; allowed values are: {', '.join(allowed)}.")
        if path in _RANGES:
            ok, what = _RANGES[path]
            if not ok(value):
                raise ConfigError(f"config key '{path}' is {value!r}; it must be {what}.")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by train.grad_accum ({cfg.train.grad_accum})."
        )
    for key in ("model.pretrained", "model.vae", "model.original_config", "model.tokenizer", "model.text_encoder"):
        value = _get(cfg, key)
        if value and not Path(value).exists() and not (key != "model.original_config" and is_hub_id(value)):
            raise ConfigError(f"config key '{key}' points to '{value}', which does not exist "
                              "(nor is it a Hub id such as org/name).")
    _check_model(cfg)
    _check_revision(cfg.model.revision)
    _check_log(cfg)
    if cfg.data.source == "folder":
        _check_folder(cfg.data)
    elif cfg.data.subsets or cfg.data.dataset_config:
        raise ConfigError(f"data.subsets and data.dataset_config are folders of images: set data.source=folder "
                          f"(it is {cfg.data.source}).")
    if cfg.data.source in ("webdataset", "parquet", "arrow", "latents") and not cfg.data.path:
        raise ConfigError(f"data.source={cfg.data.source} needs data.path (see docs/data.md).")
    if cfg.data.source == "latents" and not (Path(cfg.data.path) / "manifest.json").is_file():
        raise ConfigError(f"data.path '{cfg.data.path}' is not a finished latent cache (no manifest.json); "
                          "make one with `colodiffusion cache`.")
    _check_own_data(cfg)
    lora = cfg.train.lora
    if lora.text_encoder and not lora.rank:
        raise ConfigError("train.lora.text_encoder=true needs train.lora.rank > 0 (the adapter rank).")
    if lora.rank and not lora.target_modules:
        raise ConfigError("train.lora.target_modules is empty; name the UNet modules to adapt (e.g. [to_q, to_v]).")
    _check_sample(cfg)
    _check_perf(cfg)
    _check_parallel(cfg)
    resume = cfg.train.resume
    if resume and resume != "auto" and not Path(resume).exists():
        raise ConfigError(f"config key 'train.resume' is '{resume}'; give 'auto' or an existing checkpoint folder.")


def _check_folder(d: DataConfig) -> None:
    given = [k for k in ("path", "subsets", "dataset_config") if getattr(d, k)]
    if not given:
        raise ConfigError("data.source=folder needs data.path: a folder of images with .txt captions (or data.subsets, "
                          "or a kohya dataset TOML in data.dataset_config).")
    if len(given) > 1:
        raise ConfigError("give one of data.path, data.subsets and data.dataset_config, not "
                          f"{' and '.join('data.' + k for k in given)}.")
    if d.path and not Path(d.path).is_dir():
        raise ConfigError(f"config key 'data.path' points to '{d.path}', which is not a folder.")
    if not d.caption_extension.startswith("."):
        raise ConfigError(f"config key 'data.caption_extension' is '{d.caption_extension}'; it must start with a dot "
                          "(.txt, .caption).")
    folder_subsets(d)  # a subset (or the TOML) that cannot work: one sentence now



SDPA_KERNELS = ("flash", "cudnn", "efficient", "math")


def parse_sdpa_by_head_dim(spec: str) -> dict[int, str]:
    """"40:cudnn,80:flash" -> {40: "cudnn", 80: "flash"}; ConfigError naming the bad part."""
    table: dict[int, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        dim, _, kernel = part.partition(":")
        if not dim.strip().isdigit() or kernel.strip() not in SDPA_KERNELS:
            raise ConfigError(f"perf.sdpa_by_head_dim entry '{part}' is not HEAD_DIM:KERNEL with KERNEL one of "
                              f"{', '.join(SDPA_KERNELS)} (e.g. 40:cudnn,80:flash).")
        table[int(dim)] = kernel.strip()
    return table


# A Hugging Face Hub repository id: "org/name" (models/hub.py resolves it through huggingface_hub).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def is_hub_id(value: str) -> bool:
    """'org/name' that is not a local path: a model on the Hugging Face Hub (or in its local cache)."""
    return bool(_HUB_ID.match(value)) and ".." not in value and not Path(value).exists()


# A branch, tag or commit: one name (a pull request's refs/pr/N too), never a path into the cache.
_REVISION = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*|refs/pr/\d+)$")


def _check_revision(revision: Optional[str]) -> None:
    if revision is not None and (not _REVISION.match(revision) or ".." in revision):
        raise ConfigError(f"config key 'model.revision' is {revision!r}; give a branch, tag or commit name (refs/pr/N "
                          "for a pull request), without '..' or path separators: it names a file in the Hub cache.")


def _check_model(cfg: Config) -> None:
    m = cfg.model
    if m.preset == "sdxl":
        _check_sdxl(cfg)
    elif m.pretrained and (Path(m.pretrained) / "text_encoder_2").is_dir():
        raise ConfigError(f"model.pretrained '{m.pretrained}' is an SDXL folder (it has text_encoder_2/): set "
                          "model.preset=sdxl.")
    if m.init == "scratch" and m.preset != "tiny" and not (m.pretrained or (m.text_encoder and m.vae)):
        raise ConfigError(f"model.init=scratch with model.preset={m.preset} needs its frozen parts: set "
                          "model.pretrained (a folder or Hub id with text_encoder/, tokenizer/ and vae/), or "
                          "model.text_encoder and model.vae (and model.tokenizer if the text encoder's folder has "
                          "none).")
    if cfg.train.optimizer != "adamw" and cfg.perf.optimizer != "adamw":
        raise ConfigError(f"perf.optimizer={cfg.perf.optimizer} is AdamW with 8-bit states; it does not combine with "
                          f"train.optimizer={cfg.train.optimizer}.")


def _check_sdxl(cfg: Config) -> None:
    """What the SDXL preset does not do (yet) is refused here, before anything is read or written."""
    m, root = cfg.model, Path(cfg.model.pretrained or "")
    refusals = [
        (not m.pretrained, "model.preset=sdxl fine-tunes the UNet of model.pretrained: give a diffusers SDXL folder "
                           "(unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/) or its Hub id."),
        (m.pretrained and root.is_file(), f"model.pretrained '{m.pretrained}' is a single file; model.preset=sdxl "
                                          "reads a diffusers SDXL folder (convert the file with diffusers first)."),
        (m.pretrained and root.is_dir() and not (root / "text_encoder_2").is_dir(),
         f"model.pretrained '{m.pretrained}' has no text_encoder_2/, so it is not an SDXL folder: use "
         "model.preset=sd15 or sd2 for it, or point to an SDXL folder."),
        (m.init == "scratch", "model.init=scratch is not supported for model.preset=sdxl: it fine-tunes "
                              "model.pretrained's UNet."),
        (bool(m.tokenizer or m.text_encoder), "model.tokenizer and model.text_encoder name one text encoder; "
                                              "with model.preset=sdxl both encoders come from model.pretrained."),
        (m.train_text_encoder or cfg.train.lora.text_encoder,
         "model.preset=sdxl trains the UNet (fully or with LoRA) over frozen text encoders: leave "
         "model.train_text_encoder and train.lora.text_encoder false."),
        (cfg.data.source == "latents", "data.source=latents is not supported for model.preset=sdxl (the cache "
                                       "stores one encoder's context and no image sizes): train from the images."),
        (cfg.train.save_every_n_epochs and cfg.train.save_model_as != "diffusers",
         f"train.save_model_as={cfg.train.save_model_as} writes the single-file SD layout, which has no SDXL "
         "form here: use train.save_model_as=diffusers."),
        (cfg.parallel.tp > 1, "parallel.tp is not supported for model.preset=sdxl (its plan covers SD 1.x/2.x "
                              "UNets): use data parallelism (ddp, fsdp, deepspeed)."),
    ]
    for refused, sentence in refusals:
        if refused:
            raise ConfigError(sentence)



def _check_log(cfg: Config) -> None:
    bad = [n for n in report_to(cfg) if n not in TRACKERS]
    if bad:
        raise ConfigError(f"config key 'log.report_to' names '{bad[0]}'; allowed: {', '.join(TRACKERS)} "
                          "(comma-separated), all or none.")


def _check_own_data(cfg: Config) -> None:
    d = cfg.data
    for key in ("data.val_path", "data.class_path", "eval.clip_model", "eval.fid_model"):
        value = _get(cfg, key)
        if value and not Path(value).exists():
            raise ConfigError(f"config key '{key}' points to '{value}', which does not exist.")
    if d.val_path and d.val_fraction:
        raise ConfigError("give data.val_path or data.val_fraction, not both: both say where validation data comes "
                          "from.")
    if d.val_path and d.source == "shapes":
        raise ConfigError("data.val_path is for image sources; for shapes data use data.val_fraction.")
    if d.class_path and not Path(d.class_path).is_dir():
        raise ConfigError(f"config key 'data.class_path' points to '{d.class_path}', which is not a folder of class "
                          "images.")
    if d.cache_latents and cfg.model.preset == "sdxl":
        raise ConfigError("data.cache_latents is not supported for model.preset=sdxl (its size conditioning reads "
                          "each image's size).")
    if d.cache_latents and d.source != "shapes":
        raise ConfigError(f"data.cache_latents is for the shapes data (data.source is {d.source}); for images, make a "
                          "latent cache on disk with `colodiffusion cache` and train with data.source=latents.")
    if d.source == "latents" and (d.shuffle_caption or d.tag_dropout or d.class_path):
        raise ConfigError("data.shuffle_caption, data.tag_dropout and data.class_path need captions and images at "
                          "training time; a latent cache stores finished text contexts: train from the images.")
    if cfg.eval.every and not (cfg.eval.clip_model or cfg.eval.fid_model):
        raise ConfigError("eval.every needs local weights to score with: eval.clip_model and/or eval.fid_model.")
    if cfg.eval.every and not (d.val_fraction or d.val_path):
        raise ConfigError("eval.every scores held-out captions and images: set data.val_fraction or data.val_path.")
    if cfg.eval.every and cfg.eval.fid_model and d.source == "latents":
        raise ConfigError("FID during training compares held-out images, which a latent cache does not store: use "
                          "eval.clip_model, or `colodiffusion eval MODEL --data FOLDER --fid-model DIR` afterwards.")


def _check_sample(cfg: Config) -> None:
    sc = cfg.sample
    if sc.karras and sc.sampler not in KARRAS_SAMPLERS:
        raise ConfigError(f"sample.karras=true needs a k-sampler as sample.sampler ({', '.join(KARRAS_SAMPLERS)}); "
                          f"it is '{sc.sampler}'.")
    try:
        for spec in sc.specs():
            check_prompt(spec, f"prompt '{spec.prompt}'")
    except ConfigError as exc:
        raise ConfigError(f"config key 'sample.prompts': {exc}") from None


def _check_perf(cfg: Config) -> None:
    if cfg.perf.param_dtype == "bf16" and cfg.precision != "bf16":
        raise ConfigError(
            f"perf.param_dtype=bf16 needs precision=bf16 (precision is {cfg.precision}): bf16 weights compute in bf16."
        )
    if cfg.perf.optimizer_offload and cfg.precision == "fp16":
        raise ConfigError("perf.optimizer_offload does not work with precision=fp16 (the grad scaler cannot see "
                          "the offloaded optimizer's gradients); use precision=bf16.")
    parse_sdpa_by_head_dim(cfg.perf.sdpa_by_head_dim)
    # YAML reads off/no/false (and on/yes/true) as booleans, which reach this str field as "False"/"True".
    cache = cfg.perf.compile_cache
    if cache.lower() in ("false", "off", "no", "none", ""):
        cfg.perf.compile_cache = "off"
    elif cache.lower() in ("true", "on", "yes"):
        cfg.perf.compile_cache = "auto"


def _check_parallel(cfg: Config) -> None:
    p = cfg.parallel
    if p.zero == 1 and p.strategy == "fsdp":
        raise ConfigError("parallel.zero=1 is for deepspeed/colossalai; fsdp shards at least the gradients: "
                          "use 2 or 3.")
    if p.strategy == "colossalai" and p.colossalai.plugin == "low_level_zero" and p.zero == 3:
        raise ConfigError("parallel.zero=3 is not a low_level_zero stage (1 or 2); use "
                          "parallel.colossalai.plugin=gemini for ZeRO-3.")
    if p.strategy in ("ddp", "deepspeed", "colossalai") and (p.tp != 1 or p.dp_replicate != 1):
        raise ConfigError(f"parallel.strategy={p.strategy} replicates or shards over all ranks: parallel.tp ({p.tp}) "
                          f"and parallel.dp_replicate ({p.dp_replicate}) must be 1 (use strategy=fsdp to combine "
                          "them).")
    if p.strategy == "deepspeed":
        _check_deepspeed(cfg)
    if p.strategy == "colossalai":
        _check_colossalai(cfg)
    if p.strategy == "colossalai" and p.colossalai.plugin == "gemini":
        _check_gemini(cfg)
    for engine, options in (("deepspeed", p.deepspeed), ("colossalai", p.colossalai)):
        changed = [f.name for f in dataclasses.fields(options) if getattr(options, f.name) != f.default]
        if changed and p.strategy != engine:
            raise ConfigError(f"parallel.{engine}.{changed[0]} is only read by parallel.strategy={engine} "
                              f"(strategy is {p.strategy}).")
    if p.deepspeed.config is not None and not Path(p.deepspeed.config).is_file():
        raise ConfigError(f"config key 'parallel.deepspeed.config' points to '{p.deepspeed.config}', "
                          "which is not a file.")


def _check_deepspeed(cfg: Config) -> None:
    p = cfg.parallel
    if p.async_checkpoint:
        raise ConfigError("parallel.async_checkpoint is for ddp/fsdp; deepspeed saves with its own save_checkpoint.")
    if p.deepspeed.offload_params and p.zero != 3:
        raise ConfigError(f"parallel.deepspeed.offload_params=true needs parallel.zero=3 (it is {p.zero}): only "
                          "ZeRO-3 partitions parameters.")
    if cfg.perf.param_dtype != "fp32" or cfg.perf.optimizer_offload or cfg.perf.optimizer != "adamw":
        raise ConfigError("parallel.strategy=deepspeed keeps its own fp32 masters and offload: leave "
                          "perf.param_dtype=fp32, perf.optimizer=adamw and perf.optimizer_offload=false (use precision "
                          "and parallel.offload).")


def _check_colossalai(cfg: Config) -> None:
    p = cfg.parallel
    if p.colossalai.plugin == "gemini" and cfg.train.ema.enabled:
        raise ConfigError("parallel.colossalai.plugin=gemini keeps the weights in chunks that the EMA cannot "
                          "follow; set train.ema.enabled=false, or use low_level_zero / deepspeed for an EMA.")
    if p.colossalai.plugin != "low_level_zero" and p.offload != "none":
        raise ConfigError(f"parallel.offload is for low_level_zero; with {p.colossalai.plugin} use the gemini "
                          "fractions (parallel.colossalai.offload_optim_frac / offload_param_frac) or none.")
    if cfg.perf.param_dtype != "fp32" or cfg.perf.optimizer_offload:
        raise ConfigError("parallel.strategy=colossalai keeps its own precision and offload: leave "
                          "perf.param_dtype=fp32 and perf.optimizer_offload=false.")


GEMINI_FRACTIONS = ("shard_param_frac", "offload_optim_frac", "offload_param_frac")  # read with static placement


def _check_gemini(cfg: Config) -> None:
    p = cfg.parallel.colossalai
    if cfg.precision not in ("fp16", "bf16"):
        raise ConfigError(f"parallel.colossalai.plugin=gemini computes in fp16 or bf16 only (precision is "
                          f"{cfg.precision}); set precision=16 (the seed's) or precision=bf16.")
    if cfg.perf.optimizer != "adamw" or cfg.train.optimizer != "adamw":
        raise ConfigError("parallel.colossalai.plugin=gemini steps with Colossal-AI's HybridAdam: leave "
                          "perf.optimizer=adamw and train.optimizer=adamw.")
    changed = [k for k in GEMINI_FRACTIONS if getattr(p, k) != getattr(ColossalAIOptions(), k)]
    if changed and p.placement_policy != "static":
        raise ConfigError(f"parallel.colossalai.{changed[0]} is read only with "
                          f"parallel.colossalai.placement_policy=static (it is {p.placement_policy}, which places the "
                          "chunks itself); set one or the other.")


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg
