"""ColoDiffusion: train Stable-Diffusion-style latent text-to-image models, from one CPU to many GPUs.

Layers, from the bottom; imports only point down (tests/test_layers.py checks it):
config -> diffusion, storage -> models -> generate (sampling) -> data -> parallel -> train ->
commands (cli, export, evaluate, bench). Each folder's `__init__` says what it owns."""

__version__ = "0.1.0"
