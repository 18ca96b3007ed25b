"""Checkpoint interop: single-file LDM import/export, LoRA, text-encoder fine-tuning, txt2img.

Every model here is tiny and made in the test: a tiny run trained from scratch gives the diffusers
folder that the other runs fine-tune, and small SD-1.x/2.x-shaped modules stand in for released
checkpoints (same block structure and key layout, tiny widths).
"""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from colodiffusion.config import Config, ConfigError, load_config  # noqa: E402
from colodiffusion.models import ldm_convert  # noqa: E402
from colodiffusion.export import export  # noqa: E402
from colodiffusion.models.loading import load_model, load_pretrained  # noqa: E402
from colodiffusion.models.single_file import convert_file, load_single_file, read_checkpoint, save_single_file  # noqa: E402
from colodiffusion.models.tokenizer import train_clip_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["first_stage.steps=2", "first_stage.scale_samples=16", "train.batch_size=4", "data.num_samples=32",
        "train.sample_every=0", "train.checkpoint_every=0", "train.log_every=1"]


def run(run_dir, *overrides):
    from colodiffusion.train.loop import train

    torch.set_num_threads(1)
    return train(load_config(None, [f"run.dir={run_dir}", *TINY, *overrides]))


def assert_same(ref: dict, got: dict, what: str):
    assert set(ref) == set(got), f"{what}: keys differ: {sorted(set(ref) ^ set(got))[:5]}"
    for k in ref:
        assert torch.equal(ref[k].float(), got[k].float().reshape(ref[k].shape)), f"{what}: '{k}' differs"


def image(pipe, prompt="a red circle", seed=0):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    return pipe([prompt], num_inference_steps=3, guidance_scale=3.0, generator=g, output_type="np").images[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny v-prediction model trained from scratch: its final/ is the diffusers folder we start from."""
    return run(tmp_path_factory.mktemp("base") / "run", "train.max_steps=1", "model.prediction_type=v_prediction")


@pytest.fixture(scope="module")
def finetuned(base, tmp_path_factory):
    return run(tmp_path_factory.mktemp("ft") / "run", f"model.pretrained={base / 'final'}", "train.max_steps=2")


# -- single file: round trip, EMA, refusal ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_diffusers_to_train_to_single_file_round_trip(finetuned, tmp_path, suffix):
    ckpt = finetuned / "checkpoints" / "step_00000002"
    trained = load_model(ckpt)
    out = export(ckpt, "single-file", tmp_path / f"model{suffix}")
    sd, _ = read_checkpoint(out)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in sd)
    assert any(k.startswith("first_stage_model.encoder.down.") for k in sd)
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.") for k in sd)
    conv, _ = convert_file(out, Config().model)
    assert conv.unused == [] and conv.ignored == []  # every key of the file is one model weight
    cfg = Config()
    cfg.model.pretrained = str(out)
    comps = load_single_file(out, cfg.model, cfg.diffusion)
    # The training checkpoint's UNet went through the file unchanged, and so did the frozen parts.
    assert_same(load_file(ckpt / "unet.safetensors"), comps.unet.state_dict(), "unet")
    assert_same(trained.vae.state_dict(), comps.vae.state_dict(), "vae")
    assert_same(trained.text_encoder.state_dict(), comps.text_encoder.state_dict(), "text encoder")
    assert comps.tokenizer.get_vocab() == trained.tokenizer.get_vocab()
    assert comps.prediction_type == "v_prediction"  # from the pretrained folder's scheduler, through training
    assert len(sd) == sum(len(m.state_dict()) for m in (comps.unet, comps.vae, comps.text_encoder))


@pytest.mark.slow
def test_diffusers_export_keeps_prediction_type_and_dtype(finetuned, tmp_path):
    out = export(finetuned, "diffusers", tmp_path / "d", ema=True, dtype="fp16")
    m = load_model(out)
    assert m.noise_scheduler.config.prediction_type == "v_prediction"
    files = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in files.values())
    ema = load_file(finetuned / "checkpoints" / "step_00000002" / "ema.safetensors")
    assert_same({k: v.half() for k, v in ema.items()}, files, "EMA unet in fp16")
    # the folder names no path of this machine (diffusers records where each part was loaded from)
    leaked = [f for f in out.rglob("*.json") if str(finetuned) in f.read_text() or "/tmp" in f.read_text()]
    assert leaked == []


def _tiny_sd1(seed=0):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=8,
                                sample_size=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=1, vocab_size=300, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1))
    return unet, vae, text


def _tokenizer_dir(tmp_path):
    tok = train_clip_tokenizer(["a red circle", "a blue square"], vocab_size=300, max_length=16)
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_ema_keys_import_with_and_without_ema(tmp_path):
    unet, vae, text = _tiny_sd1()
    ema = {k: v + 1.0 for k, v in unet.state_dict().items()}
    tok = train_clip_tokenizer(["a red circle"], vocab_size=300, max_length=16)
    from colodiffusion.diffusion import build_noise_scheduler

    schedule = build_noise_scheduler(Config().diffusion, "epsilon")
    path = save_single_file(tmp_path / "ema.safetensors", unet, vae, text, tok, schedule, ema_unet=ema)
    sd, _ = read_checkpoint(path)
    assert sum(k.startswith("model_ema.") for k in sd) == len(unet.state_dict())
    cfg = Config()
    raw = load_single_file(path, cfg.model, cfg.diffusion)
    assert_same(unet.state_dict(), raw.unet.state_dict(), "raw weights")
    cfg.model.pretrained_ema = True
    averaged = load_single_file(path, cfg.model, cfg.diffusion)
    assert_same(ema, averaged.unet.state_dict(), "EMA weights")
    assert_same(vae.state_dict(), averaged.vae.state_dict(), "vae")
    assert convert_file(path, cfg.model)[0].unused == []
    # A file without EMA keys cannot give EMA weights: one sentence, not a silent fallback.
    plain = save_single_file(tmp_path / "plain.safetensors", unet, vae, text, tok, raw.noise_scheduler)
    with pytest.raises(ConfigError, match="no EMA weights"):
        load_single_file(plain, cfg.model, cfg.diffusion)


class Payload:
    """Unpickling this would create a file (stands for any code a pickle can run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    state = {"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "x": Payload(marker)}
    if zip_format:
        torch.save(state, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(state, f)
    assert not marker.exists()
    with pytest.raises(ConfigError, match="refused"):
        read_checkpoint(evil)
    assert not marker.exists()
    cfg = Config()
    cfg.model.pretrained = str(evil)
    from colodiffusion.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["export", str(evil), "--format", "diffusers", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def _foreign_file(tmp_path, unet, vae, text, name, extra=None):
    """A single file as other tools write it: LDM keys, schedule buffers, no metadata of ours."""
    sd = ldm_convert.to_ldm(unet.state_dict(), vae.state_dict(), text.state_dict(), dict(unet.config),
                            dict(vae.config), text.config.to_dict())
    sd["alphas_cumprod"] = torch.linspace(1, 0.01, 1000)
    sd["betas"] = torch.linspace(1e-4, 2e-2, 1000)
    sd.update(extra or {})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / name))
    return tmp_path / name


def test_sd1_shaped_single_file_without_metadata_imports(tmp_path):
    unet, vae, text = _tiny_sd1()
    pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    path = _foreign_file(tmp_path, unet, vae, text, "sd1.safetensors", {pos: torch.arange(16)[None]})
    cfg = Config()
    with pytest.raises(ConfigError, match="model.tokenizer"):
        load_single_file(path, cfg.model, cfg.diffusion)
    cfg.model.tokenizer = str(_tokenizer_dir(tmp_path))
    comps = load_single_file(path, cfg.model, cfg.diffusion)
    assert_same(unet.state_dict(), comps.unet.state_dict(), "unet")
    assert_same(vae.state_dict(), comps.vae.state_dict(), "vae")
    assert_same(text.state_dict(), comps.text_encoder.state_dict(), "text encoder")
    assert list(comps.unet.config.down_block_types) == list(unet.config.down_block_types)
    assert comps.prediction_type == "epsilon"
    conv, _ = convert_file(path, cfg.model)
    assert conv.unused == [] and sorted(conv.ignored) == sorted(["alphas_cumprod", "betas", pos])
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 16, 32)
    with torch.no_grad():
        assert torch.allclose(unet(x, 10, ctx).sample, comps.unet(x, 10, ctx).sample, atol=1e-5)


def test_original_yaml_describes_the_file(tmp_path):
    unet, vae, text = _tiny_sd1()
    path = _foreign_file(tmp_path, unet, vae, text, "sd1.safetensors")
    yaml = tmp_path / "v1-inference.yaml"
    yaml.write_text("""
model:
  params:
    parameterization: v
    scale_factor: 0.5
    unet_config:
      params: {in_channels: 4, out_channels: 4, model_channels: 32, attention_resolutions: [4, 2, 1],
               num_res_blocks: 2, channel_mult: [1, 2, 2, 2], num_heads: 8, transformer_depth: 1, context_dim: 32}
    first_stage_config:
      params:
        ddconfig: {ch: 32, ch_mult: [1, 2], num_res_blocks: 1, in_channels: 3, out_ch: 3, z_channels: 4}
""")
    cfg = load_config(None, [f"model.original_config={yaml}", f"model.tokenizer={_tokenizer_dir(tmp_path)}"])
    comps = load_single_file(path, cfg.model, cfg.diffusion)
    assert_same(unet.state_dict(), comps.unet.state_dict(), "unet")
    assert comps.prediction_type == "v_prediction" and comps.scaling_factor == 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.read_text().replace("model_channels: 32", "model_channels: 64"))
    cfg.model.original_config = str(bad)
    with pytest.raises(ConfigError):
        load_single_file(path, cfg.model, cfg.diffusion)


def test_sd2_shaped_openclip_file_drops_the_last_block(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(64, 64, 64, 64), cross_attention_dim=64, sample_size=8,
                                attention_head_dim=(1, 1, 1, 1), use_linear_projection=True)
    vae = _tiny_sd1()[1]
    full = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=1,
            vocab_size=300,
            max_position_embeddings=16,
            hidden_act="gelu",
        )
    )
    path = _foreign_file(tmp_path, unet, vae, full, "sd2.safetensors",
                         {"cond_stage_model.model.text_projection": torch.randn(64, 64),
                          "cond_stage_model.model.logit_scale": torch.tensor(1.0)})
    assert any(".attn.in_proj_weight" in k for k in load_file(path))
    cfg = load_config(None, [f"model.tokenizer={_tokenizer_dir(tmp_path)}"])
    comps = load_single_file(path, cfg.model, cfg.diffusion)
    assert_same(unet.state_dict(), comps.unet.state_dict(), "unet")
    # SD 2.x conditions on OpenCLIP's penultimate layer: the text encoder keeps 2 of the 3 blocks.
    expected = {k: v for k, v in full.state_dict().items() if not k.startswith("encoder.layers.2.")}
    assert_same(expected, comps.text_encoder.state_dict(), "text encoder")
    assert comps.prediction_type == "v_prediction"
    conv, _ = convert_file(path, cfg.model)
    assert conv.unused == [] and any("resblocks.2." in k for k in conv.ignored)


def test_unknown_keys_are_refused(tmp_path):
    unet, vae, text = _tiny_sd1()
    path = _foreign_file(
        tmp_path, unet, vae, text, "odd.safetensors", {"model.diffusion_model.extra.weight": torch.ones(2)}
    )
    cfg = Config()
    cfg.model.tokenizer = str(_tokenizer_dir(tmp_path))
    with pytest.raises(ConfigError, match="does not understand"):
        load_single_file(path, cfg.model, cfg.diffusion)


@pytest.mark.parametrize("part, change, words", [
    ("unet", {"transformer_layers_per_block": 10**6}, "layers but carries only"),  # would spin building layers
    ("text_encoder", {"num_hidden_layers": 10**7}, "layers but carries only"),
    ("unet", {"cross_attention_dim": 2**40}, "does not fit the UNet"),        # would ask for petabytes
    ("vae", {"block_out_channels": [2**20, 64]}, "does not fit the VAE"),
    ("unet", {"down_block_types": "x"}, "cannot be built"),
    ("vae", "not a config", "without a vae config object"),
    (None, "[" * 200_000, "unreadable 'colodiffusion' metadata"),
])
def test_a_files_own_config_cannot_make_us_build_more_than_its_weights(tmp_path, part, change, words):
    """Our exports carry their configs in the file's metadata; a crafted file's configs are checked
    against its weights before anything is allocated."""
    import json

    from safetensors.torch import load_file, save_file

    from colodiffusion.diffusion import build_noise_scheduler
    from colodiffusion.models.single_file import META_KEY

    unet, vae, text = _tiny_sd1()
    tok = train_clip_tokenizer(["a red circle"], vocab_size=300, max_length=16)
    good = save_single_file(
        tmp_path / "good.safetensors", unet, vae, text, tok, build_noise_scheduler(Config().diffusion, "epsilon")
    )
    load_single_file(good, Config().model, Config().diffusion)  # the untouched file loads
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    if part is None:  # the whole metadata
        text = change
    else:
        meta[part] = change if isinstance(change, str) else {**meta[part], **change}
        text = json.dumps(meta)
    crafted = tmp_path / "crafted.safetensors"
    save_file(load_file(str(good)), str(crafted), metadata={META_KEY: text})
    with pytest.raises(ConfigError, match=words):
        load_single_file(crafted, Config().model, Config().diffusion)


@pytest.mark.parametrize("part, change, words", [
    ("unet", {"layers_per_block": 10**6}, "layers but carries only"),
    ("text_encoder", {"num_hidden_layers": 10**7}, "layers but carries only"),
    ("vae", {"block_out_channels": list(range(1, 10**5))}, "layers but carries only"),
    ("unet", "x" * (2 << 20), "too big for a model config"),
    ("unet", "[1, 2]", "is not a JSON object"),
    ("unet", "[" * 200_000, "is not a JSON model config"),  # nested past Python's recursion limit
])
def test_a_folders_config_cannot_make_us_build_more_layers_than_its_weights(tiny_components, tmp_path, part, change,
                                                                            words):
    """A diffusers folder's config.json is data too: a crafted layer count is refused from the counts
    and the weights' headers, before diffusers or transformers builds anything."""
    import json

    from sdfolder import make_diffusers_folder

    folder = make_diffusers_folder(tiny_components, tmp_path / "model")
    cfg = load_config(None, [f"model.pretrained={folder}"])
    load_pretrained(folder, cfg.model, cfg.diffusion)  # the untouched folder loads
    config = folder / part / "config.json"
    if isinstance(change, str):
        config.write_text(change)
    else:
        config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(ConfigError, match=words):
        load_pretrained(folder, cfg.model, cfg.diffusion)


def test_a_single_files_separate_vae_folder_is_bounded_too(tmp_path):
    import json

    from colodiffusion.diffusion import build_noise_scheduler

    unet, vae, text = _tiny_sd1()
    tok = train_clip_tokenizer(["a red circle"], vocab_size=300, max_length=16)
    path = save_single_file(
        tmp_path / "m.safetensors", unet, vae, text, tok, build_noise_scheduler(Config().diffusion, "epsilon")
    )
    vae.save_pretrained(tmp_path / "vae")
    cfg = Config()
    cfg.model.vae = str(tmp_path / "vae")
    assert_same(vae.state_dict(), load_single_file(path, cfg.model, cfg.diffusion).vae.state_dict(), "the separate VAE")
    config = tmp_path / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "layers_per_block": 10**6}))
    with pytest.raises(ConfigError, match="layers but carries only"):
        load_single_file(path, cfg.model, cfg.diffusion)


# -- LoRA and text-encoder fine-tuning ----------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    return run(tmp_path_factory.mktemp("lora") / "run", f"model.pretrained={base / 'final'}", "train.max_steps=2",
               "train.lora.rank=4", "train.lora.alpha=8", "train.lora.text_encoder=true", "train.lr=0.01",
               "train.warmup_steps=0", "train.ema.enabled=false")


@pytest.mark.slow
def test_lora_file_loads_into_the_pipeline_and_reproduces_the_run(base, lora_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    lora_file = lora_run / "lora" / "pytorch_lora_weights.safetensors"
    unet_file = base / "final" / "unet" / "diffusion_pytorch_model.safetensors"
    assert lora_file.stat().st_size < 0.05 * unet_file.stat().st_size
    keys = load_file(lora_file)
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    # Only the adapters were optimized.
    state = torch.load(lora_run / "checkpoints" / "step_00000002" / "state.pt", weights_only=True)
    n_opt = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    saved = load_file(lora_run / "checkpoints" / "step_00000002" / "unet.safetensors")
    assert n_opt == sum("lora_" in k for k in saved) > 0

    pipe = StableDiffusionPipeline.from_pretrained(base / "final", safety_checker=None, requires_safety_checker=False)
    before = image(pipe)
    pipe.load_lora_weights(lora_run / "lora")
    with_lora = image(pipe)
    trained = image(StableDiffusionPipeline.from_pretrained(lora_run / "final", safety_checker=None,
                                                            requires_safety_checker=False))
    assert np.abs(before - trained).max() > 1e-2  # the LoRA run changed the model's output
    np.testing.assert_allclose(with_lora, trained, atol=1e-3)

    # Export: the adapter alone, or merged into the base weights (which reproduces final/).
    with pytest.raises(ConfigError, match="--merge-lora"):
        export(lora_run, "diffusers", tmp_path / "x")
    out = export(lora_run, "lora", tmp_path / "lora")
    assert_same(keys, load_file(out), "exported LoRA file")
    merged = export(lora_run, "single-file", tmp_path / "merged.safetensors", merge_lora=True)
    m = load_model(merged)
    assert_same(load_file(lora_run / "final" / "unet" / "diffusion_pytorch_model.safetensors"), m.unet.state_dict(),
                "merged unet")
    assert not any("lora" in k for k in load_file(merged))


@pytest.mark.slow
def test_text_encoder_fine_tuning_is_saved_and_exported(base, tmp_path):
    run_dir = run(tmp_path / "te", f"model.pretrained={base / 'final'}", "train.max_steps=2", "train.lr=0.01",
                  "model.train_text_encoder=true", "model.text_encoder_lr=0.001", "train.warmup_steps=0")
    state = torch.load(run_dir / "checkpoints" / "step_00000002" / "state.pt", weights_only=True)
    lrs = sorted(g["initial_lr"] for g in state["optimizer"]["param_groups"])  # before the schedule
    assert lrs == pytest.approx([0.001, 0.01])
    before = load_file(base / "final" / "text_encoder" / "model.safetensors")
    after = load_file(run_dir / "final" / "text_encoder" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    out = export(run_dir, "single-file", tmp_path / "te.safetensors", ema=True)
    cfg = Config()
    loaded = load_single_file(out, cfg.model, cfg.diffusion)
    assert_same(after, loaded.text_encoder.state_dict(), "fine-tuned text encoder")


# -- the seed's sampling command ----------------------------------------------------------------------

@pytest.mark.slow
def test_txt2img_writes_images_from_a_trained_model(finetuned, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    single = export(finetuned, "single-file", tmp_path / "m.ckpt")
    for ckpt, extra in ((finetuned, []), (single, ["--plms"])):
        outdir = tmp_path / f"out_{Path(ckpt).name}"
        cmd = [sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--prompt", "a red circle", "--ckpt", str(ckpt),
               "--ddim_steps", "2", "--scale", "3", "--n_samples", "2", "--n_iter", "2", "--H", "64", "--W", "64",
               "--seed", "7", "--outdir", str(outdir), *extra]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stderr[-2000:]
        samples = sorted((outdir / "samples").glob("*.png"))
        assert len(samples) == 4 and (outdir / "grid-0000.png").exists()
        assert Image.open(samples[0]).size == (64, 64)
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--ckpt", str(tmp_path / "none")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_lora_and_text_encoder_options_choose_what_trains():
    from colodiffusion.models.components import Components, freeze
    from colodiffusion.models.presets import build_text_encoder, build_unet, get_preset
    from colodiffusion.models.trainable import UNetWithTextEncoder, build_trainable, text_encoder_param_ids
    from colodiffusion.train.optim import EMA, build_optimizer

    def comps():
        torch.manual_seed(0)
        p = get_preset("tiny")
        return Components(None, freeze(build_text_encoder(p, vocab_size=64)), None, build_unet(p), None)

    cfg = load_config(None, ["train.lora.rank=2"])
    c = comps()
    model = build_trainable(cfg.model, cfg.train.lora, c)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in c.text_encoder.parameters())
    opt = build_optimizer(model.parameters(), cfg, torch.device("cpu"))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    assert list(EMA(model.named_parameters(), 0.9).state_dict()) == trainable

    cfg = load_config(None, ["model.train_text_encoder=true", "model.text_encoder_lr=0.5"])
    c = comps()
    model = build_trainable(cfg.model, cfg.train.lora, c)
    assert isinstance(model, UNetWithTextEncoder) and all(p.requires_grad for p in model.parameters())
    opt = build_optimizer(model.parameters(), cfg, torch.device("cpu"), frozenset(text_encoder_param_ids(model)))
    assert [g["lr"] for g in opt.param_groups] == [cfg.train.lr, 0.5]
    assert len(opt.param_groups[1]["params"]) == len(list(c.text_encoder.parameters()))


@pytest.mark.parametrize("override, words", [
    (["train.lora.text_encoder=true"], "rank > 0"),
    (["train.lora.rank=-1"], "train.lora.rank"),
    (["model.original_config=/nonexistent.yaml"], "does not exist"),
])
def test_bad_interop_config_is_one_sentence(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, override)


def test_bad_files_and_arguments_are_one_sentence(tmp_path, capsys):
    from colodiffusion.cli import main

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="not a readable"):
        read_checkpoint(junk)
    for args in (["export", str(junk), "--format", "diffusers", "--out", str(tmp_path / "o")],
                 ["export", str(tmp_path), "--format", "single-file", "--out", str(tmp_path / "o.bin")],
                 ["export", str(tmp_path / "missing"), "--format", "lora", "--out", str(tmp_path / "o")]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.startswith("error: ")


# -- checkpoints as they are, and per-epoch models (kohya's save_every_n_epochs) -------------------------

@pytest.mark.slow
def test_sample_and_txt2img_take_a_checkpoint_folder(finetuned, tmp_path):
    """A checkpoints/step_N folder is a model: its pipeline holds the EMA weights final/ holds (both are
    step 2's), `sample` writes images from it, and txt2img takes it as --ckpt."""
    from colodiffusion.cli import main
    from colodiffusion.generate import load_pipeline

    ckpt = finetuned / "checkpoints" / "step_00000002"
    pipe = load_pipeline(ckpt)
    assert_same(load_file(finetuned / "final" / "unet" / "diffusion_pytorch_model.safetensors"), pipe.unet.state_dict(),
                "EMA UNet")
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "sample",
                str(ckpt),
                "--prompt",
                "a red circle",
                "--n-samples",
                "1",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "s"),
            ]
        )
    assert exit_.value.code == 0 and (tmp_path / "s" / "00000.png").exists()
    with pytest.raises(SystemExit):  # the same weights through final/: the same image, sampler included
        main(["sample", str(finetuned / "final"), "--prompt", "a red circle", "--n-samples", "1", "--steps", "2",
              "--out", str(tmp_path / "f")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s" / "00000.png")),
                          np.asarray(Image.open(tmp_path / "f" / "00000.png")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "txt2img.py"),
            "--prompt",
            "a red circle",
            "--ckpt",
            str(ckpt),
            "--ddim_steps",
            "2",
            "--n_samples",
            "1",
            "--n_iter",
            "1",
            "--H",
            "32",
            "--W",
            "32",
            "--outdir",
            str(tmp_path / "t"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0 and len(list((tmp_path / "t" / "samples").glob("*.png"))) == 1, res.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("form", ["safetensors", "diffusers"])
def test_save_every_n_epochs_writes_models_inference_tools_load(tmp_path, form):
    """16 samples at batch 4: 4 steps an epoch. 8 steps with save_every_n_epochs=1 write the models of
    epochs 1 and 2; the second holds what final/ holds (EMA weights at step 8), the first does not."""
    run_dir = run(tmp_path / "run", "data.num_samples=16", "train.max_steps=8", "train.save_every_n_epochs=1",
                  f"train.save_model_as={form}")
    suffix = ".safetensors" if form == "safetensors" else ""
    models = sorted(p.name for p in (run_dir / "models").iterdir())
    assert models == [f"epoch_000001{suffix}", f"epoch_000002{suffix}"]
    final = load_model(run_dir / "final").unet.state_dict()
    assert_same(final, load_model(run_dir / "models" / f"epoch_000002{suffix}").unet.state_dict(), "epoch 2")
    first = load_model(run_dir / "models" / f"epoch_000001{suffix}").unet.state_dict()
    assert any(not torch.equal(first[k], final[k]) for k in final)
