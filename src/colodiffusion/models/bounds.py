"""How big a model a config may ask us to build: a model file is data, and the config beside its
weights (a diffusers folder's config.json, our single-file exports' metadata) is part of that data.
Every layer carries weights, so a config whose layer count exceeds the tensors the weights hold is
not describing those weights, and is refused before anything is built (a crafted count would spin
building millions of layers, even on the meta device)."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from colodiffusion.config import ConfigError
from colodiffusion.storage.files import loads_json

MAX_CONFIG_BYTES = 1 << 20  # a real config.json is a few KB


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


def check_folder(folder: Path, what: str) -> None:
    """A diffusers/transformers model folder's config.json against its .safetensors weights (their
    headers only). Folders with only .bin weights are read by the libraries' weights-only loader and
    are not counted here."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return  # the library names what is missing
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"'{path}' is {path.stat().st_size} bytes, too big for a model config.")
    try:
        config = loads_json(path.read_text())
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"'{path}' is not a JSON model config.") from None
    if not isinstance(config, dict):
        raise ConfigError(f"'{path}' is not a JSON object.")
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
