import torch

from colodiffusion.models.presets import build_text_encoder, build_unet, build_vae, get_preset
from colodiffusion.models.tokenizer import train_clip_tokenizer


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_sd_presets_parameter_counts_on_meta():
    with torch.device("meta"):
        sd15, sd2 = get_preset("sd15"), get_preset("sd2")
        assert count(build_unet(sd15)) == 859_520_964
        assert count(build_text_encoder(sd15)) == 123_060_480  # CLIP ViT-L/14 text tower
        assert count(build_vae(sd15)) == 83_653_863
        assert count(build_unet(sd2)) == 865_910_724
        assert count(build_text_encoder(sd2)) == 340_387_840  # OpenCLIP ViT-H text tower, 23 layers
        assert build_unet(sd2).config.cross_attention_dim == 1024
    assert sd2.prediction_type == "v_prediction" and sd15.prediction_type == "epsilon"


def test_tiny_preset_is_cpu_sized():
    p = get_preset("tiny")
    unet = build_unet(p)
    assert 1e6 < count(unet) < 10e6
    vae = build_vae(p)
    z = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert z.shape == (1, 4, 16, 16)


def test_offline_tokenizer_roundtrip(tmp_path):
    from transformers import CLIPTokenizer

    tok = train_clip_tokenizer(["a red circle on a grey background", "a small blue square"] * 5, max_length=16)
    ids = tok("a red circle", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and ids[0] == tok.bos_token_id
    assert tok.tokenize("red circle") == ["red</w>", "circle</w>"]  # known words are single tokens
    assert len(tok.tokenize("zebra")) >= 1  # unseen words still encode, byte by byte
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again("a red circle").input_ids == tok("a red circle").input_ids
    assert again.model_max_length == 16
