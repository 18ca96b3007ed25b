"""A tiny diffusers SDXL folder made in the test (no downloads): SDXL's layout and conditioning at toy
widths. Two CLIP text encoders of different widths (CLIPTextModel, CLIPTextModelWithProjection) with
tokenizers trained offline, a UNet with SDXL's "text_time" added conditioning over their concatenated
states, an f2 VAE for 32 px images and SDXL's Euler schedule."""

from pathlib import Path

import torch

WIDTH_1, WIDTH_2, POOLED, TIME_DIM = 32, 48, 24, 8


def make_sdxl_folder(out: Path, captions, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from colodiffusion.models.tokenizer import train_clip_tokenizer

    tokenizer = train_clip_tokenizer(list(captions) * 2, vocab_size=300, max_length=16)
    tokenizer_2 = train_clip_tokenizer(list(captions) * 2, vocab_size=300, max_length=16)
    tokenizer_2.pad_token = "!"  # as SDXL's second tokenizer pads (its first pads with <|endoftext|>)

    def text_config(width):
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                              projection_dim=POOLED, bos_token_id=0, eos_token_id=1)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(WIDTH_1))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(WIDTH_2))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=WIDTH_1 + WIDTH_2, attention_head_dim=8, norm_num_groups=16, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + POOLED,
    )
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        sample_size=32, scaling_factor=0.5, force_upcast=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                              add_watermarker=False).save_pretrained(out)
    return out
