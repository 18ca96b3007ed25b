"""Single-file checkpoints in the original LDM layout (`.safetensors` or `.ckpt`): read and write.

Reading never runs code: `.safetensors` holds tensors only, and `.ckpt` goes through
`torch.load(weights_only=True)`; a pickle that needs anything else is refused. Our own exports
also carry, in the file's metadata, the exact diffusers configs and the tokenizer, so that models
whose shapes an LDM YAML cannot describe (the tiny preset) round-trip exactly. Files from
elsewhere are described by the original YAML (`model.original_config`) or by configs inferred
from their keys, and need a tokenizer folder (`model.tokenizer`).
"""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from colodiffusion.config import ConfigError, DiffusionConfig, ModelConfig, refuse_interpolations
from colodiffusion.diffusion import build_noise_scheduler
from colodiffusion.models import bounds, ldm_convert
from colodiffusion.models.components import Components, freeze
from colodiffusion.models.presets import get_preset
from colodiffusion.storage.files import loads_json, match_umask

META_KEY = "colodiffusion"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What a CLIP tokenizer's save_pretrained writes: the only names our metadata may carry.
TOKENIZER_FILES = frozenset({"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                             "special_tokens_map.json", "added_tokens.json"})
MAX_NESTING = 4  # levels of {"state_dict": ...} around the weights


def is_single_file(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).suffix in SINGLE_FILE_SUFFIXES


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """(state dict, our metadata or None); a pickle that would need code to load is refused."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), read_meta(path)
        except Exception as exc:  # SafetensorError, JSON errors in the header
            raise ConfigError(f"'{path}' is not a readable .safetensors file: {str(exc).splitlines()[0]}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"'{path}' needs more than tensors to unpickle (it could run code), so it is refused; convert it "
            "to .safetensors with a tool you trust, or re-save only its state_dict."
        ) from None
    except Exception as exc:
        raise ConfigError(f"'{path}' is not a readable checkpoint: {str(exc).splitlines()[0]}") from None
    meta = obj.get(META_KEY) if isinstance(obj, dict) else None
    for _ in range(MAX_NESTING):  # {"state_dict": {"state_dict": ...}}; a pickle can make it contain itself
        if not (isinstance(obj, dict) and "state_dict" in obj):
            break
        obj = obj["state_dict"]
    else:
        raise ConfigError(f"'{path}' nests 'state_dict' more than {MAX_NESTING} levels deep; it is not a checkpoint "
                          "this loader reads.")
    if not isinstance(obj, dict):
        raise ConfigError(f"'{path}' does not hold a state dict.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, _parse_meta(path, meta)


def _parse_meta(path: Path, meta) -> Optional[dict]:
    if not meta:
        return None
    try:
        out = loads_json(meta)
    except (TypeError, ValueError):
        raise ConfigError(f"'{path}' carries unreadable '{META_KEY}' metadata (not JSON).") from None
    if not isinstance(out, dict):
        raise ConfigError(f"'{path}' carries '{META_KEY}' metadata that is not a JSON object.")
    return out


def read_meta(path: str | Path) -> Optional[dict]:
    """Our metadata only (for `.safetensors` without reading the tensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = (f.metadata() or {}).get(META_KEY)
        except Exception as exc:  # SafetensorError
            raise ConfigError(f"'{path}' is not a readable .safetensors file: {str(exc).splitlines()[0]}") from None
        return _parse_meta(path, meta)
    return read_checkpoint(path)[1]


def _tokenizer(meta: Optional[dict], m: ModelConfig, path: Path) -> CLIPTokenizer:
    if meta and "tokenizer" in meta:
        files = meta["tokenizer"]
        bad = ([repr(n) for n, t in files.items() if n not in TOKENIZER_FILES or not isinstance(t, str)]
               if isinstance(files, dict) else ["(not a name -> text mapping)"])
        if bad:  # names come from the file: never let them pick a path
            raise ConfigError(f"'{path}' carries tokenizer metadata with a file {bad[0]} that is not one of "
                              f"{', '.join(sorted(TOKENIZER_FILES))}; the file is refused.")
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                (Path(tmp) / name).write_text(text)
            return CLIPTokenizer.from_pretrained(tmp)
    if not m.tokenizer:
        raise ConfigError(
            f"'{path}' carries no tokenizer: set model.tokenizer to a local CLIP tokenizer folder "
            "(e.g. the tokenizer/ folder of a diffusers Stable Diffusion model)."
        )
    root = Path(m.tokenizer)
    root = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    bounds.check_folder(root, "tokenizer")
    return CLIPTokenizer.from_pretrained(root)


# Elements a model may hold beyond the weights the file carries (non-persistent buffers such as
# CLIP's position ids); anything larger comes from a config the file's weights do not back.
MAX_UNBACKED = 1 << 24


def _load(build: Callable[[], torch.nn.Module], config: dict, sd: dict, what: str, path: Path) -> torch.nn.Module:
    """Build from a config the file carries only once the file's own weights back it: the layer counts
    first (a cheap bound, so the shapeless build below stays small), then every weight's name and size
    on the meta device, where nothing is allocated. A crafted config cannot make us allocate more
    than the file holds, nor spin building millions of layers."""
    bounds.check_layers(config, len(sd), what, path)
    try:
        with torch.device("meta"):
            shape = build()
    except Exception as exc:  # a config diffusers/transformers cannot build
        raise ConfigError(
            f"'{path}' carries a {what} config that cannot be built: {str(exc).splitlines()[0]}"
        ) from None
    own = shape.state_dict()
    missing = sorted(set(own) - set(sd))
    wrong = [k for k in own if k in sd and own[k].numel() != sd[k].numel()]
    if missing or wrong:
        key = (missing or wrong)[0]
        raise ConfigError(
            f"'{path}' does not fit the {what} its config describes ({len(missing)} missing, {len(wrong)} misshaped "
            f"weights, e.g. '{key}'); pass the original YAML as model.original_config."
        )
    unbacked = sum(b.numel() for name, b in shape.named_buffers() if name not in own)
    if unbacked > MAX_UNBACKED:
        raise ConfigError(f"'{path}' describes a {what} with {unbacked} elements its weights do not back; "
                          "its config is not this file's.")
    module = build()
    module.load_state_dict({k: sd[k].reshape(own[k].shape).float() for k in own})
    return module


def load_single_file(path: str | Path, m: ModelConfig, d: DiffusionConfig):
    """Components from a single-file checkpoint (`m`: model.*, `d`: diffusion.*, the noise schedule);
    raises ConfigError with one sentence on a bad file."""
    path = Path(path)
    conv, meta = convert_file(path, m)
    unet = _load(lambda: UNet2DConditionModel.from_config(conv.unet_config), conv.unet_config, conv.unet, "UNet", path)
    if m.vae:
        bounds.check_folder(Path(m.vae), "VAE")
    vae = (AutoencoderKL.from_pretrained(m.vae) if m.vae
           else _load(lambda: AutoencoderKL.from_config(conv.vae_config), conv.vae_config, conv.vae, "VAE", path))
    text_encoder = _load(lambda: CLIPTextModel(CLIPTextConfig(**conv.text_config)), conv.text_config, conv.text,
                         "text encoder", path)
    tokenizer = _tokenizer(meta, m, path)
    guessed = get_preset("sd2" if ldm_convert.is_openclip(conv.text_config) else "sd15").prediction_type
    prediction_type = m.prediction_type or conv.prediction_type or guessed
    return Components(tokenizer, freeze(text_encoder), freeze(vae), unet, build_noise_scheduler(d, prediction_type))


def convert_file(path: str | Path, m: ModelConfig) -> tuple[ldm_convert.Converted, Optional[dict]]:
    """The file's weights as diffusers state dicts (and our metadata, if it is our export); every key
    must be converted or a known buffer."""
    path = Path(path)
    sd, meta = read_checkpoint(path)
    original = None
    if m.original_config:
        from omegaconf import OmegaConf

        original = OmegaConf.to_container(OmegaConf.load(m.original_config), resolve=False)
        refuse_interpolations(original, f"model.original_config '{m.original_config}'")
    if meta is not None:
        bad = [k for k in ("unet", "vae", "text_encoder") if not isinstance(meta.get(k), dict)]
        if bad:
            raise ConfigError(f"'{path}' carries '{META_KEY}' metadata without a {bad[0]} config object.")
    if not any(k.startswith(ldm_convert.UNET) for k in sd):
        raise ConfigError(f"'{path}' is not a Stable Diffusion checkpoint in the LDM layout (no "
                          "model.diffusion_model.* keys).")
    try:
        conv = ldm_convert.from_ldm(sd, original=original, configs=meta, use_ema=m.pretrained_ema)
    except (KeyError, ValueError, StopIteration) as exc:
        raise ConfigError(f"cannot read '{path}' as an SD 1.x/2.x checkpoint: {exc}.") from None
    if conv.unused:
        raise ConfigError(
            f"'{path}' has {len(conv.unused)} keys this loader does not understand (e.g. '{conv.unused[0]}'); "
            "only SD 1.x/2.x checkpoints in the LDM layout are supported."
        )
    return conv, meta


def save_single_file(out: str | Path, unet, vae, text_encoder, tokenizer, noise_scheduler,
                     ema_unet: Optional[dict] = None, dtype: str = "fp32",
                     metadata: Optional[dict[str, str]] = None) -> Path:
    """Write the LDM-layout file (`.safetensors`, or a `{"state_dict": ...}` pickle for `.ckpt`);
    `metadata` (e.g. kohya's ss_* training keys) goes into a .safetensors header beside ours."""
    out = Path(out)
    sd = ldm_convert.to_ldm(unet.state_dict(), vae.state_dict(), text_encoder.state_dict(), dict(unet.config),
                            dict(vae.config), text_encoder.config.to_dict(), ema=ema_unet)
    sd = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in sd.items()}
    meta = json.dumps({"unet": _plain(unet.config), "vae": _plain(vae.config),
                       "text_encoder": text_encoder.config.to_dict(), "scheduler": _plain(noise_scheduler.config),
                       "tokenizer": _tokenizer_files(tokenizer)}, default=str)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        save_file(sd, str(out), metadata={**(metadata or {}), META_KEY: meta, "format": "pt"})
    else:
        torch.save({"state_dict": sd, META_KEY: meta}, out)
    match_umask([out])
    return out


def _plain(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def _tokenizer_files(tokenizer: CLIPTokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file() and p.name in TOKENIZER_FILES}
