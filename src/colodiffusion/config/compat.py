"""Compatibility with the layouts users bring: the original project's latent-diffusion YAML (its keys
are answered with ours), its precision spellings, and kohya sd-scripts' dataset TOML and subsets.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from colodiffusion.config.errors import ConfigError
from colodiffusion.config.schema import DataConfig, SubsetConfig

# The seed's (PyTorch Lightning's) precision spellings.
PRECISION_ALIASES = {"16": "fp16", "16-mixed": "fp16", "32": "fp32", "32-true": "fp32", "bf16-mixed": "bf16"}


# The seed's (latent-diffusion's) config keys and ours, for a seed-style YAML (model.target, lightning:).
SEED_KEYS = {
    "model.base_learning_rate": "train.lr",
    "model.params.linear_start": "diffusion.beta_start",
    "model.params.linear_end": "diffusion.beta_end",
    "model.params.timesteps": "diffusion.num_train_timesteps",
    "model.params.parameterization": "model.prediction_type (eps: epsilon, v: v_prediction)",
    "model.params.unet_config": "model.preset (sd15, sd2, sdxl, tiny) with model.init=scratch, or model.pretrained",
    "model.params.first_stage_config": "model.vae",
    "model.params.cond_stage_config": "model.text_encoder and model.tokenizer",
    "model.params.use_ema": "train.ema.enabled",
    "model.params.scale_factor": "the VAE's own scaling_factor",
    "data.params.batch_size": "train.batch_size (the global batch: per-GPU batch x GPUs)",
    "data.params.num_workers": "data.num_workers",
    "data.params.train": "data.source and data.path",
    "lightning.trainer.max_epochs": "train.max_epochs",
    "lightning.trainer.max_steps": "train.max_steps",
    "lightning.trainer.precision": "precision",
    "lightning.trainer.devices": "trainer.devices",
    "lightning.trainer.accelerator": "trainer.accelerator",
    "lightning.trainer.accumulate_grad_batches": "train.grad_accum",
    "lightning.trainer.gradient_clip_val": "train.grad_clip",
    "lightning.strategy": "parallel.strategy (and parallel.colossalai.plugin, parallel.colossalai.placement_policy)",
    "lightning.callbacks.image_logger": "train.sample_every",
    "lightning.modelcheckpoint": "train.checkpoint_every",
}


# An engine's own options live under it (parallel.deepspeed.*, parallel.colossalai.*); the flat spellings of
# earlier recipes and commands are read as the key they now are.
MOVED_KEYS = {
    "parallel.offload_params": "parallel.deepspeed.offload_params",
    "parallel.deepspeed_config": "parallel.deepspeed.config",
    **{f"parallel.{k}": f"parallel.colossalai.{k}"
       for k in ("plugin", "placement_policy", "shard_param_frac", "offload_optim_frac", "offload_param_frac")},
}


def moved_to_engine(data: Any, where: str) -> Any:
    """A YAML file's `data` (a plain dict whose sections are dicts, loading.py's `_checked_sections`) with
    MOVED_KEYS' flat keys written under their engine."""
    parallel = data.get("parallel") if isinstance(data, dict) else None
    if not isinstance(parallel, dict) or not any(k.split(".", 1)[1] in parallel for k in MOVED_KEYS):
        return data
    parallel = dict(parallel)
    for old, new in MOVED_KEYS.items():
        name, (engine, key) = old.split(".", 1)[1], new.split(".")[1:]
        if name not in parallel:
            continue
        section = parallel.get(engine, {})
        if key in section:
            raise ConfigError(f"{where} sets both {old} and {new}; keep {new}.")
        parallel[engine] = {**section, key: parallel.pop(name)}
    return {**data, "parallel": parallel}


# Keys of the seed's own recipes (config/train_colossalai.yaml) that users type as overrides.
SEED_OVERRIDES = {
    "data.file_path": "data.path (with data.source=webdataset for LAION shards, or folder, parquet, arrow, latents)",
}


def _refuse_seed_layout(data: Any, path: Path) -> None:
    """A seed (latent-diffusion) YAML is not this schema: say which of its keys map to which of ours."""
    if not OmegaConf.is_dict(data):
        return
    model = data.get("model")
    if "lightning" not in data and not (OmegaConf.is_dict(model) and "target" in model):
        return
    flat = _flat_keys(OmegaConf.to_container(data, resolve=False))
    found = [f"{k} -> {v}" for k, v in SEED_KEYS.items() if any(f == k or f.startswith(k + ".") for f in flat)]
    raise ConfigError(f"config file '{path}' is in the seed's latent-diffusion layout (model.target, lightning:), "
                      f"which this schema does not read; write its keys as ours: {'; '.join(found) or 'see the table'} "
                      "(README: 'Coming from the seed project').")


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix.rstrip(".")]
    return [k for key, value in node.items() for k in _flat_keys(value, f"{prefix}{key}.")]


# kohya sd-scripts' dataset TOML keys and ours (per subset, or in [general] for all of them).
KOHYA_SUBSET_KEYS = {"image_dir": "path", "num_repeats": "repeats", "caption_extension": "caption_extension",
                     "class_tokens": "class_tokens", "shuffle_caption": "shuffle_caption", "keep_tokens": "keep_tokens",
                     "caption_tag_dropout_rate": "tag_dropout"}
KOHYA_DATASET_KEYS = {"resolution": "data.resolution", "batch_size": "train.batch_size (the global batch)",
                      "enable_bucket": "data.bucketing", "flip_aug": "data.random_flip",
                      "random_crop": "data.crop=random",
                      "caption_dropout_rate": "diffusion.caption_dropout", "is_reg": "data.class_path"}


def folder_subsets(d: DataConfig) -> list[SubsetConfig]:
    """The folders of a folder dataset, every key filled in (a subset's own, else [general]'s of a
    dataset TOML, else data.*'s); one ConfigError sentence for one that cannot work."""
    if d.dataset_config:
        general, subsets = _read_dataset_toml(d.dataset_config)
    else:
        general, subsets = {}, list(d.subsets) or [SubsetConfig(path=d.path or "")]
    out = []
    for n, sub in enumerate(subsets):
        where = f"subset {n + 1} of {'data.dataset_config' if d.dataset_config else 'data.subsets'}"
        # (repeats falls back to 1, not data.repeats: that one multiplies every subset's in data/views.py)
        filled = SubsetConfig(**{f.name: _first(getattr(sub, f.name), general.get(f.name),
                                                1 if f.name == "repeats" else getattr(d, f.name, None))
                                 for f in dataclasses.fields(SubsetConfig)})
        if not isinstance(filled.path, str) or not filled.path or not Path(filled.path).is_dir():
            raise ConfigError(f"{where}: its path '{filled.path}' is not a folder of images.")
        problem = _subset_problem(filled)
        if problem:
            raise ConfigError(f"{where}: {problem}.")
        out.append(filled)
    return out


def _subset_problem(s: SubsetConfig) -> Optional[str]:
    kinds = {"repeats": int, "caption_extension": str, "class_tokens": (str, type(None)), "shuffle_caption": bool,
             "keep_tokens": int, "tag_dropout": (int, float)}
    for key, kind in kinds.items():
        if not isinstance(getattr(s, key), kind):
            return f"{key} is {getattr(s, key)!r}, which is not a {getattr(kind, '__name__', 'value of its type')}"
    if s.repeats < 1:
        return f"repeats is {s.repeats}; it must be a whole number >= 1"
    if not s.caption_extension.startswith("."):
        return f"caption_extension '{s.caption_extension}' must start with a dot (.txt, .caption)"
    if s.keep_tokens < 0 or not 0 <= s.tag_dropout < 1:
        return "keep_tokens must be >= 0 and tag_dropout in [0, 1)"
    return None


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _read_dataset_toml(path: str) -> tuple[dict, list[SubsetConfig]]:
    """([general] options as our subset keys, the subsets) of a kohya sd-scripts dataset TOML."""
    import tomllib

    where = f"data.dataset_config '{path}'"
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist.") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{where} is not a readable TOML file ({exc}).") from None
    datasets = doc.get("datasets")
    if not isinstance(datasets, list) or len(datasets) != 1 or not isinstance(datasets[0], dict):
        raise ConfigError(f"{where} must hold exactly one [[datasets]] table (a run trains one resolution here; "
                          "its [[datasets.subsets]] may be several).")

    def ours(table: Any, what: str) -> dict:
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {what} must be a table.")
        for key in table:
            if key in KOHYA_DATASET_KEYS:
                raise ConfigError(f"{where}: '{key}' in {what} is set here with {KOHYA_DATASET_KEYS[key]}, "
                                  "not in the TOML.")
            if key not in KOHYA_SUBSET_KEYS:
                raise ConfigError(f"{where}: '{key}' in {what} is not read here; the keys are: "
                                  f"{', '.join(KOHYA_SUBSET_KEYS)}.")
        return {KOHYA_SUBSET_KEYS[k]: v for k, v in table.items()}

    general = ours(doc.get("general", {}), "[general]")
    dataset = dict(datasets[0])
    subsets = dataset.pop("subsets", None)
    general.update(ours(dataset, "[[datasets]]"))
    if not isinstance(subsets, list) or not subsets:
        raise ConfigError(f"{where}: its [[datasets]] has no [[datasets.subsets]] (each with an image_dir).")
    return general, [SubsetConfig(**ours(t, f"[[datasets.subsets]] number {n + 1}")) for n, t in enumerate(subsets)]

