"""What a model folder may make us do: a model is data, and every reader of one (train, export,
sample, eval, txt2img) passes `check_model_folder` (a whole diffusers folder) or `check_folder` (one
part's folder) before a library reads it:

- **no link leads out**: every file resolves inside the folder (a Hub cache snapshot: inside its
  repository's folder, where its files link to `blobs/`);
- **no code**: `model_index.json` may name classes of diffusers and transformers only, never a module
  of its own (diffusers would import a `.py` file the folder ships, or any importable module);
- **bounded sizes**: the config beside the weights (a diffusers folder's config.json, our single-file
  exports' metadata) is part of that data. Every layer carries weights, so a config whose layer count
  exceeds the tensors the weights hold is not describing those weights, and is refused before
  anything is built (a crafted count would spin building millions of layers, even on the meta
  device); a scheduler may ask for at most `MAX_TIMESTEPS` steps; config and tokenizer files have a
  size limit;
- **sealed folders stay whole**: a folder with our `manifest.json` (final/, exports) must match it
  (sizes), so a folder cut short or altered is refused rather than loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from safetensors import safe_open

from colodiffusion.config import ConfigError
from colodiffusion.storage.checkpoint import MANIFEST, CheckpointError, verify
from colodiffusion.storage.files import inside, loads_json

MAX_CONFIG_BYTES = 1 << 20  # a real config.json is a few KB
MAX_TEXT_FILE_BYTES = 64 << 20  # tokenizer files (vocab, merges, tokenizer.json) are a few MB
MAX_TIMESTEPS = 100_000  # SD trains on 1000; a schedule allocates a few arrays of this length
LIBRARIES = ("diffusers", "transformers")
PART_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}


def deepest(value) -> int:
    """The largest count in an int or a (nested) list of ints, e.g. transformer_layers_per_block."""
    if isinstance(value, (list, tuple)):
        return max([deepest(v) for v in value] + [1])
    return value if isinstance(value, int) and not isinstance(value, bool) else 1


def layers(config: dict) -> int:
    """An upper bound on the layers a UNet, VAE or CLIP text config builds, from its counts alone."""
    blocks = max([len(v) for k in ("block_out_channels", "down_block_types", "up_block_types")
                  if isinstance(v := config.get(k), (list, tuple))] + [1])
    return (blocks * max(deepest(config.get("layers_per_block", 1)), 1)
            * max(deepest(config.get("transformer_layers_per_block", 1)), 1)
            * max(deepest(config.get("num_hidden_layers", 1)), 1))


def check_layers(config: dict, tensors: int, what: str, source) -> None:
    count = layers(config)
    if count > max(tensors, 1):
        raise ConfigError(f"'{source}' describes a {what} with {count} layers but carries only {tensors} weights; "
                          "its config is not these weights'.")


def check_folder(folder: Path, what: str, links: bool = True) -> None:
    """One part's folder (a UNet, VAE, text encoder, tokenizer or scheduler): its links, its scheduler
    config, and its config.json against its .safetensors weights (their headers only). Folders with
    only .bin weights are read by the libraries' weights-only loader and are not counted here."""
    if links:
        check_links(folder)
    check_scheduler(folder)
    path = Path(folder) / "config.json"
    if not path.is_file():
        return  # the library names what is missing
    config = _json(path)
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return
    tensors = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                tensors += len(list(handle.keys()))
        except Exception as exc:  # SafetensorError
            raise ConfigError(f"'{f}' is not a readable .safetensors file: {str(exc).splitlines()[0]}") from None
    check_layers(config, tensors, what, path)


def cache_repo(folder: Path) -> Optional[Path]:
    """The Hugging Face cache repository folder (models--org--name) of a snapshot folder inside it, else None."""
    parts = Path(folder).absolute().parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            return Path(*parts[:i])
    return None


def check_links(folder: Path) -> None:
    """ConfigError unless every file under `folder` resolves inside it (or inside its Hub cache repository)."""
    folder = Path(folder)
    within = cache_repo(folder) or folder
    for p in sorted(folder.rglob("*")):
        if (p.is_file() or p.is_symlink()) and not inside(p, within):
            raise ConfigError(f"'{p}' in '{folder}' is a link to '{os.path.realpath(p)}', outside it; a folder handed "
                              "to us is read only inside itself: copy it without links (cp -rL).")
        if p.is_file() and p.suffix in (".json", ".txt") and p.stat().st_size > MAX_TEXT_FILE_BYTES:
            raise ConfigError(f"'{p}' is {p.stat().st_size} bytes, too big for a model's config or tokenizer file.")


def _json(path: Path) -> dict:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"'{path}' is {path.stat().st_size} bytes, too big for a model config.")
    try:
        config = loads_json(path.read_text())
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"'{path}' is not a JSON model config.") from None
    if not isinstance(config, dict):
        raise ConfigError(f"'{path}' is not a JSON object.")
    return config


def _pipeline_module(name: str) -> bool:
    """A diffusers pipeline package (model_index.json names e.g. a safety checker from 'stable_diffusion')."""
    import diffusers.pipelines

    return bool(re.fullmatch(r"[a-z][a-z0-9_]*", name)) and (Path(diffusers.pipelines.__file__).parent / name).is_dir()


def check_index(path: Path) -> None:
    """A pipeline's model_index.json names only diffusers/transformers classes (or none) for its parts."""
    for part, entry in _json(path).items():
        if part.startswith("_") or not isinstance(entry, list):  # (plain values such as requires_safety_checker)
            continue
        library = entry[0] if entry else None
        if library is None or library in LIBRARIES or isinstance(library, str) and _pipeline_module(library):
            continue
        raise ConfigError(f"'{path}' names {library!r} as the library of its part '{part}'; a model folder may name "
                          f"classes of {' and '.join(LIBRARIES)} only, never code of its own, so it is not loaded.")


def check_scheduler(folder: Path) -> None:
    """A scheduler config asks for a schedule of at most MAX_TIMESTEPS steps."""
    path = Path(folder) / "scheduler_config.json"
    if path.is_file():
        check_schedule(_json(path), path)


def check_schedule(config: dict, source) -> None:
    steps = config.get("num_train_timesteps", 1000)
    betas = config.get("trained_betas")
    if not (type(steps) is int and 1 <= steps <= MAX_TIMESTEPS) or \
            betas is not None and not (isinstance(betas, list) and len(betas) <= MAX_TIMESTEPS):
        raise ConfigError(f"'{source}' asks for a noise schedule of {steps!r} steps; at most {MAX_TIMESTEPS} are read.")


def check_model_folder(root: Path) -> None:
    """Everything above, for a whole diffusers folder (model_index.json and its parts' subfolders)."""
    root = Path(root)
    check_links(root)
    if (root / MANIFEST).is_file():
        try:
            verify(root, hashes=False, within=cache_repo(root) or root)
        except CheckpointError as exc:
            raise ConfigError(f"'{root}' is cut short or altered since it was written, so it is not loaded "
                              f"({exc}).") from None
    if (root / "model_index.json").is_file():
        check_index(root / "model_index.json")
    for part in sorted(p for p in root.iterdir() if p.is_dir()):
        check_folder(part, PART_NAMES.get(part.name, part.name), links=False)
