"""The typed config schema, YAML loading and `key=value` overrides.

Every field carries a docstring and, for string choices, the allowed values. A YAML recipe only
holds what differs from these defaults. `load_config` fails with one `ConfigError` sentence that
names the key: the CLI turns it into exit code 2 without a traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user mistake in the config: one sentence naming the key and what is allowed."""


# Sampler names (diffusers schedulers, built in `diffusion/samplers.py`; a test keeps the two in step).
# Kept here so that command-line parsers know them without importing torch or diffusers.
SAMPLER_NAMES = ("ddim", "dpm++", "euler", "euler_a", "pndm")
KARRAS_SAMPLERS = ("dpm++", "euler")
"""The samplers that take Karras sigmas (the k-diffusion noise levels)."""


def choice(default: str, *allowed: str):
    """A string field restricted to `allowed` (checked by `validate`)."""
    return field(default=default, metadata={"choices": allowed})


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Output folder: config.yaml, metrics.jsonl, checkpoints/, samples/, final/ are written here."""
    overwrite: bool = False
    """Start over in a run.dir that already holds a run: delete its checkpoints, final/, components/, samples
    and logs first. Without it such a folder is refused unless train.resume continues it."""


@dataclass
class ModelConfig:
    preset: str = choice("tiny", "tiny", "sd15", "sd2", "sdxl")
    """Architecture from the preset registry: tiny (CPU-sized), sd15 (SD 1.x), sd2 (SD 2.x, v-prediction), sdxl
    (SDXL: two text encoders and size/crop conditioning; fine-tunes the UNet of model.pretrained, a diffusers
    SDXL folder with text_encoder_2/ and tokenizer_2/)."""
    pretrained: Optional[str] = None
    """Diffusers-format folder (unet/, vae/, text_encoder/, tokenizer/), a Hugging Face Hub id such as
    stable-diffusion-v1-5/stable-diffusion-v1-5 (downloaded once into the Hub cache; with HF_HUB_OFFLINE=1 only
    the cache is read), or a single-file checkpoint (.safetensors/.ckpt in the original LDM layout, SD 1.x/2.x)."""
    original_config: Optional[str] = None
    """The original LDM YAML (e.g. v1-inference.yaml) of a single-file `pretrained`; None infers it from the keys."""
    tokenizer: Optional[str] = None
    """CLIP tokenizer folder (or diffusers folder with tokenizer/) or Hub id, for single-file checkpoints that carry
    none or for model.init=scratch."""
    text_encoder: Optional[str] = None
    """The frozen CLIP text encoder's folder (or diffusers folder with text_encoder/) or Hub id, e.g.
    openai/clip-vit-large-patch14 as the seed's cond_stage_config (for model.init=scratch); None takes model.pretrained's."""
    init: str = choice("pretrained", "pretrained", "scratch")
    """pretrained: the UNet starts from model.pretrained's weights; scratch: a freshly initialised UNet of
    model.preset (training from scratch) with the frozen tokenizer, text encoder and VAE still taken from
    model.pretrained (or model.tokenizer / model.text_encoder / model.vae)."""
    revision: Optional[str] = None
    """Hub ids only: the branch, tag or commit of model.pretrained (and of model.vae / tokenizer / text_encoder) to load."""
    variant: Optional[str] = None
    """Weights variant to load from diffusers folders and Hub ids, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)."""
    pretrained_ema: bool = False
    """Start from the EMA weights (model_ema.*) of a single-file `pretrained` instead of its raw weights."""
    train_text_encoder: bool = False
    """Fine-tune the text encoder too (its own param group; it is then saved and exported with the UNet)."""
    text_encoder_lr: Optional[float] = None
    """Learning rate of the text encoder's param group; None uses train.lr."""
    vae: Optional[str] = None
    """Diffusers AutoencoderKL folder or Hub id (e.g. stabilityai/sd-vae-ft-mse); for tiny without it, the first
    stage is trained from the data."""
    prediction_type: Optional[str] = choice(None, "epsilon", "v_prediction")
    """What the UNet predicts; None takes the preset's (epsilon for sd15/tiny, v_prediction for sd2)."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in backward: less memory, about 30% more compute."""


@dataclass
class FirstStageConfig:
    steps: int = 300
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
    min_snr_gamma: Optional[float] = 5.0
    """Min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 is the paper's value, it converges faster); null trains with plain MSE."""
    high_noise_weight: float = 0.0
    """Added to every step's weight on the error of the implied clean image x0, on top of min(SNR, gamma): the
    noisiest steps otherwise weigh ~SNR (0.005 at SD's last step). 1.0 is v-prediction's plain weight (SNR + 1).
    Measured on the tiny run (bench/NOTES.md): it buys colour at those steps and costs shape (0.93 at 0, 0.78 at
    0.25, 0.66 at 1.0), so 0 stays the default."""
    offset_noise: float = 0.0
    """Strength of per-channel offset noise (0.05-0.1 helps very dark/bright images); 0 disables."""
    caption_dropout: float = 0.1
    """Probability of replacing a caption by the empty prompt, for classifier-free guidance."""


@dataclass
class SubsetConfig:
    """One folder of a dataset made of several (kohya's [[datasets.subsets]]); a key left unset takes
    the data.* value of the same name."""
    path: str = ""
    """The subset's folder of images (kohya's image_dir)."""
    repeats: Optional[int] = None
    """Passes over its images per epoch (kohya's num_repeats; unset: 1), times N for N_name/ subfolders and
    times data.repeats (which multiplies every subset's)."""
    caption_extension: Optional[str] = None
    """The caption file of an image: its name with this extension (.txt, .caption, ...)."""
    class_tokens: Optional[str] = None
    """The caption of its images that have none (kohya's class_tokens, e.g. "sks dog")."""
    shuffle_caption: Optional[bool] = None
    """As data.shuffle_caption, for this subset."""
    keep_tokens: Optional[int] = None
    """As data.keep_tokens, for this subset."""
    tag_dropout: Optional[float] = None
    """As data.tag_dropout, for this subset."""


@dataclass
class DataConfig:
    source: str = choice("shapes", "shapes", "folder", "webdataset", "parquet", "arrow", "latents")
    """Where training images come from: built-in synthetic shapes, a folder of images + .txt captions (or
    captions.jsonl/csv, or diffusers' ImageFolder metadata.jsonl/csv), webdataset tar shards, parquet files, a
    Hugging Face `datasets` dataset saved with save_to_disk (or its .arrow files), or a latent cache made by
    `colodiffusion cache`."""
    path: Optional[str] = None
    """Dataset location: a folder; tar shards as a brace pattern (shards/{00000..00099}.tar), folder or
    fsspec URL (s3://...); parquet file(s) or folder; or the latent cache folder."""
    subsets: list[SubsetConfig] = field(default_factory=list)
    """folder only, instead of data.path: several folders, each with its own path, repeats and caption
    options (keys: path, repeats, caption_extension, class_tokens, shuffle_caption, keep_tokens, tag_dropout)."""
    dataset_config: Optional[str] = None
    """folder only, instead of data.path and data.subsets: a kohya sd-scripts dataset TOML ([general] and one
    [[datasets]] with its [[datasets.subsets]]: image_dir, num_repeats, caption_extension, class_tokens, ...)."""
    caption_extension: str = ".txt"
    """folder: the caption file beside an image is its name with this extension (kohya's caption_extension)."""
    resolution: int = 32
    """Square training resolution in pixels (latents are resolution / VAE factor): 32 for tiny, 512 for sd15, 768 for sd2."""
    num_samples: int = 20000
    """Size of one epoch of the synthetic shapes dataset."""
    num_workers: int = 0
    """DataLoader worker processes (0 reads in the training process)."""
    random_flip: bool = False
    """Random horizontal flips (image sources; seeded by seed, epoch and sample)."""
    crop: str = choice("center", "center", "random")
    """Crop after resizing the short side: center, or random (seeded by seed, epoch and sample)."""
    min_size: int = 0
    """Skip (and count) images whose shorter side is below this many pixels; 0 keeps all."""
    max_aspect: float = 0.0
    """Skip (and count) images with long/short side ratio above this; 0 keeps all."""
    max_punsafe: Optional[float] = None
    """Skip samples whose metadata punsafe (LAION NSFW score) is above this; null keeps all."""
    max_pwatermark: Optional[float] = None
    """Skip samples whose metadata pwatermark (LAION watermark score) is above this; null keeps all."""
    max_image_pixels: int = 89_478_485
    """Images with more pixels are decompression bombs: skipped as bad samples (Pillow's default limit)."""
    bucketing: bool = False
    """Aspect-ratio bucketing: each batch has one shape, about resolution^2 pixels, sides multiples of 64."""
    bucket_max_aspect: float = 2.0
    """Most elongated bucket (long/short side) when bucketing."""
    image_column: str = "image"
    """Parquet/arrow column with the encoded image bytes (or a {bytes, path} struct, as datasets' Image feature)."""
    caption_column: str = "caption"
    """Parquet/arrow column with the caption text (diffusers' scripts call it --caption_column; often "text")."""
    shuffle: str = choice("sample", "sample", "block")
    """Shuffle all samples (sample), or shards/row groups then samples within them (block: local reads)."""
    # 0.05: scraped web data (LAION/img2dataset) typically has a few percent of broken or expired files,
    # which are skipped; clearly more than 5% means a wrong path, format or a failing store.
    max_bad_fraction: float = 0.05
    """Stop the run when clearly more than this fraction of the distinct samples read are bad (they are
    skipped below it; judged with a 3-standard-deviation margin, first on a 64-sample probe before training)."""
    index_dir: Optional[str] = None
    """Where the webdataset tar index is cached; null: RUN_DIR/data_index."""
    val_fraction: float = 0.0
    """Hold out this fraction of the data (chosen by train.seed, at least one sample) for the validation loss,
    `eval` prompts and reference images; it is never trained on. 0: no held-out split (see data.val_path)."""
    val_path: Optional[str] = None
    """Validation data of the same data.source kept apart from data.path (instead of data.val_fraction)."""
    repeats: int = 1
    """Passes over each training sample per epoch (kohya's num_repeats); folder sources also read a leading
    count from subfolder names (10_sks dog/ repeats its images 10 times), multiplied by this."""
    shuffle_caption: bool = False
    """Shuffle the comma-separated tags of each caption every time it is read (kohya's shuffle_caption)."""
    keep_tokens: int = 0
    """Leading tags that stay first and are never dropped (e.g. 1 keeps a trigger word in front)."""
    tag_dropout: float = 0.0
    """Drop each tag (beyond data.keep_tokens) with this probability (kohya's caption_tag_dropout_rate)."""
    class_path: Optional[str] = None
    """Prior preservation (DreamBooth): a folder of class images with captions (or a kohya `N_class` subfolder
    name as caption), mixed in as many as there are training samples, their loss weighted by data.prior_loss_weight."""
    prior_loss_weight: float = 1.0
    """Weight of the class images' loss against the instance images' (1.0 as in DreamBooth)."""


@dataclass
class EMAConfig:
    enabled: bool = True
    """Keep an exponential moving average of the UNet weights (exported by default)."""
    decay: float = 0.999
    """EMA decay per optimizer step."""
    warmup: bool = True
    """Use decay min(decay, (1 + step) / (10 + step)) so early EMA tracks the fast-moving weights."""


@dataclass
class PromptSpec:
    """One sample prompt and its settings (after `SampleConfig.specs`, none is left None)."""
    prompt: str
    negative_prompt: Optional[str] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    seed: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None
    sampler: Optional[str] = None
    karras: Optional[bool] = None
    init_image: Optional[str] = None
    strength: Optional[float] = None


# kohya sd-scripts' inline prompt options (its sample prompt files), plus Karras sigmas and img2img.
PROMPT_OPTIONS = {"n": ("negative_prompt", str), "s": ("steps", int), "l": ("guidance", float), "d": ("seed", int),
                  "w": ("width", int), "h": ("height", int), "ss": ("sampler", str), "karras": ("karras", bool),
                  "i": ("init_image", str), "strength": ("strength", float)}


def parse_prompt(text: str) -> PromptSpec:
    """'a dog --n blurry --s 30' -> PromptSpec('a dog', negative_prompt='blurry', steps=30); one
    ConfigError sentence for an unknown option or a bad value."""
    head, *options = text.split(" --")
    spec = PromptSpec(head.strip())
    for option in options:
        name, _, value = option.strip().partition(" ")
        value = value.strip()
        if name not in PROMPT_OPTIONS:
            allowed = ", ".join("--" + k for k in PROMPT_OPTIONS)
            raise ConfigError(f"prompt '{text}' has an unknown option '--{name}'; the options are: {allowed}.")
        attr, kind = PROMPT_OPTIONS[name]
        if kind is bool:
            if value:
                raise ConfigError(f"prompt '{text}': --{name} takes no value (it was given '{value}').")
            setattr(spec, attr, True)
            continue
        try:
            setattr(spec, attr, kind(value))
        except ValueError:
            what = {int: "a whole number", float: "a number"}.get(kind, "a value")
            raise ConfigError(f"prompt '{text}': --{name} needs {what}, not '{value}'.") from None
    return spec


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """The prompts of a kohya-style prompt file: one per line, each with its own options
    ('a dog --n blurry --s 30'); blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"prompt file '{path}' does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"prompt file '{path}' cannot be read as UTF-8 text ({exc}).") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"prompt file '{path}' holds no prompt (one per line; # starts a comment).")
    return prompts


def multiples_of_8(v: int) -> str:
    """The nearest image sides the pipeline accepts, for a message: '24 or 32'."""
    below, above = v - v % 8, v - v % 8 + 8
    return f"{below} or {above}" if below >= 8 else str(above)


def check_prompt(spec: PromptSpec, where: str) -> None:
    """One sentence for a setting no sampler can use (`where` names the prompt or the flags)."""
    problem = _prompt_problem(spec)
    if problem:
        raise ConfigError(f"{where}: {problem}.")


def _prompt_problem(s: PromptSpec) -> Optional[str]:
    if s.steps is not None and s.steps < 1:
        return f"steps must be at least 1 (got {s.steps})"
    if s.sampler is not None and s.sampler not in SAMPLER_NAMES:
        return f"sampler '{s.sampler}' is not one of {', '.join(SAMPLER_NAMES)}"
    if s.karras and s.sampler not in KARRAS_SAMPLERS:
        return f"Karras sigmas need a k-sampler ({', '.join(KARRAS_SAMPLERS)}), not '{s.sampler}'"
    for side in ("width", "height"):
        v = getattr(s, side)
        if v is not None and (v < 8 or v % 8):
            return f"{side} {v} is not a multiple of 8; use {multiples_of_8(v)}"
    if s.strength is not None and not 0 < s.strength <= 1:
        return f"strength must be in (0, 1] (got {s.strength})"
    if s.strength is not None and s.init_image is None:
        return "strength needs an init image (--i PATH)"
    if s.init_image is not None and not Path(s.init_image).is_file():
        return f"init image '{s.init_image}' is not a file"
    return None


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=list)
    """Fixed prompts of the sample grid written during training; empty: four from the data (the shapes
    demo's "a red circle", "a blue square", ...; otherwise captions spread over the training data).
    Each may end in kohya-style options: --n NEGATIVE PROMPT, --s STEPS, --l GUIDANCE, --d SEED,
    --w WIDTH, --h HEIGHT, --ss SAMPLER, --karras, --i INIT_IMAGE (img2img), --strength 0-1,
    e.g. "a dog --n blurry --s 30 --d 7"."""
    negative_prompt: str = ""
    """Negative prompt of every sample (what guidance steers away from); a prompt's --n replaces it."""
    steps: int = 25
    """Denoising steps for samples and evaluation."""
    guidance: float = 4.0
    """Classifier-free guidance scale."""
    sampler: str = choice("ddim", *SAMPLER_NAMES)
    """Sampler (a diffusers scheduler)."""
    karras: bool = False
    """Karras sigmas (noise levels spaced as in Karras et al. 2022) for the k-samplers: dpm++ and euler."""
    seed: int = 0
    """Seed for the sample grid."""

    def specs(self, prompts: Optional[list[str]] = None) -> list[PromptSpec]:
        """Every prompt (of `prompts`, default `self.prompts`) with its own options, the rest from these
        defaults (prompt i gets seed + i)."""
        out = []
        for i, text in enumerate(self.prompts if prompts is None else prompts):
            spec = parse_prompt(text)
            for name, default in (("negative_prompt", self.negative_prompt), ("steps", self.steps),
                                  ("guidance", self.guidance), ("seed", self.seed + i), ("sampler", self.sampler),
                                  ("karras", self.karras)):
                if getattr(spec, name) is None:
                    setattr(spec, name, default)
            if spec.init_image and spec.strength is None:
                spec.strength = 0.75  # AUTOMATIC1111's default denoising strength
            out.append(spec)
        return out


@dataclass
class LoRAConfig:
    rank: int = 0
    """LoRA rank (through peft); 0 trains the full UNet. With LoRA only the adapters get gradients."""
    alpha: Optional[float] = None
    """LoRA alpha (the update is scaled by alpha / rank); None uses the rank."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet modules that get adapters (names as in diffusers' attention layers)."""
    text_encoder: bool = False
    """Also put adapters on the text encoder's attention projections (q_proj, k_proj, v_proj, out_proj)."""


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
    lr_schedule: str = choice("cosine", "constant", "cosine", "constant_with_warmup", "linear",
                              "cosine_with_restarts", "polynomial")
    """Learning-rate shape after the linear warmup. cosine and constant are ours (warmup counts from 1, so the
    first step already trains); the other names are diffusers.optimization.get_scheduler's (as --lr_scheduler)."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    lr_num_cycles: int = 1
    """cosine_with_restarts: number of hard restarts."""
    lr_power: float = 1.0
    """polynomial: power of the decay (1.0 is linear)."""
    optimizer: str = choice("adamw", "adamw", "lion", "adafactor", "prodigy")
    """adamw (torch), lion (lion-pytorch; about 3-10x smaller lr than AdamW), adafactor (transformers, at the fixed
    train.lr), prodigy (prodigyopt; adapts the step size: use train.lr=1.0). The last ones need
    `pip install 'colodiffusion[optim]'`; perf.optimizer=adamw8bit is AdamW with 8-bit states."""
    weight_decay: float = 1e-2
    """Decoupled weight decay of the optimizer."""
    adam_beta1: float = 0.9
    """beta1 of AdamW, Lion and Prodigy."""
    adam_beta2: float = 0.999
    """beta2 of AdamW, Lion and Prodigy (Lion's authors use 0.99)."""
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
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Low-rank adapters instead of full fine-tuning."""
    max_bad_steps: int = 10
    """Stop the run after this many consecutive steps with a non-finite loss or gradient (their updates are skipped); 0 never stops."""
    preempt_check_every: int = 10
    """In distributed runs, agree on a SIGTERM/SIGUSR1 stop every N steps (one tiny all-reduce); single-process runs check every step."""
    max_epochs: int = 0
    """Stop after this many passes over the data (the seed's max_epochs); train.max_steps still caps the
    run (the smaller wins, and the LR schedule spans it). 0: train.max_steps alone decides."""
    save_every_n_epochs: int = 0
    """Also write a model that inference tools load after every N-th epoch (kohya's option of the same
    name): RUN_DIR/models/epoch_NNNNNN.safetensors (see save_model_as), with the EMA weights when the
    EMA is on and any LoRA merged in. An epoch is the step count train.max_epochs uses. 0: never."""
    save_model_as: str = choice("safetensors", "safetensors", "ckpt", "diffusers")
    """Form of the save_every_n_epochs models: an LDM-layout single file (.safetensors or .ckpt, what
    SD UIs load) or a diffusers folder."""
    val_every: int = 100
    """Log the validation loss (fixed noise and timesteps: comparable across steps and runs) every N steps
    and at the end, when there is validation data (data.val_fraction or data.val_path); 0 disables."""
    val_samples: int = 256
    """At most this many held-out samples (spread over the validation data) are scored."""
    debug_nan_steps: list[int] = field(default_factory=list)
    """Test hook: make the loss of these steps (1-based) NaN, to exercise the numerical guard."""


@dataclass
class ParallelConfig:
    strategy: str = choice("single", "single", "ddp", "fsdp", "deepspeed", "colossalai")
    """How the model is distributed over processes: single (one process), ddp (replicated weights,
    all-reduced gradients), fsdp (FSDP2: weights, gradients and optimizer state sharded), deepspeed
    (DeepSpeed ZeRO), colossalai (Colossal-AI's Booster with `parallel.plugin`)."""
    zero: int = 3
    """fsdp: 3 frees the gathered weights after forward (ZeRO-3), 2 keeps them until backward (ZeRO-2).
    deepspeed: the ZeRO stage, 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters).
    colossalai low_level_zero: the stage, 1 or 2."""
    offload: str = choice("none", "none", "cpu")
    """fsdp: 'cpu' keeps sharded weights, gradients and optimizer state in host memory. deepspeed:
    'cpu' offloads the optimizer state and step (ZeRO-Offload); see offload_params for the weights.
    colossalai low_level_zero: 'cpu' offloads the optimizer state."""
    offload_params: bool = False
    """deepspeed ZeRO-3 only: also keep the parameter partitions in host memory (ZeRO-Infinity, CPU)."""
    deepspeed_config: Optional[str] = None
    """deepspeed: your own DeepSpeed JSON; its sections override the ones built from this config, but its
    batch sizes must agree with train.batch_size / grad_accum (or be "auto") and it may not set optimizer/scheduler."""
    plugin: str = choice("torch_ddp", "torch_ddp", "gemini", "low_level_zero")
    """colossalai: the Booster plugin: torch_ddp (CPU or GPU), gemini (chunked ZeRO-3 with placement
    policy) or low_level_zero (ZeRO-1/2); the last two need CUDA."""
    placement_policy: str = choice("static", "static", "cuda", "cpu", "auto")
    """colossalai gemini: where the chunks live. The seed's values: cuda (all on the GPU), cpu (parameters
    and optimizer state in host memory, moved to the GPU to compute) or auto (moved by measured memory);
    static sets the three fractions below yourself (cuda and cpu are static with 0 or 1 offloaded)."""
    shard_param_frac: float = 1.0
    """colossalai gemini static: fraction of parameters sharded (1.0 = ZeRO-3, 0.0 = ZeRO-2)."""
    offload_optim_frac: float = 0.0
    """colossalai gemini static: fraction of optimizer state kept in host memory."""
    offload_param_frac: float = 0.0
    """colossalai gemini static: fraction of parameters kept in host memory (useful with offload_optim_frac=1.0)."""
    dp_replicate: int = 1
    """fsdp only: replica groups for hybrid sharding (HSDP), e.g. the number of nodes; shards inside each."""
    tp: int = 1
    """Tensor-parallel degree over the UNet's attention and feed-forward layers (fsdp only)."""
    async_checkpoint: bool = False
    """ddp/fsdp: write sharded checkpoints in a background thread (published when the write completes)."""
    timeout_s: float = 1800.0
    """Seconds a collective (all-reduce, barrier, all-gather) waits for the other ranks before the run stops
    with an error naming the rank that stopped answering; the process group's timeout (torch's default for
    gloo; NCCL's own is 600). Raise it if one rank legitimately works alone for longer (e.g. the main rank
    training the tiny preset's first stage while the others wait)."""


@dataclass
class PerfConfig:
    """Speed and memory levers for the UNet training step (applied by `train/perf.py` and
    `train/optim.py`). The defaults are the plain eager path: a lever is on by default only after it
    measured faster on a GPU, and none has measured faster by itself (figures: bench/RESULTS.md).
    `colodiffusion bench --fast` and configs/sd15_gpu.yaml turn on the one measured-faster set
    (compile=full, param_dtype=bf16, channels_last, fuse_qkv: 1.43x the diffusers-default loop at
    batch 32 on an H100). `docs/performance.md` says what each lever buys."""
    compile: str = choice("none", "none", "full")
    """torch.compile the whole UNet (static shapes). H100, sd15, batch 32, with the other --fast levers:
    121.4 img/s (1.43x the diffusers-default loop), first step 120 s; without it 81.3 img/s (0.96x).
    (Compiling each down/mid/up block separately was dropped: it never finished warming up on the H100
    and ran 40% slower on the CPU: the SD blocks all differ in shape, so it compiled as much.)"""
    compile_mode: str = choice(
        "default", "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"
    )
    """torch.compile mode; reduce-overhead and max-autotune also capture CUDA graphs (unmeasured here)."""
    compile_cache: str = "auto"
    """Folder where Inductor/AOTAutograd/Triton keep compiled graphs across processes, so a second run
    skips the cold compile: auto = $TORCHINDUCTOR_CACHE_DIR if set, else the user's cache folder
    (~/.cache/colodiffusion/torch_compile); off (or none) = torch's own default; or a path."""
    conv_1x1_as_mm: bool = False
    """Inductor: lower 1x1 convolutions to matmuls (unmeasured; compile=full only)."""
    coordinate_descent_tuning: bool = False
    """Inductor: coordinate-descent tuning of the generated kernels' block sizes (unmeasured; longer compile)."""
    cudnn_benchmark: bool = True
    """CUDA: let cuDNN time its convolution algorithms at each new shape and keep the fastest (every GPU
    figure so far ran with it, as the anchor does), with TF32 for fp32 leftovers under bf16/fp16 autocast.
    Off: no autotuning workspaces in the warm-up's memory peak (the memory recipe)."""
    channels_last: bool = False
    """Keep UNet weights and activations in NHWC (channels-last) memory format. Part of the measured
    1.43x set under compile=full; in eager it is slower (CUDA GroupNorm copies NHWC to NCHW and back)."""
    sdpa_backend: str = choice("auto", "auto", "flash", "cudnn", "efficient", "math")
    """Attention kernel for scaled_dot_product_attention; auto lets PyTorch choose per call."""
    sdpa_by_head_dim: str = ""
    """Attention kernel per head dimension, overriding sdpa_backend for those, e.g. "40:cudnn,80:flash,160:flash"
    (SD 1.x attends with head dims 40/80/160; bench/sdpa_shapes.py times each kernel per shape)."""
    fuse_qkv: bool = False
    """One matmul for the q/k/v (self-attention) and k/v (cross-attention) projections; weights keep their names."""
    param_dtype: str = choice("fp32", "fp32", "bf16")
    """UNet parameters and gradients in this dtype; bf16 keeps fp32 master weights inside the optimizer
    (needs precision=bf16)."""
    fp8: bool = False
    """Train the UNet's nn.Linear layers in float8 (torchao; Hopper/Ada GPUs only; unmeasured)."""
    activation_checkpointing: str = choice("none", "none", "full", "attention", "resnets")
    """Recompute activations in backward: all blocks, only the transformer (attention) blocks, or only the
    resnets; model.gradient_checkpointing=true is the same as full."""
    optimizer: str = choice("adamw", "adamw", "adamw8bit")
    """AdamW with fp32 states, or 8-bit states (bitsandbytes on CUDA, else torchao)."""
    optimizer_offload: bool = False
    """Keep fp32 master weights and optimizer states (and the EMA) in CPU memory and run the optimizer
    step there (fused CPU AdamW, overlapped with the chunked transfers)."""


TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class LogConfig:
    report_to: str = "tensorboard"
    """Experiment trackers that get the metrics, GPU memory and sample grids (metrics.jsonl is always written):
    tensorboard, wandb, mlflow, several joined by commas, all, or none. wandb and mlflow need their extras;
    WANDB_MODE=offline and MLFLOW_TRACKING_URI work as usual (mlflow defaults to RUN_DIR/mlruns)."""
    project: str = "colodiffusion"
    """wandb project / mlflow experiment name (the seed's -p/--project; diffusers' --tracker_project_name)."""
    run_name: Optional[str] = None
    """Name of the run in the trackers; None: the run folder's name."""


@dataclass
class EvalConfig:
    """Image-quality metrics from local weights (nothing is downloaded): `colodiffusion eval` and, with
    eval.every, during training (on the held-out data)."""
    clip_model: Optional[str] = None
    """Local transformers CLIP folder (e.g. openai/clip-vit-large-patch14 saved with save_pretrained) for the CLIP score."""
    fid_model: Optional[str] = None
    """Local transformers image-encoder folder (CLIP, DINOv2, ViT, ...) whose pooled features FID compares
    (the Frechet distance of generated and held-out images in that feature space)."""
    every: int = 0
    """During training, every N steps and at the end: CLIP score / FID of eval.num_images images for held-out
    captions (needs validation data and eval.clip_model or eval.fid_model); 0 disables."""
    num_images: int = 64
    """Images generated for the CLIP score and FID (FID is biased upward for few images: compare like with like)."""


@dataclass
class TrainerConfig:
    """The seed's launcher knobs (its PyTorch Lightning Trainer arguments)."""
    accelerator: str = choice("auto", "auto", "gpu", "cpu")
    """gpu: require CUDA GPUs (one sentence if none is visible); cpu: require none (hide them with
    CUDA_VISIBLE_DEVICES=); auto: GPUs when present."""
    devices: int = 0
    """Processes the run expects (GPUs per node times nodes). `python main.py` launches itself under
    torchrun with this many when started as one process; `colodiffusion train` checks it against
    WORLD_SIZE. 0: as many as were launched."""


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
    perf: PerfConfig = field(default_factory=PerfConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    precision: str = choice("fp32", "fp32", "bf16", "fp16")
    """Compute precision: fp32, or bf16/fp16 autocast over fp32 weights (fp16 with a grad scaler).
    The seed's spellings are accepted: 16 (fp16), 32 (fp32), 16-mixed, bf16-mixed, 32-true."""


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
    "parallel.shard_param_frac": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "parallel.offload_optim_frac": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "parallel.offload_param_frac": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
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
        ours = SEED_OVERRIDES.get(key) or SEED_KEYS.get(key)
        if ours:  # a key of the seed's (or latent-diffusion's) configs: name ours
            return ConfigError(f"config key '{key}' in {where} is the seed's; use {ours} here.")
        parent = _node_at(key)
        allowed = _allowed_keys(parent) if parent is not None else _allowed_keys(Config())
        return ConfigError(f"unknown config key '{key}' in {where}; allowed keys here are: {allowed}.")
    if "Value '" in msg or "could not be converted" in msg or "Invalid type" in msg:
        return ConfigError(f"config key '{key}' in {where} has the wrong type ({msg}).")
    return ConfigError(f"config key '{key}' in {where} is invalid: {msg}")


# The seed's (PyTorch Lightning's) precision spellings.
PRECISION_ALIASES = {"16": "fp16", "16-mixed": "fp16", "32": "fp32", "32-true": "fp32", "bf16-mixed": "bf16"}


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
        raise ConfigError(f"give one of data.path, data.subsets and data.dataset_config, not {' and '.join('data.' + k for k in given)}.")
    if d.path and not Path(d.path).is_dir():
        raise ConfigError(f"config key 'data.path' points to '{d.path}', which is not a folder.")
    if not d.caption_extension.startswith("."):
        raise ConfigError(f"config key 'data.caption_extension' is '{d.caption_extension}'; it must start with a dot (.txt, .caption).")
    folder_subsets(d)  # a subset (or the TOML) that cannot work: one sentence now


# kohya sd-scripts' dataset TOML keys and ours (per subset, or in [general] for all of them).
KOHYA_SUBSET_KEYS = {"image_dir": "path", "num_repeats": "repeats", "caption_extension": "caption_extension",
                     "class_tokens": "class_tokens", "shuffle_caption": "shuffle_caption", "keep_tokens": "keep_tokens",
                     "caption_tag_dropout_rate": "tag_dropout"}
KOHYA_DATASET_KEYS = {"resolution": "data.resolution", "batch_size": "train.batch_size (the global batch)",
                      "enable_bucket": "data.bucketing", "flip_aug": "data.random_flip", "random_crop": "data.crop=random",
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
                raise ConfigError(f"{where}: '{key}' in {what} is set here with {KOHYA_DATASET_KEYS[key]}, not in the TOML.")
            if key not in KOHYA_SUBSET_KEYS:
                raise ConfigError(f"{where}: '{key}' in {what} is not read here; the keys are: {', '.join(KOHYA_SUBSET_KEYS)}.")
        return {KOHYA_SUBSET_KEYS[k]: v for k, v in table.items()}

    general = ours(doc.get("general", {}), "[general]")
    dataset = dict(datasets[0])
    subsets = dataset.pop("subsets", None)
    general.update(ours(dataset, "[[datasets]]"))
    if not isinstance(subsets, list) or not subsets:
        raise ConfigError(f"{where}: its [[datasets]] has no [[datasets.subsets]] (each with an image_dir).")
    return general, [SubsetConfig(**ours(t, f"[[datasets.subsets]] number {n + 1}")) for n, t in enumerate(subsets)]


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
                          "model.text_encoder and model.vae (and model.tokenizer if the text encoder's folder has none).")
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


def report_to(cfg: Config) -> list[str]:
    """log.report_to as a list of tracker names."""
    names = [n.strip() for n in str(cfg.log.report_to).split(",") if n.strip()]
    if names == ["all"]:
        return list(TRACKERS)
    return [] if names == ["none"] else names


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
        raise ConfigError("give data.val_path or data.val_fraction, not both: both say where validation data comes from.")
    if d.val_path and d.source == "shapes":
        raise ConfigError("data.val_path is for image sources; for shapes data use data.val_fraction.")
    if d.class_path and not Path(d.class_path).is_dir():
        raise ConfigError(f"config key 'data.class_path' points to '{d.class_path}', which is not a folder of class images.")
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
        raise ConfigError("parallel.zero=1 is for deepspeed/colossalai; fsdp shards at least the gradients: use 2 or 3.")
    if p.strategy == "colossalai" and p.plugin == "low_level_zero" and p.zero == 3:
        raise ConfigError("parallel.zero=3 is not a low_level_zero stage (1 or 2); use parallel.plugin=gemini for ZeRO-3.")
    if p.strategy in ("ddp", "deepspeed", "colossalai") and (p.tp != 1 or p.dp_replicate != 1):
        raise ConfigError(f"parallel.strategy={p.strategy} replicates or shards over all ranks: parallel.tp ({p.tp}) "
                          f"and parallel.dp_replicate ({p.dp_replicate}) must be 1 (use strategy=fsdp to combine them).")
    if p.strategy == "deepspeed":
        _check_deepspeed(cfg)
    if p.strategy == "colossalai":
        _check_colossalai(cfg)
    if p.strategy == "colossalai" and p.plugin == "gemini":
        _check_gemini(cfg)
    if p.deepspeed_config is not None:
        if p.strategy != "deepspeed":
            raise ConfigError(f"parallel.deepspeed_config is only read by parallel.strategy=deepspeed (strategy is {p.strategy}).")
        if not Path(p.deepspeed_config).is_file():
            raise ConfigError(f"config key 'parallel.deepspeed_config' points to '{p.deepspeed_config}', which is not a file.")


def _check_deepspeed(cfg: Config) -> None:
    p = cfg.parallel
    if p.async_checkpoint:
        raise ConfigError("parallel.async_checkpoint is for ddp/fsdp; deepspeed saves with its own save_checkpoint.")
    if p.offload_params and p.zero != 3:
        raise ConfigError(f"parallel.offload_params=true needs parallel.zero=3 (it is {p.zero}): only ZeRO-3 partitions parameters.")
    if cfg.perf.param_dtype != "fp32" or cfg.perf.optimizer_offload or cfg.perf.optimizer != "adamw":
        raise ConfigError("parallel.strategy=deepspeed keeps its own fp32 masters and offload: leave perf.param_dtype=fp32, "
                          "perf.optimizer=adamw and perf.optimizer_offload=false (use precision and parallel.offload).")


def _check_colossalai(cfg: Config) -> None:
    p = cfg.parallel
    if p.plugin == "gemini" and cfg.train.ema.enabled:
        raise ConfigError("parallel.plugin=gemini keeps the weights in chunks that the EMA cannot follow; "
                          "set train.ema.enabled=false, or use low_level_zero / deepspeed for an EMA.")
    if p.plugin != "low_level_zero" and p.offload != "none":
        raise ConfigError(f"parallel.offload is for low_level_zero; with {p.plugin} use the gemini fractions "
                          "(parallel.offload_optim_frac / offload_param_frac) or none.")
    if cfg.perf.param_dtype != "fp32" or cfg.perf.optimizer_offload:
        raise ConfigError("parallel.strategy=colossalai keeps its own precision and offload: leave perf.param_dtype=fp32 "
                          "and perf.optimizer_offload=false.")


GEMINI_FRACTIONS = {"shard_param_frac": 1.0, "offload_optim_frac": 0.0, "offload_param_frac": 0.0}


def _check_gemini(cfg: Config) -> None:
    p = cfg.parallel
    if cfg.precision not in ("fp16", "bf16"):
        raise ConfigError(f"parallel.plugin=gemini computes in fp16 or bf16 only (precision is {cfg.precision}); "
                          "set precision=16 (the seed's) or precision=bf16.")
    if cfg.perf.optimizer != "adamw" or cfg.train.optimizer != "adamw":
        raise ConfigError("parallel.plugin=gemini steps with Colossal-AI's HybridAdam: leave perf.optimizer=adamw "
                          "and train.optimizer=adamw.")
    changed = [k for k, default in GEMINI_FRACTIONS.items() if getattr(p, k) != default]
    if changed and p.placement_policy != "static":
        raise ConfigError(f"parallel.{changed[0]} is read only with parallel.placement_policy=static "
                          f"(it is {p.placement_policy}, which places the chunks itself); set one or the other.")


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _yaml_where(exc: Exception, path: Path) -> str:
    """' at line L, column C: what was wrong' from a YAML error (1-based, as editors count)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None:
        return f": {(str(exc).splitlines() or [''])[0]}"
    where = f" at line {mark.line + 1}, column {mark.column + 1}: {problem or 'syntax error'}"
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None:
        where += f" ({context} that starts at line {start.line + 1}, column {start.column + 1})"
    try:
        line = path.read_text(errors="replace").splitlines()[mark.line]
    except (OSError, IndexError):
        line = ""
    if "\t" in line[:mark.column + 1]:
        where += "; YAML cannot indent with tabs, use spaces"
    return where + "."


def refuse_interpolations(node: Any, where: str, prefix: str = "") -> None:
    """ConfigError for any `${...}` in a config's raw values: values are taken as written and never
    resolved, so an environment variable (a token) cannot be copied into config.yaml, sample prompts,
    tracker names or an exported model's metadata."""
    if isinstance(node, dict):
        for key, value in node.items():
            refuse_interpolations(value, where, f"{prefix}{key}.")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            refuse_interpolations(value, where, f"{prefix}{i}.")
    elif isinstance(node, str) and "${" in node:
        raise ConfigError(f"config key '{prefix.rstrip('.')}' in {where} is an interpolation ({node[:80]!r}); values are "
                          "taken as written and ${...} is never resolved, so that no environment variable or secret "
                          "lands in config.yaml, prompts or tracker names: write the value itself.")


def load_config(path: Optional[str | os.PathLike | list] = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file(s) at `path` (a list is merged left to right, as the seed's `-b a b`),
    then `key=value` overrides; validated."""
    schema = OmegaConf.structured(Config)
    merged = schema
    paths = [] if path is None else list(path) if isinstance(path, (list, tuple)) else [path]
    required: set[str] = set()  # keys a recipe marks '???' (and no later file sets): the user must give them
    for p in map(Path, paths):
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist.")
        try:
            data = OmegaConf.load(p)
        except Exception as exc:  # YAML syntax errors come in many types
            raise ConfigError(f"config file '{p}' is not valid YAML{_yaml_where(exc, p)}") from None
        _refuse_seed_layout(data, p)
        refuse_interpolations(OmegaConf.to_container(data, resolve=False), f"'{p}'")
        try:
            merged = OmegaConf.merge(merged, data)
        except OmegaConfBaseException as exc:
            raise _friendly(exc, f"'{p}'") from None
        missing = set(OmegaConf.missing_keys(data))  # (merge keeps a value over '???', so read them from the file)
        given = set(_flat_keys(OmegaConf.to_container(data, resolve=False))) if OmegaConf.is_dict(data) else set()
        required = (required - given) | missing
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=200).")
        key = item.split("=", 1)[0]
        if "${" in item.split("=", 1)[1]:
            refuse_interpolations({key: item.split("=", 1)[1]}, f"override '{key}=...'")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _friendly(exc, f"override '{item}'") from None
        except Exception as exc:
            raise ConfigError(f"override '{item}' for key '{key}' could not be parsed: {exc}.") from None
        required.discard(key)
    if required:
        keys = [k for k, _, _ in _walk(Config()) if k in required] or sorted(required)
        files = ", ".join(f"'{p}'" for p in paths)
        raise ConfigError(f"{' and '.join(keys)} must be given: {files} leave{'' if len(paths) > 1 else 's'} {'them' if len(keys) > 1 else 'it'} "
                          f"to you ('???', see the comment at its top); add {' '.join(k + '=...' for k in keys)} "
                          "to the command line.")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _friendly(exc, "the config") from None
    validate(cfg)
    return cfg


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
    "lightning.strategy": "parallel.strategy (and parallel.plugin, parallel.placement_policy for Colossal-AI)",
    "lightning.callbacks.image_logger": "train.sample_every",
    "lightning.modelcheckpoint": "train.checkpoint_every",
}


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
    raise ConfigError(f"config file '{path}' is in the seed's latent-diffusion layout (model.target, lightning:), which "
                      f"this schema does not read; write its keys as ours: {'; '.join(found) or 'see the table'} "
                      "(README: 'Coming from the seed project').")


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix.rstrip(".")]
    return [k for key, value in node.items() for k in _flat_keys(value, f"{prefix}{key}.")]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def field_docs() -> dict[str, str]:
    """{key path: docstring} for every leaf key, read from the attribute docstrings in this file."""
    classes: dict[str, dict[str, str]] = {}
    for node in ast.parse(Path(__file__).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef):
            pairs = zip(node.body, node.body[1:])
            classes[node.name] = {a.target.id: " ".join(b.value.value.split()) for a, b in pairs
                                  if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
                                  and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
                                  and isinstance(b.value.value, str)}
    docs: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                docs[prefix + f.name] = classes.get(type(node).__name__, {}).get(f.name, "")

    walk(Config(), "")
    return docs


def _show(value: Any) -> str:
    """A value as it would be written in a key=value override."""
    if isinstance(value, str) and value and value.strip() == value and not value[0] in "[{'\"":
        return value
    return json.dumps(value, default=dataclasses.asdict)  # (data.subsets holds SubsetConfig entries)


def describe(cfg: Config) -> str:
    """Every key with its value (and default, where they differ), its allowed values and its docstring."""
    docs = field_docs()
    defaults = {path: value for path, _, value in _walk(Config())}
    lines = []
    for path, f, value in _walk(cfg):
        line = f"{path} = {_show(value)}"
        if value != defaults[path]:
            line += f"  (default: {_show(defaults[path])})"
        allowed = [a for a in f.metadata.get("choices") or () if a is not None]
        if allowed:
            line += f"  [{' | '.join(allowed)}]"
        lines.append(line)
        lines.extend(textwrap.wrap(docs.get(path, ""), 100, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(lines)

