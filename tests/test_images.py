"""Images people can use (issue 14, item 6 and "Sampling"): PNGs carry their prompt and settings in the
`parameters` text chunk AUTOMATIC1111-style UIs read; grids are labelled and small images enlarged;
negative prompts, Karras sigmas and img2img reach the sampler; exported files follow the umask.
A tiny pipeline with random weights is enough: these are contracts, not quality.
"""

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from colodiffusion.config import PromptSpec, load_config
from colodiffusion.diffusion import build_noise_scheduler, make_sampler
from colodiffusion.generate import (export_diffusers, generate, make_grid, make_pipeline, parameters_text, render,
                                    save_grid, save_image)

# The settings line as UIs split it: `Key: value` pairs, a value quoted when it holds a comma or colon.
FIELD = re.compile(r'\s*([\w][\w \-/]*): ("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def read_parameters(text: str) -> tuple[str, str, dict]:
    """(prompt, negative prompt, settings) from an A1111 `parameters` text."""
    *head, settings = text.split("\n")
    negative = next((line[len("Negative prompt: "):] for line in head if line.startswith("Negative prompt: ")), "")
    prompt = "\n".join(line for line in head if not line.startswith("Negative prompt: "))
    fields = {k: json.loads(v) if v.startswith('"') else v for k, v in FIELD.findall(settings)}
    return prompt, negative, fields


@pytest.fixture(scope="module")
def pipe(tiny_components):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from colodiffusion.models.presets import build_unet, get_preset

    torch.set_num_threads(1)  # tiny images: more threads only wait on each other (and on a busy machine)
    torch.manual_seed(0)
    cfg = load_config(None, [])
    p = make_pipeline(CLIPTokenizer.from_pretrained(tiny_components / "tokenizer"),
                      CLIPTextModel.from_pretrained(tiny_components / "text_encoder"),
                      AutoencoderKL.from_pretrained(tiny_components / "vae"), build_unet(get_preset("tiny")),
                      build_noise_scheduler(cfg.diffusion, "epsilon"))
    p.set_progress_bar_config(disable=True)
    return p


def spec(prompt="a red circle", **kw):
    base = dict(negative_prompt="", steps=2, guidance=3.0, seed=1, sampler="ddim", karras=False)
    return PromptSpec(prompt, **{**base, **kw})


# -- PNG metadata --------------------------------------------------------------------------------------

def test_png_parameters_read_back_as_a1111_writes_them(tmp_path):
    s = spec("a red circle, small", negative_prompt="blue, square", steps=30, guidance=7.5, seed=42,
             sampler="dpm++", karras=True)
    save_image(Image.new("RGB", (48, 32)), tmp_path / "a.png", s, "my model: v2")
    prompt, negative, fields = read_parameters(Image.open(tmp_path / "a.png").text["parameters"])
    assert (prompt, negative) == ("a red circle, small", "blue, square")
    assert fields == {"Steps": "30", "Sampler": "DPM++ 2M Karras", "CFG scale": "7.5", "Seed": "42",
                      "Size": "48x32", "Model": "my model: v2"}


def test_img2img_parameters_carry_the_denoising_strength():
    text = parameters_text(spec(init_image="start.png", strength=0.6), (32, 32), "m")
    assert read_parameters(text)[2]["Denoising strength"] == "0.6"
    assert "Negative prompt" not in parameters_text(spec(), (32, 32), "m")  # none given: no line, as A1111


# -- grids ---------------------------------------------------------------------------------------------

def test_grid_labels_each_cell_and_enlarges_small_images(tmp_path):
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    plain = make_grid(images, cols=3)
    assert plain.size == (96, 32)  # the old grid: no labels, no scaling
    labelled = make_grid(images, cols=3, labels=["a red circle", "a green square", "a blue triangle"], min_cell=128)
    cell = 128 + 4  # 4x nearest-neighbour enlargement and a gutter
    assert labelled.size[0] == 3 * cell - 4 and labelled.size[1] > 128
    arr = np.asarray(labelled)
    assert (arr[:128, :128] == [255, 0, 0]).all()  # the enlarged image, pixel for pixel
    band = arr[128:, :128]
    assert (band < 128).all(axis=2).any(), "no dark label pixels under the first cell"
    unlabeled = make_grid(images, cols=3, labels=["", "", ""], min_cell=128)
    assert not (np.asarray(unlabeled)[128:] < 128).all(axis=2).any()  # empty labels draw nothing: the ink is text


def test_grid_png_holds_every_cells_prompt(tmp_path):
    images = [Image.new("RGB", (32, 32)) for _ in range(2)]
    specs = [spec("a red circle", seed=0), spec("a blue square", seed=1, negative_prompt="red")]
    save_grid(images, specs, tmp_path / "g.png", cols=2, model="run")
    text = Image.open(tmp_path / "g.png").text
    assert read_parameters(text["parameters"])[0] == "a red circle"
    cells = [read_parameters(t) for t in json.loads(text["prompts"])]
    assert [(c[0], c[1], c[2]["Seed"]) for c in cells] == [("a red circle", "", "0"), ("a blue square", "red", "1")]


# -- sampling ------------------------------------------------------------------------------------------

def arrays(images):
    return [np.asarray(i, dtype=np.int16) for i in images]


def test_negative_prompt_reaches_the_sampler(pipe):
    base, none, neg = arrays(generate(pipe, ["a red circle"] * 3, [0, 0, 0], steps=2, guidance=5.0,
                                      negative_prompt=["", "", "a blue square"]))
    assert np.array_equal(base, none)
    assert np.abs(base - neg).max() > 0


def test_karras_sigmas_are_switched_on_and_off(pipe):
    plain = make_sampler("euler", pipe.scheduler.config)
    karras = make_sampler("euler", plain.config, karras=True)
    again = make_sampler("euler", karras.config)  # built from a Karras sampler's config: must not inherit it
    for s in (plain, karras, again):
        s.set_timesteps(8)
    assert not torch.allclose(plain.sigmas, karras.sigmas)
    assert torch.allclose(plain.sigmas, again.sigmas)
    with pytest.raises(ValueError, match="k-sampler"):
        make_sampler("ddim", pipe.scheduler.config, karras=True)


def test_img2img_starts_from_the_init_image(pipe):
    white, black = Image.new("RGB", (40, 40), "white"), Image.new("RGB", (40, 40), "black")
    a, b = (generate(pipe, ["a red circle"], [3], steps=4, init_image=img, strength=0.5, height=24, width=32)[0]
            for img in (white, black))
    assert a.size == b.size == (32, 24)  # resized to the requested size
    assert np.asarray(a, dtype=float).mean() > np.asarray(b, dtype=float).mean()


def test_render_applies_each_prompts_settings_and_batching_changes_nothing(pipe):
    specs = [spec(seed=0), spec(seed=0, steps=3), spec(seed=1), spec(seed=0, sampler="euler", karras=True)]
    together = arrays(render(pipe, specs))
    alone = [arrays(render(pipe, [s]))[0] for s in specs]
    # At most one 8-bit level apart: the tiny preset's pooled caption is a batched matmul whose float
    # rounding depends on the batch (measured: 1 level in one pixel); different settings move far more.
    assert all(np.abs(x - y).max() <= 1 for x, y in zip(together, alone))
    assert np.abs(together[0] - together[1]).max() > 1 and np.abs(together[0] - together[3]).max() > 1


# -- exported files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_exported_files_follow_the_umask(pipe, tmp_path, umask, mode):
    from colodiffusion.models.single_file import save_single_file

    old = os.umask(umask)
    try:
        folder = export_diffusers(tmp_path / "d", pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet,
                                  build_noise_scheduler(load_config(None, []).diffusion, "epsilon"))
        single = save_single_file(tmp_path / "m.safetensors", pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                  pipe.scheduler)
    finally:
        os.umask(old)
    files = [f for f in folder.rglob("*") if f.is_file()] + [single]
    assert any(f.suffix == ".safetensors" for f in files[:-1])
    assert {str(f): oct(f.stat().st_mode & 0o777) for f in files} == {str(f): oct(mode) for f in files}


def test_loading_a_model_warns_about_nothing(pipe, tmp_path):
    import warnings

    from colodiffusion.generate import load_pipeline

    folder = export_diffusers(tmp_path / "d", pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet,
                              build_noise_scheduler(load_config(None, []).diffusion, "epsilon"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every category, each time (diffusers' torch_dtype deprecation was one)
        load_pipeline(folder, device=torch.device("cpu"))
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
