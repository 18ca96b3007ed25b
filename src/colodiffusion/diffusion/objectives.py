"""Training objectives: `loss(model_fn, x0_BCHW, context, generator)`.

The trainer never builds noisy latents itself (k-diffusion's Denoiser, DiT's training_losses):
it hands clean latents and the text context to an `Objective`, which draws timesteps and noise
from an explicit generator (so resume and data-parallel RNG are exact), noises the latents,
calls the model and returns the (optionally min-SNR-weighted, optionally per-sample-weighted) MSE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from colodiffusion.config import DiffusionConfig

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Objective:
    alphas_cumprod: torch.Tensor  # (T,) float32
    prediction_type: str = "epsilon"  # or "v_prediction"
    min_snr_gamma: Optional[float] = None
    offset_noise: float = 0.0
    high_noise_weight: float = 0.0  # added to the x0-error weight of every step (config.DiffusionConfig)

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not '{self.prediction_type}'")

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def draw(self, x0: torch.Tensor, generator: torch.Generator):
        """Timesteps and noise for a batch (drawn on the generator's device, moved to x0's)."""
        B = x0.shape[0]
        gdev = generator.device
        t = torch.randint(0, self.num_timesteps, (B,), generator=generator, device=gdev).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=torch.float32)
        if self.offset_noise > 0:
            offset = torch.randn((B, x0.shape[1], 1, 1), generator=generator, device=gdev)
            noise = noise + self.offset_noise * offset
        return t, noise.to(x0.device)

    def alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        """The schedule on `device`, moved there once: a copy per step would be a blocking host->device
        transfer (a host sync) in every training step."""
        if self.alphas_cumprod.device != device:
            self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self.alphas_cumprod

    def noisy(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """x_t = sqrt(a) x0 + sqrt(1-a) eps, and the regression target for the prediction type."""
        a = self.alphas_cumprod_on(x0.device)[t].view(-1, 1, 1, 1)
        sqrt_a, sqrt_1ma = a.sqrt(), (1 - a).sqrt()
        x_t = sqrt_a * x0 + sqrt_1ma * noise
        target = noise if self.prediction_type == "epsilon" else sqrt_a * noise - sqrt_1ma * x0
        return x_t, target

    def weights(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample weights for the model's target, from a weight W on the error of the implied x0: the
        eps-MSE is SNR times the x0-MSE and the v-MSE (SNR + 1) times it, so W becomes W / SNR for eps and
        W / (SNR + 1) for v. W = min(SNR, gamma) (min-SNR-gamma, Hang et al. 2023; SNR without gamma)
        + high_noise_weight."""
        if self.min_snr_gamma is None and not self.high_noise_weight:
            return None
        a = self.alphas_cumprod_on(t.device)[t]
        snr = a / (1 - a)
        w_x0 = (
            snr if self.min_snr_gamma is None else torch.clamp(snr, max=self.min_snr_gamma)
        ) + self.high_noise_weight
        return w_x0 / (snr + 1) if self.prediction_type == "v_prediction" else w_x0 / snr

    def per_sample_loss(self, model_fn: ModelFn, x0: torch.Tensor, context: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor:
        """(B,) loss of each sample at the given timesteps and noise (min-SNR-weighted if configured):
        the validation loss fixes t and noise, training draws them."""
        x_t, target = self.noisy(x0.float(), t, noise)
        pred = model_fn(x_t, t, context)
        per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        w = self.weights(t)
        return per_sample * w if w is not None else per_sample

    def loss(self, model_fn: ModelFn, x0: torch.Tensor, context: torch.Tensor, generator: torch.Generator,
             sample_weights: Optional[torch.Tensor] = None):
        """Mean loss over the batch; `sample_weights` (B,) scales each sample's term (prior-preservation
        class images carry data.prior_loss_weight, instance images 1)."""
        t, noise = self.draw(x0, generator)
        per_sample = self.per_sample_loss(model_fn, x0, context, t, noise)
        if sample_weights is not None:
            per_sample = per_sample * sample_weights.to(per_sample.device, per_sample.dtype)
        return per_sample.mean()


def build_objective(d: DiffusionConfig, alphas_cumprod: torch.Tensor, prediction_type: str) -> Objective:
    return Objective(alphas_cumprod, prediction_type, d.min_snr_gamma, d.offset_noise, d.high_noise_weight)
