"""Models: the preset registry, the offline tokenizer, building the model components, and reading and
writing model files (diffusers folders, single-file LDM checkpoints, LoRA adapters, our training
checkpoints' weights).

May import: `config`, `diffusion`, `storage`. Never torch.distributed: parallelism is applied from
outside (`parallel/`), and exporting is a command above this layer (`export.py`)."""

from colodiffusion.models.components import Components, encode_images, encode_prompts, freeze
from colodiffusion.models.loading import build_components, load_pretrained
from colodiffusion.models.presets import PRESETS, get_preset

__all__ = ["Components", "build_components", "encode_images", "encode_prompts", "freeze", "load_pretrained",
           "PRESETS", "get_preset"]
