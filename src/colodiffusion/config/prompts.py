"""Sample prompts: kohya-style inline options ('a dog --n blurry --s 30') and their checks.

Sampler names live here so that command-line parsers know them without importing torch or diffusers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from colodiffusion.config.errors import ConfigError

# Kept here so that command-line parsers know them without importing torch or diffusers.
SAMPLER_NAMES = ("ddim", "dpm++", "euler", "euler_a", "pndm")
KARRAS_SAMPLERS = ("dpm++", "euler")
"""The samplers that take Karras sigmas (the k-diffusion noise levels)."""



@dataclass
class PromptSpec:
    """One sample prompt and its settings (after `SampleConfig.specs`, none is left None)."""
    prompt: str
    negative_prompt: Optional[str] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    seed: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None
    sampler: Optional[str] = None
    karras: Optional[bool] = None
    init_image: Optional[str] = None
    strength: Optional[float] = None


# kohya sd-scripts' inline prompt options (its sample prompt files), plus Karras sigmas and img2img.
PROMPT_OPTIONS = {"n": ("negative_prompt", str), "s": ("steps", int), "l": ("guidance", float), "d": ("seed", int),
                  "w": ("width", int), "h": ("height", int), "ss": ("sampler", str), "karras": ("karras", bool),
                  "i": ("init_image", str), "strength": ("strength", float)}


def parse_prompt(text: str) -> PromptSpec:
    """'a dog --n blurry --s 30' -> PromptSpec('a dog', negative_prompt='blurry', steps=30); one
    ConfigError sentence for an unknown option or a bad value."""
    head, *options = text.split(" --")
    spec = PromptSpec(head.strip())
    for option in options:
        name, _, value = option.strip().partition(" ")
        value = value.strip()
        if name not in PROMPT_OPTIONS:
            allowed = ", ".join("--" + k for k in PROMPT_OPTIONS)
            raise ConfigError(f"prompt '{text}' has an unknown option '--{name}'; the options are: {allowed}.")
        attr, kind = PROMPT_OPTIONS[name]
        if kind is bool:
            if value:
                raise ConfigError(f"prompt '{text}': --{name} takes no value (it was given '{value}').")
            setattr(spec, attr, True)
            continue
        try:
            setattr(spec, attr, kind(value))
        except ValueError:
            what = {int: "a whole number", float: "a number"}.get(kind, "a value")
            raise ConfigError(f"prompt '{text}': --{name} needs {what}, not '{value}'.") from None
    return spec


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """The prompts of a kohya-style prompt file: one per line, each with its own options
    ('a dog --n blurry --s 30'); blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"prompt file '{path}' does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"prompt file '{path}' cannot be read as UTF-8 text ({exc}).") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"prompt file '{path}' holds no prompt (one per line; # starts a comment).")
    return prompts


def multiples_of_8(v: int) -> str:
    """The nearest image sides the pipeline accepts, for a message: '24 or 32'."""
    below, above = v - v % 8, v - v % 8 + 8
    return f"{below} or {above}" if below >= 8 else str(above)


def check_prompt(spec: PromptSpec, where: str) -> None:
    """One sentence for a setting no sampler can use (`where` names the prompt or the flags)."""
    problem = _prompt_problem(spec)
    if problem:
        raise ConfigError(f"{where}: {problem}.")


def _prompt_problem(s: PromptSpec) -> Optional[str]:
    if s.steps is not None and s.steps < 1:
        return f"steps must be at least 1 (got {s.steps})"
    if s.sampler is not None and s.sampler not in SAMPLER_NAMES:
        return f"sampler '{s.sampler}' is not one of {', '.join(SAMPLER_NAMES)}"
    if s.karras and s.sampler not in KARRAS_SAMPLERS:
        return f"Karras sigmas need a k-sampler ({', '.join(KARRAS_SAMPLERS)}), not '{s.sampler}'"
    for side in ("width", "height"):
        v = getattr(s, side)
        if v is not None and (v < 8 or v % 8):
            return f"{side} {v} is not a multiple of 8; use {multiples_of_8(v)}"
    if s.strength is not None and not 0 < s.strength <= 1:
        return f"strength must be in (0, 1] (got {s.strength})"
    if s.strength is not None and s.init_image is None:
        return "strength needs an init image (--i PATH)"
    if s.init_image is not None and not Path(s.init_image).is_file():
        return f"init image '{s.init_image}' is not a file"
    return None
