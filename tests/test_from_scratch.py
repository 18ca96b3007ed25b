"""model.init=scratch: a freshly initialised UNet of the preset, with the frozen tokenizer, text encoder
and VAE from a local folder (the seed trains SD this way: a new UNet over a frozen CLIP and first stage)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from colodiffusion.config import ConfigError, load_config
from colodiffusion.models.loading import build_components
from colodiffusion.models.presets import build_unet, get_preset
from colodiffusion.train import loop

from common import TINY
from sdfolder import make_diffusers_folder


def _refuse(*_):
    raise AssertionError("nothing may be trained or derived from data when the frozen parts are given")


def build(cfg, tmp_path):
    return build_components(cfg, tmp_path / "components", captions=_refuse, train_vae=_refuse)


def test_scratch_unet_is_fresh_and_frozen_parts_come_from_the_folder(tmp_path, tiny_components):
    folder = make_diffusers_folder(tiny_components, tmp_path / "sd", seed=123)
    cfg = load_config(None, [f"model.pretrained={folder}", "model.init=scratch", "train.seed=7"])
    comps = build(cfg, tmp_path)
    torch.manual_seed(7)
    fresh = build_unet(get_preset("tiny")).state_dict()
    released = load_file(str(folder / "unet/diffusion_pytorch_model.safetensors"))
    got = comps.unet.state_dict()
    assert all(torch.equal(got[k], fresh[k]) for k in fresh)  # the preset's initialisation, seeded by train.seed
    assert any(not torch.equal(got[k], released[k]) for k in released)  # not the folder's weights
    te = load_file(str(folder / "text_encoder/model.safetensors"))
    assert all(torch.equal(comps.text_encoder.state_dict()[k], te[k]) for k in te)
    assert not any(p.requires_grad for p in [*comps.text_encoder.parameters(), *comps.vae.parameters()])


def test_a_folder_without_unet_is_enough_for_scratch_but_not_for_fine_tuning(tmp_path, tiny_components):
    folder = make_diffusers_folder(tiny_components, tmp_path / "sd")
    shutil.rmtree(folder / "unet")
    comps = build(load_config(None, [f"model.pretrained={folder}", "model.init=scratch"]), tmp_path)
    assert comps.unet.config.cross_attention_dim == comps.text_encoder.config.hidden_size
    with pytest.raises(ConfigError, match="lacks unet/"):
        build(load_config(None, [f"model.pretrained={folder}"]), tmp_path)


@pytest.mark.slow
def test_sd15_from_scratch_over_a_768d_frozen_clip(tmp_path, tiny_components):
    # A small CLIP of SD 1.x's width (768) stands in for ViT-L/14; the VAE is the tiny one.
    parts = tmp_path / "frozen"
    tokenizer = CLIPTokenizer.from_pretrained(tiny_components / "tokenizer")
    tokenizer.save_pretrained(parts / "tokenizer")
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=77,
        )
    ).save_pretrained(parts / "text_encoder")
    shutil.copytree(tiny_components / "vae", parts / "vae")
    cfg = load_config(None, ["model.preset=sd15", "model.init=scratch", f"model.text_encoder={parts}",
                             f"model.vae={parts}"])
    comps = build(cfg, tmp_path)
    assert comps.unet.config.cross_attention_dim == 768
    assert round(sum(p.numel() for p in comps.unet.parameters()) / 1e6, 1) == 859.5  # SD 1.x's UNet
    assert all(p.requires_grad for p in comps.unet.parameters())


def test_scratch_needs_its_frozen_parts_and_a_matching_preset(tmp_path, tiny_components):
    with pytest.raises(ConfigError, match="model.init=scratch with model.preset=sd15 needs its frozen parts"):
        load_config(None, ["model.preset=sd15", "model.init=scratch"])
    folder = make_diffusers_folder(tiny_components, tmp_path / "sd")  # a 128-d text encoder
    with pytest.raises(ConfigError, match="cross-attends to 768-d text features, but the text encoder gives 128-d"):
        build(load_config(None, ["model.preset=sd15", "model.init=scratch", f"model.pretrained={folder}"]), tmp_path)


@pytest.mark.slow
def test_training_from_scratch_keeps_the_frozen_parts_and_resumes(tmp_path, tiny_components):
    folder = make_diffusers_folder(tiny_components, tmp_path / "sd")
    run = tmp_path / "run"
    common = [*TINY, f"model.pretrained={folder}", "model.init=scratch", f"run.dir={run}", "train.checkpoint_every=1"]
    loop.train(load_config(None, [*common, "train.max_steps=1"]))
    loop.train(load_config(None, [*common, "train.max_steps=2", "train.resume=auto"]))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    te_in = load_file(str(folder / "text_encoder/model.safetensors"))
    te_out = load_file(str(run / "final/text_encoder/model.safetensors"))
    assert all(torch.equal(te_in[k], te_out[k]) for k in te_in)
    assert not (run / "components").exists()  # nothing was built from the data
