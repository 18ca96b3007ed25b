"""Sampling and diffusers-format export: everything a trained model is used through.

Images carry how they were made: a PNG's `parameters` text chunk holds prompt, negative prompt,
steps, sampler, CFG scale, seed, size and model in the format AUTOMATIC1111-style UIs read (and
show, or load back into their settings). Grids label each cell with its prompt and upscale small
images so that they can be looked at.

May import: `config`, `diffusion`, `storage`, `models`. The loop uses it for its sample grids; the
commands (`cli`, `export`, `evaluate`) for everything else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from diffusers import (DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from colodiffusion.config import ConfigError, PromptSpec, multiples_of_8
from colodiffusion.diffusion.samplers import explicit, make_sampler
from colodiffusion.models import bounds
from colodiffusion.models.loading import load_model
from colodiffusion.models.sdxl import is_sdxl_folder
from colodiffusion.storage.files import inside, match_umask
from colodiffusion.storage.images import to_rgb, upright

# Our sampler names as AUTOMATIC1111 writes them (with " Karras" appended for Karras sigmas).
A1111_SAMPLERS = {"ddim": "DDIM", "dpm++": "DPM++ 2M", "euler": "Euler", "euler_a": "Euler a", "pndm": "PLMS"}
INIT_IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "BMP"]


def make_pipeline(tokenizer, text_encoder, vae, unet, noise_scheduler, tokenizer_2=None,
                  text_encoder_2=None) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """SD's pipeline, or SDXL's when a second text encoder is given."""
    scheduler = DDIMScheduler.from_config(explicit(noise_scheduler.config), set_alpha_to_one=False)
    if text_encoder_2 is not None:
        # An empty negative prompt is encoded, not zeroed: training drops captions to "" (as diffusers'
        # SDXL script does), so that is the unconditional branch the model learns.
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=False,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def resolve_model_path(path: str | Path) -> Path:
    """A diffusers folder, or a run folder (whose final/ is used); single files are loaded by `load_pipeline`."""
    p = Path(path)
    if (p / "model_index.json").exists():
        return p
    if (p / "final" / "model_index.json").exists():
        if not inside(p / "final", p):  # a received run folder is read only inside itself
            raise ConfigError(f"'{p / 'final'}' is a link to a folder outside the run folder '{p}'; it is not read.")
        return p / "final"
    raise FileNotFoundError(f"'{p}' is neither a diffusers model folder nor a run folder with final/")


def load_pipeline(path: str | Path, device: Optional[torch.device] = None, dtype=None,
                  original_config: Optional[str] = None, tokenizer: Optional[str] = None) -> StableDiffusionPipeline:
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    p = Path(path)
    if (p / "model_index.json").exists() or (p / "final" / "model_index.json").exists():
        folder = resolve_model_path(p)
        bounds.check_model_folder(folder)  # links, code, sizes and seal, before diffusers reads a byte
        if is_sdxl_folder(folder):
            pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype, add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False)
    else:  # a single file (original_config: its YAML, if any), a checkpoint folder of any backend, or a
        # run folder without final/ (its newest checkpoint); checkpoints give their EMA when they have one
        m = load_model(p, ema=None, original_config=original_config, tokenizer=tokenizer)
        pipe = make_pipeline(m.tokenizer, m.text_encoder, m.vae, m.unet, m.noise_scheduler, m.tokenizer_2,
                             m.text_encoder_2).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def image_size(pipe: StableDiffusionPipeline, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
    """(height, width) to generate: a side left out is the model's own; a side that is not a multiple
    of 8 is refused (diffusers would otherwise fall back to the model's size without a word)."""
    size = pipe.unet.config.sample_size
    default = (size if isinstance(size, int) else size[0]) * pipe.vae_scale_factor
    height, width = height or default, width or default
    for name, v in (("height", height), ("width", width)):
        if v < 8 or v % 8:
            raise ConfigError(f"{name} {v} is not a multiple of 8; use {multiples_of_8(v)} (the model's own is "
                              f"{default}).")
    return height, width


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25,
             guidance: float = 4.0, sampler: str = "ddim", height: Optional[int] = None,
             width: Optional[int] = None, batch_size: int = 64, negative_prompt: str | Sequence[str] = "",
             karras: bool = False, init_image: Optional[Image.Image] = None, strength: float = 0.75,
             eta: float = 0.0) -> list[Image.Image]:
    """One image per (prompt, seed); each image's noise comes from its own seeded generator, so an
    image does not depend on what else is in the batch. `negative_prompt`: one for all or one per
    prompt; `init_image` turns it into img2img (`strength` of noise added to it, 1 ignores it); `eta`:
    DDIM's eta (0: deterministic)."""
    height, width = image_size(pipe, height, width)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    pipe.scheduler = make_sampler(sampler, pipe.scheduler.config, karras)
    pipe.set_progress_bar_config(disable=True)
    run, extra = pipe, {"height": height, "width": width}
    if init_image is not None:
        run = img2img_pipeline(pipe)
        run.set_progress_bar_config(disable=True)
        extra = {"strength": strength}
        init_image = init_image.convert("RGB").resize((width, height), Image.LANCZOS)
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = list(prompts[i:i + batch_size]), seeds[i:i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in chunk_seeds]
        if init_image is not None:
            extra["image"] = [init_image] * len(chunk)
        out = run(chunk, negative_prompt=negatives[i:i + batch_size], num_inference_steps=steps,
                  guidance_scale=guidance, generator=gens, output_type="pil", eta=eta, **extra)
        images.extend(out.images)
    return images


def img2img_pipeline(pipe):
    """The img2img pipeline over `pipe`'s own modules (SD or SDXL)."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        return StableDiffusionXLImg2ImgPipeline(**pipe.components, force_zeros_for_empty_prompt=False,
                                                add_watermarker=False)
    return StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)


def load_init_image(path: str | Path) -> Image.Image:
    """An img2img start image (only common image formats are decoded; Pillow's size limit applies)."""
    try:
        with Image.open(path, formats=INIT_IMAGE_FORMATS) as img:
            img.load()
            return to_rgb(upright(img))  # as a viewer shows it (EXIF orientation), 16-bit scaled to 8
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"init image '{path}' cannot be read as PNG, JPEG, WEBP or BMP ({exc}).") from None


def render(pipe: StableDiffusionPipeline, specs: Sequence[PromptSpec], batch_size: int = 64,
           eta: float = 0.0) -> list[Image.Image]:
    """One image per filled-in spec (`SampleConfig.specs`), batched where their settings agree."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(specs):
        key = (s.steps, s.guidance, s.sampler, s.karras, s.height, s.width, s.init_image, s.strength)
        groups.setdefault(key, []).append(i)
    images: list[Optional[Image.Image]] = [None] * len(specs)
    for idx in groups.values():
        s = specs[idx[0]]
        init = load_init_image(s.init_image) if s.init_image else None
        out = generate(pipe, [specs[i].prompt for i in idx], [specs[i].seed for i in idx], steps=s.steps,
                       guidance=s.guidance, sampler=s.sampler, height=s.height, width=s.width, batch_size=batch_size,
                       negative_prompt=[specs[i].negative_prompt or "" for i in idx], karras=bool(s.karras),
                       init_image=init, strength=s.strength if s.strength is not None else 0.75, eta=eta)
        for i, img in zip(idx, out):
            images[i] = img
    return images


def _quote(value) -> str:
    """A1111's quoting: a value with a comma, colon or newline is written as a JSON string."""
    text = str(value)
    return json.dumps(text) if any(c in text for c in ",:\n") else text


def parameters_text(spec: PromptSpec, size: tuple[int, int], model: str) -> str:
    """The `parameters` text of AUTOMATIC1111 (prompt; "Negative prompt: ..."; "Steps: N, Sampler: ...")."""
    lines = [spec.prompt]
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    sampler = A1111_SAMPLERS.get(spec.sampler, spec.sampler) + (" Karras" if spec.karras else "")
    fields = [("Steps", spec.steps), ("Sampler", sampler), ("CFG scale", spec.guidance), ("Seed", spec.seed),
              ("Size", f"{size[0]}x{size[1]}"), ("Model", model)]
    if spec.init_image:
        fields.append(("Denoising strength", spec.strength))
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields))
    return "\n".join(lines)


def save_image(image: Image.Image, path: str | Path, spec: PromptSpec, model: str) -> None:
    info = PngInfo()
    info.add_text("parameters", parameters_text(spec, image.size, model))
    image.save(path, pnginfo=info)


def save_grid(images: Sequence[Image.Image], specs: Sequence[PromptSpec], path: str | Path, cols: int, model: str,
              min_cell: int = 256) -> Image.Image:
    """A labelled grid (returned); its `parameters` chunk is the first cell's (as UIs do), `prompts` lists
    every cell's."""
    grid = make_grid(images, cols, labels=[s.prompt for s in specs], min_cell=min_cell)
    info = PngInfo()
    cells = [parameters_text(s, img.size, model) for s, img in zip(specs, images)]
    info.add_text("parameters", cells[0])
    info.add_text("prompts", json.dumps(cells))
    grid.save(path, pnginfo=info)
    return grid


def make_grid(images: Sequence[Image.Image], cols: int, labels: Optional[Sequence[str]] = None,
              min_cell: int = 0) -> Image.Image:
    """Images in rows of `cols`. Images smaller than `min_cell` are enlarged by a whole factor (nearest
    neighbour: pixels stay sharp); each cell gets its label (up to 3 lines) in a band below it."""
    w, h = max(i.size[0] for i in images), max(i.size[1] for i in images)
    scale = max(1, -(-min_cell // max(w, h)))
    gap = 4 if labels else 0  # white space between labelled cells
    cw, ch = w * scale + gap, h * scale
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 3
    wrapped = [_wrap(text, font, cw - gap - 6) for text in labels] if labels else []
    band = line_h * max(map(len, wrapped)) + 6 + gap if wrapped else 0
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cw - gap, rows * (ch + band) - gap), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % cols) * cw, (i // cols) * (ch + band)
        grid.paste(img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST) if scale > 1 else img, (x, y))
        for k, line in enumerate(wrapped[i] if wrapped else ()):
            draw.text((x + 3, y + ch + 3 + k * line_h), line, fill="black", font=font)
    return grid


def _wrap(text: str, font, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than a line is cut, lines past the last elided."""
    words = []
    for word in text.split():
        while len(word) > 1 and font.getlength(word) > width:
            n = len(word) - 1
            while n > 1 and font.getlength(word[:n]) > width:
                n -= 1
            words.append(word[:n])
            word = word[n:]
        words.append(word)
    lines: list[str] = []
    for word in words:
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "..."]
    return lines or [""]


def export_diffusers(out_dir: Path, tokenizer, text_encoder, vae, unet, noise_scheduler, tokenizer_2=None,
                     text_encoder_2=None) -> Path:
    """Write a diffusers folder that `StableDiffusionPipeline.from_pretrained` loads (with a second text
    encoder, one that `StableDiffusionXLPipeline.from_pretrained` loads); files with the user's umask."""
    for tok in (tokenizer, tokenizer_2):
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:  # else tokenizer.json keeps the last call's padding (transformers sets it per call)
            backend.no_truncation()
            backend.no_padding()
    pipe = make_pipeline(tokenizer, text_encoder, vae, unet, noise_scheduler, tokenizer_2, text_encoder_2)
    pipe.save_pretrained(out_dir)
    out_dir = Path(out_dir)
    parts = [out_dir / name for name in pipe.components if (out_dir / name).is_dir()]
    for config in (d / "config.json" for d in parts):  # diffusers records where a model was loaded from:
        if config.is_file():                              # a local path of ours, meaningless to whoever gets it
            data = json.loads(config.read_text())
            if data.pop("_name_or_path", None) is not None:
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    match_umask([out_dir / "model_index.json", *(f for d in parts for f in d.rglob("*") if f.is_file())])
    return out_dir
