"""ColoDiffusion: train Stable-Diffusion-style latent text-to-image models, from one CPU to many GPUs."""

__version__ = "0.1.0"
