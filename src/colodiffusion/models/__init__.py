"""Models: the preset registry, the offline tokenizer, and building/loading the model components."""

from colodiffusion.models.components import (
    Components,
    build_components,
    encode_images,
    encode_prompts,
    freeze,
    load_pretrained,
)
from colodiffusion.models.presets import PRESETS, get_preset

__all__ = ["Components", "build_components", "encode_images", "encode_prompts", "freeze", "load_pretrained",
           "PRESETS", "get_preset"]
