"""Named model presets: each a few lines of diffusers/transformers configs (DiT's `DiT_models` habit).

A preset builds three modules: the denoising UNet (trained), the CLIP text encoder and the KL
autoencoder (both frozen); SDXL adds a second text encoder (`text_encoder_2`). Nothing here touches
weights on disk: see `models/loading.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel


@dataclass(frozen=True)
class Preset:
    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    prediction_type: str = "epsilon"
    scaling_factor: float = 0.18215
    resolution: int = 512
    needs_pretrained_tokenizer: bool = True
    # Std of a freshly built text encoder's token embeddings (None: CLIP's 0.02). A frozen *random*
    # encoder must keep token identity: at 0.02 its random attention mixing drowns the token (the
    # context vectors of "red" and "green" in "a red circle"/"a green circle" had cosine 0.94), at 1.0
    # a token dominates its own output (cosine 0.08 between the colours, 0.95 for "red" across wordings).
    token_embedding_std: float | None = None
    text_encoder_2: dict[str, Any] | None = None  # SDXL's second encoder (CLIPTextModelWithProjection)
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)

PRESETS: dict[str, Preset] = {
    # CPU-sized: 1.2M-parameter UNet on 16x16x4 latents of 32 px images (f2 VAE), 2-layer CLIP.
    # (An f4 VAE on 64 px images did not learn faithful colours in a CPU-minutes budget; f2 did.)
    # Narrow on purpose: the default run was limited by the images it saw, not by the UNet's size. Widths
    # (16, 32, 64) train 2.2x faster per step than (32, 64, 128) on 2 CPU cores, and at the same wall time
    # see twice the images: held-out accuracy at seeds 0/1 0.938/0.969 -> 0.958/1.000 (bench/NOTES.md),
    # while a wider (64, 64, 128) or deeper (2 layers per block) UNet at the same steps gained nothing.
    "tiny": Preset(
        unet=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=128,
            attention_head_dim=8,
            norm_num_groups=8,
            # The caption, attention-pooled, added to the timestep embedding (diffusers' "text" addition,
            # as in Imagen/unCLIP): every res-block, not only the cross-attention layers, sees what to draw.
            addition_embed_type="text",
            addition_embed_type_num_heads=8,
        ),
        text_encoder=dict(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=24, projection_dim=128, vocab_size=1024,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        ),
        scaling_factor=1.0,  # measured from the data when the first stage is trained
        resolution=32,
        needs_pretrained_tokenizer=False,
        token_embedding_std=1.0,
        # v-prediction (with the min-SNR-5 weighting): at the noisiest steps, where the colour is decided,
        # eps-prediction's target is the input itself, so a model learns to copy it and ignores the caption;
        # v's target there is the clean image. Held-out accuracy at seed 0, 1,500 steps: eps 0.71 (colour
        # 0.79), v + pooled caption 0.92 (colour 0.99, shape 0.93); bench/NOTES.md has the ablation.
        prediction_type="v_prediction",
    ),
    # SD 1.x: 860M UNet, CLIP ViT-L/14 text encoder (768-d context), f8 VAE.
    "sd15": Preset(
        unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        text_encoder=dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        ),
        vae=_SD_VAE,
    ),
    # SD 2.x (768-v): linear-projection transformers, OpenCLIP ViT-H text tower (1024-d, penultimate
    # layer, hence 23 layers), v-prediction.
    "sd2": Preset(
        unet=dict(
            sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        ),
        text_encoder=dict(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
        ),
        vae=dict(_SD_VAE, sample_size=768),
        prediction_type="v_prediction",
        resolution=768,
    ),
    # SDXL base 1.0: 2.6B UNet over both encoders' penultimate states (768 + 1280 = 2048-d context), with
    # "text_time" added conditioning (pooled encoder-2 output + six size/crop numbers, 256-d each: 2816),
    # CLIP ViT-L and OpenCLIP ViT-bigG (32 layers, projected pooled output), f8 VAE with SDXL's scale.
    # Fine-tuning reads the architecture from model.pretrained's folder; these configs describe it.
    "sdxl": Preset(
        unet=dict(
            sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        ),
        text_encoder=dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        ),
        text_encoder_2=dict(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
        ),
        vae=dict(_SD_VAE, sample_size=1024, force_upcast=True),
        scaling_factor=0.13025,
        resolution=1024,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset '{name}'; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def build_unet(preset: Preset) -> UNet2DConditionModel:
    return UNet2DConditionModel(**preset.unet)


def build_text_encoder(preset: Preset, vocab_size: int | None = None) -> CLIPTextModel:
    kwargs = dict(preset.text_encoder)
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    # eos_token_id 1 matches the offline tokenizer's "<|endoftext|>" (pooled output picks it).
    model = CLIPTextModel(CLIPTextConfig(**kwargs, bos_token_id=0, eos_token_id=1 if vocab_size else 49407))
    if preset.token_embedding_std is not None and not any(p.is_meta for p in model.parameters()):
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=preset.token_embedding_std)
    return model


def build_vae(preset: Preset) -> AutoencoderKL:
    return AutoencoderKL(**preset.vae, scaling_factor=preset.scaling_factor)


BUILDERS: dict[str, Callable] = {"unet": build_unet, "text_encoder": build_text_encoder, "vae": build_vae}
