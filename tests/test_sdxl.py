"""The sdxl preset at toy size: a tiny diffusers SDXL folder made in the test (tests/sdxlfolder.py) is
fine-tuned on folder data (fully and with LoRA), resumed bitwise, sampled, evaluated and exported, and
its conditioning is SDXL's: both encoders as the SDXL pipeline encodes them, captions dropped for both
at once, and time ids that carry each image's original size and the crop the transform took."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from colodiffusion.config import ConfigError, load_config
from colodiffusion.train import loop

from common import run_cli

from common import crash_at
from datagen import make_folder, make_tiny_clip
from sdxlfolder import make_sdxl_folder

RES = 32  # pixels; 16x16 latents through the f2 VAE


@pytest.fixture(scope="module")
def xl(tmp_path_factory) -> dict:
    """{"data": a folder of 12 captioned images of three widths, "model": a tiny SDXL folder}."""
    root = tmp_path_factory.mktemp("sdxl")
    data = make_folder(root / "data", 12, resolution=RES)
    captions = [p.read_text() for p in sorted(data.glob("*.txt"))] + ["a red circle", "a blue square"]
    return {"data": data, "model": make_sdxl_folder(root / "model", captions)}


def xl_cfg(xl, run_dir, *extra, data=None):
    torch.set_num_threads(1)
    return load_config(None, [
        f"run.dir={run_dir}", "model.preset=sdxl", f"model.pretrained={xl['model']}", "data.source=folder",
        f"data.path={data or xl['data']}", f"data.resolution={RES}", "train.batch_size=4", "train.log_every=1",
        "train.sample_every=0", "train.warmup_steps=1", "train.lr=1e-3", "sample.steps=2", *extra])


def weights(run_dir: Path, step: int, name: str = "unet") -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / f"{name}.safetensors"))


# -- a whole run: train, resume, sample grids, validation loss, final/, sample, eval, export -------

@pytest.mark.slow
def test_sdxl_run_resumes_bitwise_samples_evaluates_and_exports(xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from colodiffusion.export import export

    common = ["train.max_steps=4", "train.checkpoint_every=2", "diffusion.caption_dropout=0.3", "data.crop=random",
              "data.random_flip=true", "data.val_fraction=0.2", "train.val_every=2", "train.sample_every=4"]
    a, b = tmp_path / "a", tmp_path / "b"
    loop.train(xl_cfg(xl, a, *common))

    with crash_at(2):
        loop.train(xl_cfg(xl, b, *common))
    loop.train(xl_cfg(xl, b, *common, "train.resume=auto"))
    for name in ("unet", "ema"):
        wa, wb = weights(a, 4, name), weights(b, 4, name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    base = load_file(str(xl["model"] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(base[k], weights(a, 4)[k]) for k in base)  # it trained

    metrics = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [2, 4]
    assert all(np.isfinite(m.get("loss", m.get("val_loss"))) for m in metrics)
    assert Image.open(a / "samples" / "step_00000004.png").text["parameters"]

    # final/ is an SDXL diffusers folder with the EMA weights
    pipe = StableDiffusionXLPipeline.from_pretrained(a / "final")
    assert json.loads((a / "final" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    ema = weights(a, 4, "ema")
    assert all(torch.equal(pipe.unet.state_dict()[k], ema[k]) for k in ema)
    image = pipe("a red circle", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, RES, RES, 3) and image.std() > 0

    # the commands: sample (final/ and a checkpoint, img2img), eval (validation loss), export
    done = run_cli("sample", a, "--prompt", "a red circle --n blue", "--n-samples", "2", "--steps", "2",
                   "--out", tmp_path / "s")
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "s" / "00001.png").size == (RES, RES)
    done = run_cli("sample", a / "checkpoints" / "step_00000004", "--prompt", "a blue square",
                   "--init-image", next(xl["data"].glob("*.png")), "--n-samples", "1", "--steps", "2",
                   "--out", tmp_path / "i2i")
    assert done.returncode == 0, done.stderr
    clip = make_tiny_clip(tmp_path / "clip")
    done = run_cli("eval", a, "--json", "--clip-model", clip, "--num-images", "2", "--steps", "2")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["scorer"] == "data" and np.isfinite(result["val_loss"]) and result["held_out"]
    assert np.isfinite(result["clip_score"])

    exported = export(a / "checkpoints" / "step_00000004", "diffusers", tmp_path / "exported", ema=True)
    again = StableDiffusionXLPipeline.from_pretrained(exported)
    assert all(torch.equal(again.unet.state_dict()[k], ema[k]) for k in ema)
    with pytest.raises(ConfigError, match="SDXL model: --format single-file"):
        export(a, "single-file", tmp_path / "m.safetensors")


@pytest.mark.slow
def test_sdxl_lora_trains_and_its_file_loads_in_the_sdxl_pipeline(xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    run = tmp_path / "lora"
    loop.train(xl_cfg(xl, run, "train.max_steps=2", "train.lora.rank=2", "train.lr=1e-2"))
    adapter = run / "lora" / "pytorch_lora_weights.safetensors"
    assert safe_open(str(adapter), "pt").metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    pipe = StableDiffusionXLPipeline.from_pretrained(xl["model"])
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(run / "lora")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    final = StableDiffusionXLPipeline.from_pretrained(run / "final").unet.state_dict()
    assert any(not torch.equal(before[k], fused[k]) for k in before)  # the adapter changes the base
    assert all(torch.allclose(fused[k], final[k], atol=1e-6) for k in final)  # final/ is the base with it merged


# -- conditioning ----------------------------------------------------------------------------------

def test_sdxl_context_is_the_pipelines_and_caption_dropout_drops_both_encoders(xl, tmp_path, monkeypatch):
    """What the UNet gets in a training step with caption dropout, against the SDXL pipeline's own encodings:
    a kept caption's row is its caption's (both encoders' penultimate layers concatenated, encoder 2's pooled
    projection); a dropped caption's row is the pipeline's unconditional input, "" through both encoders, in the
    encoder-1 half, the encoder-2 half and the pooled embedding alike."""
    from colodiffusion.generate import make_pipeline
    from colodiffusion.models import load_pretrained

    seen = []
    real_drop, real_call = loop.drop_captions, loop.unet_call

    def dropping(captions, p, generator):
        kept = real_drop(captions, p, generator)
        seen.append((list(captions), kept))
        return kept

    def calling(unet, x_t, t, context):
        seen.append(context)
        return real_call(unet, x_t, t, context)

    monkeypatch.setattr(loop, "drop_captions", dropping)
    monkeypatch.setattr(loop, "unet_call", calling)
    cfg = xl_cfg(xl, tmp_path / "run", "train.max_steps=1", "train.batch_size=8", "diffusion.caption_dropout=0.5",
                 "train.ema.enabled=false")
    loop.train(cfg)
    (captions, kept), ctx = seen[:2]
    dropped = [i for i, c in enumerate(kept) if c == ""]
    assert 0 < len(dropped) < len(kept) and all(kept[i] == captions[i] for i in range(len(kept)) if i not in dropped)

    comps = load_pretrained(cfg.model.pretrained, cfg.model, cfg.diffusion)
    pipe = make_pipeline(comps.tokenizer, comps.text_encoder, comps.vae, comps.unet, comps.noise_scheduler,
                         comps.tokenizer_2, comps.text_encoder_2)
    embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    empty, _, empty_pooled, _ = pipe.encode_prompt([""], device="cpu", do_classifier_free_guidance=False)
    hidden, text_embeds = ctx["encoder_hidden_states"], ctx["added_cond_kwargs"]["text_embeds"]
    w1 = comps.text_encoder.config.hidden_size

    def same(a, b):  # the step and this test may use other CPU kernels (thread counts): equal up to rounding
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    for i in range(len(captions)):
        if i not in dropped:
            assert same(hidden[i], embeds[i]) and same(text_embeds[i], pooled[i]), i
            continue
        for name, half in (("encoder 1", slice(0, w1)), ("encoder 2", slice(w1, None))):
            assert same(hidden[i, :, half], empty[0, :, half]), (i, name)
            assert not same(hidden[i, :, half], embeds[i, :, half]), (i, name)  # the caption's would differ
        assert same(text_embeds[i], empty_pooled[0]) and not same(text_embeds[i], pooled[i]), i


def gradient_folder(root: Path, widths: list[int]) -> Path:
    """Images RES high (so nothing is resized) whose red channel is 3 x the column index: any crop says
    where it was taken, and whether it was mirrored."""
    root.mkdir(parents=True)
    for w in widths:
        arr = np.zeros((RES, w, 3), np.uint8)
        arr[..., 0] = 3 * np.arange(w)[None, :]
        arr[..., 1] = 128
        Image.fromarray(arr).save(root / f"w{w}.png")
        (root / f"w{w}.txt").write_text(f"stripes w{w}")
    return root


def test_time_ids_reaching_the_unet_carry_the_crop_the_transform_took(xl, tmp_path, monkeypatch):
    widths = [40, 48, 56, 64, 72, 80]
    data = gradient_folder(tmp_path / "stripes", widths)
    seen = []  # (batch, time ids handed to the UNet) per training step
    real_sizes, real_call = loop.size_conditioning, loop.unet_call

    def sizes(batch):
        seen.append([batch])
        return real_sizes(batch)

    def call(unet, x_t, t, context):
        seen[-1].append(context["added_cond_kwargs"]["time_ids"].clone())
        return real_call(unet, x_t, t, context)

    monkeypatch.setattr(loop, "size_conditioning", sizes)
    monkeypatch.setattr(loop, "unet_call", call)
    loop.train(xl_cfg(xl, tmp_path / "run", "train.max_steps=3", "data.crop=random", "data.random_flip=true",
                      "train.batch_size=6", "diffusion.caption_dropout=0", "train.ema.enabled=false", data=data))
    assert len(seen) == 3
    lefts, flips = set(), set()
    for batch, time_ids in seen:
        red = torch.round((batch["pixel_values"][:, 0, 0, :2] + 1) * 127.5) / 3  # columns 0 and 1 of each crop
        for row, caption, (c0, c1) in zip(time_ids.tolist(), batch["caption"], red.tolist()):
            width = int(caption.split("w")[-1])
            mirrored = c1 < c0
            # unmirrored, column 0 is the crop's left edge; mirrored, it is its right edge, and the crop's
            # left in the mirrored image is width - 1 - that column
            left = width - 1 - c0 if mirrored else c0
            assert row == [RES, width, 0, left, RES, RES], (caption, mirrored)
            lefts.add(left)
            flips.add(mirrored)
    assert len(lefts) > 3 and flips == {True, False}  # crops were random and some were mirrored


def test_shapes_data_conditions_on_its_own_size(xl, tmp_path):
    from colodiffusion.data import build_dataset, dataset_args
    from colodiffusion.data.loader import collate
    from colodiffusion.data.transforms import size_conditioning

    cfg = xl_cfg(xl, tmp_path / "run", "data.source=shapes", "data.num_samples=4")
    batch = collate([build_dataset(*dataset_args(cfg))[i] for i in range(4)])
    assert "original_size" not in batch
    assert size_conditioning(batch).tolist() == [[RES, RES, 0, 0, RES, RES]] * 4


# -- what SDXL does not do here is refused at config load, in one sentence -------------------------

@pytest.mark.parametrize("extra, message", [
    (["model.pretrained=null"], "fine-tunes the UNet of model.pretrained"),
    (["model.init=scratch"], "model.init=scratch is not supported"),
    (["model.train_text_encoder=true"], "over frozen text encoders"),
    (["train.lora.rank=4", "train.lora.text_encoder=true"], "over frozen text encoders"),
    (["data.source=latents"], "data.source=latents is not supported"),
    (["train.save_every_n_epochs=1"], "use train.save_model_as=diffusers"),
    (["parallel.strategy=fsdp", "parallel.tp=2"], "parallel.tp is not supported"),
])
def test_sdxl_refuses_what_it_does_not_support(xl, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message) as exc:
        xl_cfg(xl, tmp_path / "run", *extra)
    assert str(exc.value).count(". ") == 0  # one sentence


def test_sdxl_preset_and_folder_must_agree(xl, tmp_path):
    sd = tmp_path / "sd"
    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        (sd / sub).mkdir(parents=True)
    with pytest.raises(ConfigError, match="has no text_encoder_2/, so it is not an SDXL folder"):
        load_config(None, ["model.preset=sdxl", f"model.pretrained={sd}"])
    with pytest.raises(ConfigError, match="is an SDXL folder .* set model.preset=sdxl"):
        load_config(None, ["model.preset=sd15", f"model.pretrained={xl['model']}"])
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    with pytest.raises(ConfigError, match="is a single file"):
        load_config(None, ["model.preset=sdxl", f"model.pretrained={single}"])
    partial = tmp_path / "partial"
    shutil.copytree(xl["model"], partial)
    shutil.rmtree(partial / "tokenizer_2")
    from colodiffusion.models import load_pretrained

    cfg = load_config(None, ["model.preset=sdxl", f"model.pretrained={partial}"])
    with pytest.raises(ConfigError, match="not a diffusers SDXL folder: it lacks tokenizer_2/"):
        load_pretrained(partial, cfg.model, cfg.diffusion)


def test_the_latent_cache_refuses_sdxl(xl, tmp_path):
    from colodiffusion.data.cache import build_cache

    def never(*_):
        raise AssertionError("nothing is built before the refusal")

    with pytest.raises(ConfigError, match="does not support model.preset=sdxl"):
        build_cache(xl_cfg(xl, tmp_path / "run"), tmp_path / "cache", never)
