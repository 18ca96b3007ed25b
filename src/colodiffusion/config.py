"""The typed config schema, YAML loading and `key=value` overrides.

Every field carries a docstring and, for string choices, the allowed values. A YAML recipe only
holds what differs from these defaults. `load_config` fails with one `ConfigError` sentence that
names the key: the CLI turns it into exit code 2 without a traceback.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user mistake in the config: one sentence naming the key and what is allowed."""


def choice(default: str, *allowed: str):
    """A string field restricted to `allowed` (checked by `validate`)."""
    return field(default=default, metadata={"choices": allowed})


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Output folder: config.yaml, metrics.jsonl, checkpoints/, samples/, final/ are written here."""


@dataclass
class ModelConfig:
    preset: str = choice("tiny", "tiny", "sd15", "sd2")
    """Architecture from the preset registry: tiny (CPU-sized), sd15 (SD 1.x), sd2 (SD 2.x, v-prediction)."""
    pretrained: Optional[str] = None
    """Local diffusers-format folder (unet/, vae/, text_encoder/, tokenizer/) to start from."""
    vae: Optional[str] = None
    """Local diffusers AutoencoderKL folder; for tiny without it, the first stage is trained from the data."""
    prediction_type: Optional[str] = choice(None, "epsilon", "v_prediction")
    """What the UNet predicts; None takes the preset's (epsilon for sd15/tiny, v_prediction for sd2)."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in backward: less memory, about 30% more compute."""


@dataclass
class FirstStageConfig:
    steps: int = 500
    """Optimizer steps for training the KL autoencoder when no VAE weights are given."""
    batch_size: int = 16
    """Images per autoencoder step."""
    lr: float = 2e-3
    """Autoencoder learning rate (AdamW)."""
    kl_weight: float = 1e-6
    """Weight of the KL term against the reconstruction loss (SD's first stage used ~1e-6)."""
    scale_samples: int = 512
    """Images encoded to measure the latent scale factor (1 / std of latents, as SD's 0.18215)."""


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    """Length of the DDPM noise schedule."""
    beta_start: float = 0.00085
    """First beta of SD's scaled-linear schedule."""
    beta_end: float = 0.012
    """Last beta of SD's scaled-linear schedule."""
    beta_schedule: str = choice("scaled_linear", "scaled_linear", "linear", "squaredcos_cap_v2")
    """Shape of the beta schedule."""
    min_snr_gamma: Optional[float] = None
    """Min-SNR-gamma loss weighting (5.0 is the paper's value); None trains with plain MSE."""
    offset_noise: float = 0.0
    """Strength of per-channel offset noise (0.05-0.1 helps very dark/bright images); 0 disables."""
    caption_dropout: float = 0.1
    """Probability of replacing a caption by the empty prompt, for classifier-free guidance."""


@dataclass
class DataConfig:
    source: str = choice("shapes", "shapes", "folder")
    """Where training images come from: built-in synthetic shapes, or a folder of images + .txt captions."""
    path: Optional[str] = None
    """Dataset location for sources that read files (folder)."""
    resolution: int = 64
    """Square training resolution in pixels (latents are resolution / VAE factor)."""
    num_samples: int = 20000
    """Size of one epoch of the synthetic shapes dataset."""
    num_workers: int = 0
    """DataLoader worker processes (0 reads in the training process)."""
    random_flip: bool = False
    """Random horizontal flips (folder source)."""


@dataclass
class EMAConfig:
    enabled: bool = True
    """Keep an exponential moving average of the UNet weights (exported by default)."""
    decay: float = 0.999
    """EMA decay per optimizer step."""
    warmup: bool = True
    """Use decay min(decay, (1 + step) / (10 + step)) so early EMA tracks the fast-moving weights."""


@dataclass
class SampleConfig:
    prompts: list[str] = field(
        default_factory=lambda: ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    )
    """Fixed prompts of the sample grid written during training."""
    steps: int = 25
    """Denoising steps for samples and evaluation."""
    guidance: float = 4.0
    """Classifier-free guidance scale."""
    sampler: str = choice("ddim", "ddim", "dpm++", "euler", "euler_a", "pndm")
    """Sampler (a diffusers scheduler)."""
    seed: int = 0
    """Seed for the sample grid."""


@dataclass
class TrainConfig:
    max_steps: int = 1500
    """Optimizer steps to train for."""
    seed: int = 0
    """Seed for weights, data order, noise and timesteps."""
    batch_size: int = 32
    """Images per optimizer step (over all data-parallel ranks, before accumulation splits it)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    lr_schedule: str = choice("cosine", "constant", "cosine")
    """Learning-rate shape after warmup."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""
    resume: Optional[str] = None
    """'auto' resumes from the newest checkpoint in run.dir (if any); a path resumes from that checkpoint."""
    checkpoint_every: int = 500
    """Save a checkpoint every N steps (and at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    log_every: int = 25
    """Write metrics every N steps (the only host syncs of the loop happen here)."""
    sample_every: int = 500
    """Write a sample grid every N steps (and at the end); 0 disables."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """EMA of the UNet."""
    max_bad_steps: int = 10
    """Stop the run after this many consecutive steps with a non-finite loss or gradient (their updates are skipped); 0 never stops."""
    preempt_check_every: int = 10
    """In distributed runs, agree on a SIGTERM/SIGUSR1 stop every N steps (one tiny all-reduce); single-process runs check every step."""
    debug_nan_steps: list[int] = field(default_factory=list)
    """Test hook: make the loss of these steps (1-based) NaN, to exercise the numerical guard."""


@dataclass
class ParallelConfig:
    strategy: str = choice("single", "single")
    """How the model is distributed over processes."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: str = choice("fp32", "fp32", "bf16", "fp16")
    """Compute precision: fp32, or bf16/fp16 autocast over fp32 weights (fp16 with a grad scaler)."""


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
    "diffusion.caption_dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "diffusion.offset_noise": (lambda v: v >= 0, "a number >= 0"),
    "diffusion.min_snr_gamma": (lambda v: v is None or v > 0, "a number > 0 or null"),
    "diffusion.num_train_timesteps": (lambda v: v >= 2, "a whole number >= 2"),
    "first_stage.steps": (lambda v: v >= 0, "a whole number >= 0"),
    "first_stage.batch_size": (lambda v: v >= 1, "a whole number >= 1"),
    "sample.steps": (lambda v: v >= 1, "a whole number >= 1"),
}


def _walk(obj: Any, prefix: str = ""):
    """Yield (key path, dataclass field, value) for every leaf field."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _walk(value, path + ".")
        else:
            yield path, f, value


def _allowed_keys(node: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else ""


def _node_at(path: str) -> Any:
    node: Any = Config()
    for part in path.split(".")[:-1]:
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            return None
        node = getattr(node, part)
    return node


def _friendly(exc: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        parent = _node_at(key)
        allowed = _allowed_keys(parent) if parent is not None else _allowed_keys(Config())
        return ConfigError(f"unknown config key '{key}' in {where}; allowed keys here are: {allowed}.")
    if "Value '" in msg or "could not be converted" in msg or "Invalid type" in msg:
        return ConfigError(f"config key '{key}' in {where} has the wrong type ({msg}).")
    return ConfigError(f"config key '{key}' in {where} is invalid: {msg}")


def validate(cfg: Config) -> None:
    """Check choices, ranges and paths; raise ConfigError naming the first bad key."""
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
    for key in ("model.pretrained", "model.vae"):
        value = _get(cfg, key)
        if value and not Path(value).exists():
            raise ConfigError(f"config key '{key}' points to '{value}', which does not exist.")
    if cfg.data.source == "folder":
        if not cfg.data.path:
            raise ConfigError("data.source=folder needs data.path: a folder of images with .txt captions.")
        if not Path(cfg.data.path).is_dir():
            raise ConfigError(f"config key 'data.path' points to '{cfg.data.path}', which is not a folder.")
    resume = cfg.train.resume
    if resume and resume != "auto" and not Path(resume).exists():
        raise ConfigError(f"config key 'train.resume' is '{resume}'; give 'auto' or an existing checkpoint folder.")


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def load_config(path: Optional[str | os.PathLike] = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `key=value` overrides; validated."""
    schema = OmegaConf.structured(Config)
    merged = schema
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist.")
        try:
            data = OmegaConf.load(p)
        except Exception as exc:  # YAML syntax errors come in many types
            raise ConfigError(f"config file '{p}' is not valid YAML: {str(exc).splitlines()[0]}") from None
        try:
            merged = OmegaConf.merge(merged, data)
        except OmegaConfBaseException as exc:
            raise _friendly(exc, f"'{p}'") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=200).")
        key = item.split("=", 1)[0]
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _friendly(exc, f"override '{item}'") from None
        except Exception as exc:
            raise ConfigError(f"override '{item}' for key '{key}' could not be parsed: {exc}.") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _friendly(exc, "the config") from None
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
