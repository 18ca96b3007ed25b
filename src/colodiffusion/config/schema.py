"""The typed config schema: one dataclass per part, a docstring per key (what `config --all` prints).

A YAML recipe only holds what differs from these defaults. String choices are declared with `choice`
and checked, with the ranges and cross-key rules, in `validation.py`; `loading.py` reads YAML files
and `key=value` overrides into a `Config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from colodiffusion.config.prompts import SAMPLER_NAMES, PromptSpec, parse_prompt


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
    openai/clip-vit-large-patch14 as the seed's cond_stage_config (for model.init=scratch); None takes
    model.pretrained's."""
    init: str = choice("pretrained", "pretrained", "scratch")
    """pretrained: the UNet starts from model.pretrained's weights; scratch: a freshly initialised UNet of
    model.preset (training from scratch) with the frozen tokenizer, text encoder and VAE still taken from
    model.pretrained (or model.tokenizer / model.text_encoder / model.vae)."""
    revision: Optional[str] = None
    """Hub ids only: the branch, tag or commit of model.pretrained (and of model.vae / tokenizer / text_encoder) to
    load."""
    variant: Optional[str] = None
    """Weights variant to load from diffusers folders and Hub ids, e.g. fp16
    (diffusion_pytorch_model.fp16.safetensors)."""
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
    steps: int = 400
    """Optimizer steps for training the KL autoencoder when no VAE weights are given. 400 on the shapes data
    (bench/NOTES.md): at 300 the result hung on float rounding (seed 0 at one thread: reconstruction MSE 0.026,
    the judge read 6.5% of its reconstructions in the wrong colour); at 400 MSE 0.005-0.008 at seeds 0-2 and
    1 or 2 threads, every reconstruction judged right."""
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
    """Min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 is the paper's value, it converges faster); null trains
    with plain MSE."""
    high_noise_weight: float = 0.0
    """Added to every step's weight on the error of the implied clean image x0, on top of min(SNR, gamma), so
    the noisiest steps (otherwise ~SNR) count; 1.0 is v-prediction's plain weight (SNR + 1). Why 0: docs/defaults.md."""
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
    """Square training resolution in pixels (latents are resolution / VAE factor): 32 for tiny, 512 for sd15, 768 for
    sd2."""
    num_samples: int = 20000
    """Size of one epoch of the synthetic shapes dataset."""
    cache_latents: Optional[bool] = None
    """shapes: encode each training image with the frozen autoencoder once, before the UNet trains, and keep its
    posterior (mean, log-variance) in memory (kohya's cache_latents); each step samples the latents from it with
    the run's own generator, as encoding would. null: on when the run reads each image more than once
    (train.max_steps x train.batch_size > data.num_samples). Image data: `colodiffusion cache` to disk."""
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
    max_steps: int = 3000
    """Optimizer steps to train for (3,000: what the default tiny run needs to draw every shape, docs/defaults.md)."""
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
    """Stop the run after this many consecutive steps with a non-finite loss or gradient (their updates are skipped);
    0 never stops."""
    preempt_check_every: int = 10
    """In distributed runs, agree on a SIGTERM/SIGUSR1 stop every N steps (one tiny all-reduce); single-process runs
    check every step."""
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
class DeepSpeedOptions:
    """parallel.strategy=deepspeed only; its ZeRO stage is parallel.zero and its optimizer offload parallel.offload."""
    offload_params: bool = False
    """ZeRO-3 only: also keep the parameter partitions in host memory (ZeRO-Infinity, CPU)."""
    config: Optional[str] = None
    """Your own DeepSpeed JSON; its sections override the ones built from this config, but its batch sizes must
    agree with train.batch_size / grad_accum (or be "auto") and it may not set optimizer/scheduler."""


@dataclass
class ColossalAIOptions:
    """parallel.strategy=colossalai only; low_level_zero's stage is parallel.zero and its offload parallel.offload."""
    plugin: str = choice("torch_ddp", "torch_ddp", "gemini", "low_level_zero")
    """The Booster plugin: torch_ddp (CPU or GPU), gemini (chunked ZeRO-3 with placement policy) or
    low_level_zero (ZeRO-1/2); the last two need CUDA."""
    placement_policy: str = choice("static", "static", "cuda", "cpu", "auto")
    """gemini: where the chunks live. The seed's values: cuda (all on the GPU), cpu (parameters and optimizer
    state in host memory, moved to the GPU to compute) or auto (moved by measured memory); static sets the
    three fractions below yourself (cuda and cpu are static with 0 or 1 offloaded)."""
    shard_param_frac: float = 1.0
    """gemini static: fraction of parameters sharded (1.0 = ZeRO-3, 0.0 = ZeRO-2)."""
    offload_optim_frac: float = 0.0
    """gemini static: fraction of optimizer state kept in host memory."""
    offload_param_frac: float = 0.0
    """gemini static: fraction of parameters kept in host memory (useful with offload_optim_frac=1.0)."""


@dataclass
class ParallelConfig:
    """How the run is spread over processes. The keys here are read by every strategy that has the notion;
    an engine's own options are under parallel.deepspeed and parallel.colossalai."""
    strategy: str = choice("single", "single", "ddp", "fsdp", "deepspeed", "colossalai")
    """How the model is distributed over processes: single (one process), ddp (replicated weights,
    all-reduced gradients), fsdp (FSDP2: weights, gradients and optimizer state sharded), deepspeed
    (DeepSpeed ZeRO), colossalai (Colossal-AI's Booster with `parallel.colossalai.plugin`)."""
    zero: int = 3
    """What is sharded (the ZeRO stage): fsdp: 3 frees the gathered weights after forward, 2 keeps them until
    backward. deepspeed: 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters). colossalai
    low_level_zero: 1 or 2."""
    offload: str = choice("none", "none", "cpu")
    """What lives in host memory: fsdp: 'cpu' keeps sharded weights, gradients and optimizer state there.
    deepspeed: 'cpu' offloads the optimizer state and step (ZeRO-Offload); see deepspeed.offload_params for the
    weights. colossalai low_level_zero: 'cpu' offloads the optimizer state (gemini: its fractions)."""
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
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    """DeepSpeed's own options (read with strategy=deepspeed only)."""
    colossalai: ColossalAIOptions = field(default_factory=ColossalAIOptions)
    """Colossal-AI's own options (read with strategy=colossalai only)."""


@dataclass
class PerfConfig:
    """Speed and memory levers for the UNet training step (applied by `train/perf.py`,
    `parallel/parallelize.py` and `train/optim.py`).
    The defaults are the plain eager path; `colodiffusion bench --fast` and configs/sd15_gpu.yaml turn on
    the measured-faster set. What each lever buys, with the figures: docs/performance.md."""
    compile: str = choice("none", "none", "full")
    """torch.compile the whole UNet (static shapes); its figures: docs/performance.md."""
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
    """CUDA: let cuDNN time its convolution algorithms at each new shape and keep the fastest, with TF32 for
    fp32 leftovers under bf16/fp16 autocast; off keeps autotuning workspaces out of the memory peak."""
    channels_last: bool = False
    """Keep UNet weights and activations in NHWC (channels-last) memory format (faster under compile=full only)."""
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
    """Local transformers CLIP folder (e.g. openai/clip-vit-large-patch14 saved with save_pretrained) for the CLIP
    score."""
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



def report_to(cfg: Config) -> list[str]:
    """log.report_to as a list of tracker names."""
    names = [n.strip() for n in str(cfg.log.report_to).split(",") if n.strip()]
    if names == ["all"]:
        return list(TRACKERS)
    return [] if names == ["none"] else names



def _walk(obj: Any, prefix: str = ""):
    """Yield (key path, dataclass field, value) for every leaf field."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _walk(value, path + ".")
        else:
            yield path, f, value
