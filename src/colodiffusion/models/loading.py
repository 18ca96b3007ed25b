"""Loading models from files: a local diffusers folder, a single-file LDM checkpoint, or a training
checkpoint / run folder of ours, rebuilt exactly as training built it.

`build_components` is what training and export call: `model.pretrained` when it is set (a Hub id is
first resolved to its cache folder by `models/hub.py`), a fresh UNet over frozen parts from files with
`model.init=scratch`, otherwise the preset's fresh modules (whose frozen parts are reused from a run's
components/ folder).
A training checkpoint holds only the trained weights (`unet.safetensors`, `ema.safetensors`); the
frozen parts come from the run's config (`model.pretrained`, or RUN_DIR/components/ for models
built from a preset), and LoRA adapters or a trained text encoder are rebuilt before its weights
are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from colodiffusion.config import Config, ConfigError, DiffusionConfig, ModelConfig, is_hub_id, load_config
from colodiffusion.diffusion import build_noise_scheduler
from colodiffusion.models import bounds, hub, lora
from colodiffusion.models.components import Components, build_fresh_components, freeze
from colodiffusion.models.presets import build_unet, get_preset
from colodiffusion.models.sdxl import SDXL_PARTS, is_sdxl_folder
from colodiffusion.models.single_file import is_single_file, load_single_file, read_meta
from colodiffusion.models.trainable import build_trainable, split
from colodiffusion.storage import checkpoint, consolidated


def build_components(
    cfg: Config,
    components_dir: Path,
    captions: Callable[[], Iterable[str]],
    train_vae: Callable[[AutoencoderKL], AutoencoderKL],
) -> Components:
    """`model.pretrained` if set, else fresh modules from the preset (frozen parts reused from
    `components_dir` when saved there; see `build_fresh_components`)."""
    m = cfg.model
    if m.init == "scratch" and (m.pretrained or m.text_encoder):
        return build_scratch(m, cfg.diffusion, cfg.train.seed)
    if m.pretrained:
        return load_pretrained(m.pretrained, m, cfg.diffusion)
    return build_fresh_components(cfg, components_dir, captions, train_vae)


def _has(folder: Path, sub: str) -> bool:
    return (folder / sub).is_dir()


def load_pretrained(path: str | Path, m: ModelConfig, d: DiffusionConfig) -> Components:
    """Load a diffusers-format folder (unet/, vae/, text_encoder/, tokenizer/[, scheduler/]) or Hub id, or a
    single-file LDM checkpoint (`models/single_file.py`); `m`: model.*, `d`: diffusion.* (the noise schedule)."""
    root = hub.resolve(str(path), "model.pretrained", m.revision, m.variant)
    if root.is_file():
        if m.tokenizer and is_hub_id(m.tokenizer):  # single_file.py reads a local tokenizer folder
            m = replace(m, tokenizer=str(hub.resolve(m.tokenizer, "model.tokenizer", m.revision)))
        return load_single_file(root, m, d)
    bounds.check_model_folder(root)
    if is_sdxl_folder(root) and m.preset != "sdxl":  # (a local folder is checked at config load; a Hub id here)
        raise ConfigError(f"model.pretrained '{path}' is an SDXL folder (it has text_encoder_2/): set "
                          "model.preset=sdxl.")
    if m.preset == "sdxl":
        return load_sdxl(root, m, d)
    missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer") if not _has(root, s)]
    if missing:
        raise ConfigError(
            f"model.pretrained '{path}' is not a diffusers model folder: it lacks {', '.join(missing)}/."
        )
    unet = _pretrained(UNet2DConditionModel, root / "unet", m.variant, "UNet")
    tokenizer, text_encoder, vae = frozen_parts(m, root)
    return Components(tokenizer, text_encoder, vae, unet, build_noise_scheduler(d, _prediction_type(m, root)))


def load_sdxl(root: Path, m: ModelConfig, d: DiffusionConfig) -> Components:
    """A diffusers SDXL folder: the UNet (trained) and both tokenizers and text encoders and the VAE
    (frozen; model.vae may replace the VAE, e.g. an fp16-safe one)."""
    missing = [s for s in SDXL_PARTS if not _has(root, s) and not (s == "vae" and m.vae)]
    if missing:
        raise ConfigError(f"model.pretrained '{m.pretrained or root}' is not a diffusers SDXL folder: it lacks "
                          f"{', '.join(missing)}/.")
    v = m.variant
    unet = _pretrained(UNet2DConditionModel, root / "unet", v, "UNet")
    encoders = [_pretrained(cls, root / sub, v, "text encoder")
                for cls, sub in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))]
    vae_root = hub.resolve(m.vae, "model.vae", m.revision, v) or root
    vae_dir = _part(vae_root, "vae", "config.json", "model.vae")
    vae = _pretrained(AutoencoderKL, vae_dir, v, "VAE")
    tokenizers = [_tokenizer(root / sub) for sub in ("tokenizer", "tokenizer_2")]
    return Components(tokenizers[0], freeze(encoders[0]), freeze(vae), unet,
                      build_noise_scheduler(d, _prediction_type(m, root)), tokenizers[1], freeze(encoders[1]))


def build_scratch(m: ModelConfig, d: DiffusionConfig, seed: int) -> Components:
    """model.init=scratch: a freshly initialised UNet of the preset (seeded by `seed`, train.seed) with the frozen
    tokenizer, text encoder and VAE from model.pretrained (or their own keys), as the original project trains SD."""
    root = hub.resolve(m.pretrained, "model.pretrained", m.revision, m.variant)
    tokenizer, text_encoder, vae = frozen_parts(m, root)
    preset = get_preset(m.preset)
    width = text_encoder.config.hidden_size
    if preset.unet["cross_attention_dim"] != width:
        raise ConfigError(f"model.preset={m.preset} cross-attends to {preset.unet['cross_attention_dim']}-d text "
                          f"features, but the text encoder gives {width}-d ones: pick the preset of that text encoder.")
    torch.manual_seed(seed)
    unet = build_unet(preset)
    return Components(tokenizer, text_encoder, vae, unet, build_noise_scheduler(d, _prediction_type(m, root)))


def frozen_parts(m: ModelConfig, root: Optional[Path]) -> tuple:
    """(tokenizer, text encoder, VAE), each from its own key when set, else from the folder `root`."""
    te_root = hub.resolve(m.text_encoder, "model.text_encoder", m.revision, m.variant) or root
    tok_root = hub.resolve(m.tokenizer, "model.tokenizer", m.revision) or (
        root if root and _has(root, "tokenizer") else te_root
    )
    vae_root = hub.resolve(m.vae, "model.vae", m.revision, m.variant) or root
    if vae_root is None:
        raise ConfigError("model.init=scratch needs a VAE: set model.vae (or model.pretrained with vae/).")
    tokenizer = _tokenizer(_part(tok_root, "tokenizer", "tokenizer_config.json", "model.tokenizer"))
    te_dir = _part(te_root, "text_encoder", "config.json", "model.text_encoder")
    text_encoder = _pretrained(CLIPTextModel, te_dir, m.variant, "text encoder")
    vae_dir = _part(vae_root, "vae", "config.json", "model.vae")
    vae = _pretrained(AutoencoderKL, vae_dir, m.variant, "VAE")
    return tokenizer, freeze(text_encoder), freeze(vae)


def _pretrained(cls, folder: Path, variant: Optional[str], what: str):
    """`cls.from_pretrained(folder)` once the folder's config is bounded by its weights (models/bounds.py)."""
    bounds.check_folder(folder, what)
    return cls.from_pretrained(folder, variant=_variant(folder, variant))


def _tokenizer(folder: Path) -> CLIPTokenizer:
    bounds.check_folder(folder, "tokenizer")
    return CLIPTokenizer.from_pretrained(folder)


def _variant(folder: Path, variant: Optional[str]) -> Optional[str]:
    """model.variant where `folder` has it; its plain weights otherwise (as diffusers' pipelines fall back)."""
    return variant if hub.has_variant(folder, variant) else None


def _part(folder: Path, sub: str, marker: str, key: str) -> Path:
    """`folder/sub` of a diffusers folder, or `folder` itself when it is that part's own folder."""
    for candidate in (folder / sub, folder):
        if (candidate / marker).is_file():
            return candidate
    raise ConfigError(f"'{folder}' (from {key} or model.pretrained) has no {sub}: neither {sub}/{marker} nor {marker}.")


def _prediction_type(m: ModelConfig, root: Optional[Path]) -> str:
    """model.prediction_type, else the folder's scheduler's, else the preset's."""
    prediction_type = m.prediction_type
    if prediction_type is None and root is not None and _has(root, "scheduler"):
        bounds.check_folder(root / "scheduler", "scheduler")
        prediction_type = DDPMScheduler.load_config(root, subfolder="scheduler").get("prediction_type")
    return prediction_type or get_preset(m.preset).prediction_type


@dataclass
class Model:
    """A trained model, ready to use or write: UNet and text encoder may still carry LoRA adapters."""
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    tokenizer_2: object = None  # SDXL's second tokenizer and text encoder (frozen)
    text_encoder_2: Optional[torch.nn.Module] = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def has_lora(self) -> bool:
        return lora.has_lora(self.unet) or lora.has_lora(self.text_encoder)


def _refuse_training(*_args):
    raise ConfigError("the run folder lacks a complete components/ (its frozen parts, sealed), so its checkpoints "
                      "cannot be loaded.")


def load_checkpoint_model(ckpt: Path, ema: Optional[bool]) -> Model:
    """Rebuild the run's model from its config.yaml and load a verified checkpoint's (or its EMA)
    weights, whichever backend wrote it (storage/consolidated.py). `ema=None`: the EMA when there is one."""
    run_dir = ckpt.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"checkpoint '{ckpt}' is not inside a run folder (no {run_dir / 'config.yaml'}).")
    bounds.check_links(run_dir)  # a received run folder is read only inside itself
    cfg = load_config(run_dir / "config.yaml")
    comps = build_components(cfg, run_dir / "components", captions=_refuse_training, train_vae=_refuse_training)
    trainable = build_trainable(cfg.model, cfg.train.lora, comps)
    try:
        trainable.load_state_dict(consolidated.read_model(ckpt))
    except RuntimeError as exc:  # missing or misshaped keys: the run's config.yaml no longer fits
        raise ConfigError(f"checkpoint '{ckpt}' does not fit the model its run's config.yaml builds "
                          f"({str(exc).splitlines()[0]}).") from None
    if ema is not False:
        shadow = consolidated.read_ema(ckpt, {n: p.shape for n, p in trainable.named_parameters()})
        if shadow is None and ema:
            raise ConfigError(f"checkpoint '{ckpt}' has no EMA weights (train.ema.enabled was false); drop --ema.")
        with torch.no_grad():
            for name, p in trainable.named_parameters():
                if shadow is not None and name in shadow:
                    p.copy_(shadow[name])
    unet, text_encoder = split(trainable, comps)
    return Model(comps.tokenizer, text_encoder.eval(), comps.vae, unet.eval(), comps.noise_scheduler,
                 comps.tokenizer_2, comps.text_encoder_2)


def is_checkpoint(src: Path) -> bool:
    return (src / checkpoint.MANIFEST).exists() or (src / "state.pt").exists()


def load_model(source: str | Path, ema: Optional[bool] = False, original_config: Optional[str] = None,
               tokenizer: Optional[str] = None) -> Model:
    """Any supported source: single file, diffusers folder, checkpoint folder (any backend's), or run
    folder (its newest intact checkpoint). `ema=None`: a checkpoint's EMA when it has one."""
    src = Path(source)
    if not src.exists():
        raise ConfigError(f"'{src}' does not exist.")
    if is_single_file(src) or (src / "model_index.json").exists():
        cfg = Config()
        cfg.model.pretrained, cfg.model.pretrained_ema = str(src), bool(ema)
        cfg.model.original_config, cfg.model.tokenizer = original_config, tokenizer
        if ema and not is_single_file(src):
            raise ConfigError(f"'{src}' is a diffusers folder and holds one set of weights; drop --ema.")
        if is_sdxl_folder(src):
            cfg.model.preset = "sdxl"
        c = load_pretrained(src, cfg.model, cfg.diffusion)
        return Model(c.tokenizer, c.text_encoder, c.vae, c.unet.eval(), own_scheduler(src) or c.noise_scheduler,
                     c.tokenizer_2, c.text_encoder_2)
    if is_checkpoint(src):  # the manifest first: a damaged or unsealed checkpoint is refused unread
        return load_checkpoint_model(checkpoint.resolve(src), ema)
    latest = checkpoint.find_latest(src / "checkpoints")
    if latest is not None:
        return load_checkpoint_model(latest, ema)
    if (src / "final" / "model_index.json").exists():
        bounds.check_links(src)  # a received run folder is read only inside itself (final/ too)
        return load_model(src / "final", ema, original_config, tokenizer)
    raise ConfigError(f"'{src}' is not a run folder, checkpoint folder, diffusers folder or single-file checkpoint.")


def own_scheduler(src: Path):
    """The source's own noise schedule (betas, prediction type), kept as is by an export."""
    if (src / "scheduler").is_dir():
        bounds.check_folder(src / "scheduler", "scheduler")
        return DDPMScheduler.from_pretrained(src, subfolder="scheduler")
    if is_single_file(src):
        meta = read_meta(src)
        if meta and isinstance(meta.get("scheduler"), dict):
            bounds.check_schedule(meta["scheduler"], src)
            return DDPMScheduler.from_config(meta["scheduler"])
    return None
