"""The built-in synthetic "shapes" dataset.

Every image is a plain background with one filled shape (circle, square or
triangle) in one of four colours, plus a short English caption.  It is small
enough to train a tiny text-to-image diffusion model on a CPU in minutes, and
simple enough that a pixel-based judge (``colodiffusion.evaluate.judge``) can
check whether a generated image shows the prompted colour and shape.

Everything here is deterministic: item ``i`` of ``ShapesDataset(seed=s)`` is a
pure function of ``(s, i)`` (``numpy.random.default_rng([s, i])``), so any
worker, rank or process sees the same data without sharing state.

Held-out evaluation prompts (``eval_prompts``) use wordings and position
phrases that never occur in training captions, and seeds at or above
``EVAL_SEED_OFFSET``, which training item seeds never reach.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "COLORS",
    "SHAPES",
    "BACKGROUNDS",
    "TRAIN_TEMPLATES",
    "EVAL_TEMPLATES",
    "EVAL_SEED_OFFSET",
    "ShapeSpec",
    "render",
    "sample_spec",
    "size_word",
    "where_phrase",
    "caption",
    "eval_prompts",
    "caption_corpus",
    "ShapesDataset",
]

# RGB values.  Every colour is >= 138 (Euclidean, 0-255 scale) from every
# background and >= 186 from every other colour, so a pixel judge can tell
# them apart even on blurry, noisy samples.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "black": (15, 15, 15),
}

# Supersampling factor used by ``render`` for smooth (anti-aliased) edges.
_SUPERSAMPLE = 4

TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {color} {shape}",
    "{color} {shape}",
    "a {size_word} {color} {shape}",
    "a {color} {shape} on a {bg} background",
    "a {size_word} {color} {shape} on a {bg} background",
    "a drawing of a {color} {shape}",
    "a {color} {shape} {where}",
    "a {size_word} {color} {shape} {where} on a {bg} background",
)

# Position phrases used in training captions (see ``where_phrase``).
TRAIN_WHERE: tuple[str, ...] = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")

# Held-out wordings: none of these is a training template, and the corner
# phrases never occur in training captions.  The last four are further from
# training still: two name the colour after the shape (every training caption
# names it before), and all four use words no training caption contains
# ("that", "is", "colour", "this", "please", "exactly", "painted", "inside", ...).
EVAL_TEMPLATES: tuple[str, ...] = (
    "an image of one {color} {shape}",
    "one {color} {shape} in the top left corner",
    "a single {color} {shape}, plain background",
    "a picture showing a {color} {shape} in the bottom right corner",
    "a {shape} that is {color}",
    "the colour of this {shape} is {color}",
    "please draw exactly one {color} {shape} for me",
    "one {shape} painted {color} inside the frame",
)

# Training item seeds are always below this; eval seeds are at or above it.
# Shape sizes as fractions of the image side: large enough that a 32 px image still shows the
# corners that tell a square from a circle; "small" is the lower half of the range.
SIZE_RANGE = (0.35, 0.7)
SMALL_BELOW = 0.525

EVAL_SEED_OFFSET = 1_000_000_000


@dataclass(frozen=True)
class ShapeSpec:
    """One image, in pixel units at the resolution it was sampled for.

    ``(cx, cy)`` is the centre of the shape's ``size x size`` bounding box, in
    continuous image coordinates (the image spans ``[0, resolution]``).
    """

    shape: str
    color: str
    background: str
    size: int
    cx: int
    cy: int


def _check_spec(spec: ShapeSpec, resolution: int) -> None:
    if spec.shape not in SHAPES:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")
    if spec.color not in COLORS:
        raise ValueError(f"unknown colour {spec.color!r}; expected one of {tuple(COLORS)}")
    if spec.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {spec.background!r}; expected one of {tuple(BACKGROUNDS)}")
    half = spec.size / 2
    if spec.size <= 0 or min(spec.cx, spec.cy) - half < 0 or max(spec.cx, spec.cy) + half > resolution:
        raise ValueError(f"{spec} does not fit inside a {resolution}x{resolution} image")


def render(spec: ShapeSpec, resolution: int = 64) -> Image.Image:
    """Draw ``spec`` as an RGB image of ``resolution x resolution`` pixels.

    The shape occupies the box ``[cx - size/2, cx + size/2] x [cy - size/2,
    cy + size/2]``: a disk of diameter ``size``, an axis-aligned square of side
    ``size``, or an upward-pointing isosceles triangle with base and height
    ``size``.  It is drawn at 4x and downsampled with a box filter so edges
    are anti-aliased.
    """
    _check_spec(spec, resolution)
    s = _SUPERSAMPLE
    big = Image.new("RGB", (resolution * s, resolution * s), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(big)
    fill = COLORS[spec.color]
    # Continuous box in supersampled pixel units.  PIL treats end coordinates
    # (rectangles, ellipses and polygon vertices) as inclusive, hence ``- 1``.
    x0 = (spec.cx - spec.size / 2) * s
    y0 = (spec.cy - spec.size / 2) * s
    x1 = (spec.cx + spec.size / 2) * s
    y1 = (spec.cy + spec.size / 2) * s
    if spec.shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif spec.shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    else:  # triangle
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    return big.resize((resolution, resolution), Image.Resampling.BOX)


def sample_spec(rng: np.random.Generator, resolution: int = 64) -> ShapeSpec:
    """Draw a random spec: uniform shape, colour and background; size uniform
    in ``SIZE_RANGE * resolution`` (rounded); centre uniform over positions
    that leave at least a 1-pixel margin on every side."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = tuple(COLORS)[int(rng.integers(len(COLORS)))]
    background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    size = int(round(rng.uniform(SIZE_RANGE[0] * resolution, SIZE_RANGE[1] * resolution)))
    lo = math.ceil(1 + size / 2)
    hi = math.floor(resolution - 1 - size / 2)
    if hi < lo:
        raise ValueError(f"resolution {resolution} is too small for the shapes dataset")
    cx = int(rng.integers(lo, hi + 1))
    cy = int(rng.integers(lo, hi + 1))
    return ShapeSpec(shape, color, background, size, cx, cy)


def size_word(spec: ShapeSpec, resolution: int = 64) -> str:
    return "small" if spec.size < SMALL_BELOW * resolution else "large"


def where_phrase(spec: ShapeSpec, resolution: int = 64) -> str:
    """Coarse true position: the dominant offset of the centre from the image
    centre, or "in the middle" when both offsets are under ``resolution/8``."""
    dx = spec.cx - resolution / 2
    dy = spec.cy - resolution / 2
    if abs(dx) < resolution / 8 and abs(dy) < resolution / 8:
        return "in the middle"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def _fill(template: str, spec: ShapeSpec, resolution: int) -> str:
    return template.format(
        color=spec.color,
        shape=spec.shape,
        size_word=size_word(spec, resolution),
        bg=spec.background,
        where=where_phrase(spec, resolution),
    )


def caption(spec: ShapeSpec, rng: np.random.Generator, resolution: int = 64) -> str:
    """A training caption for ``spec``, with the template chosen by ``rng``."""
    template = TRAIN_TEMPLATES[int(rng.integers(len(TRAIN_TEMPLATES)))]
    return _fill(template, spec, resolution)


def eval_prompts(per_combo: int = 8) -> list[dict]:
    """Held-out prompts: ``per_combo`` entries for every colour x shape pair
    (sorted), cycling through ``EVAL_TEMPLATES``.  Each entry is
    ``dict(prompt, color, shape, seed)`` with a unique ``seed >= EVAL_SEED_OFFSET``.
    """
    if per_combo < 0:
        raise ValueError("per_combo must be >= 0")
    out: list[dict] = []
    k = 0
    for color in sorted(COLORS):
        for shape in sorted(SHAPES):
            for _ in range(per_combo):
                template = EVAL_TEMPLATES[k % len(EVAL_TEMPLATES)]
                out.append(
                    dict(
                        prompt=template.format(color=color, shape=shape),
                        color=color,
                        shape=shape,
                        seed=EVAL_SEED_OFFSET + k,
                    )
                )
                k += 1
    return out


def caption_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Text to train the tiny model's tokenizer on.

    ``n`` training captions of random specs, then every training template
    filled so that every colour, shape, size word, background and position
    phrase appears at least once, then every eval template filled for every
    colour x shape, so the tokenizer knows every word it will be prompted with.
    """
    rng = np.random.default_rng([seed, EVAL_SEED_OFFSET])  # distinct from item streams
    corpus = []
    for _ in range(n):
        spec = sample_spec(rng)
        corpus.append(caption(spec, rng))
    colors, bgs = sorted(COLORS), sorted(BACKGROUNDS)
    sizes = ("small", "large")
    m = max(len(colors), len(SHAPES), len(bgs), len(sizes), len(TRAIN_WHERE))
    for template in TRAIN_TEMPLATES:
        for j in range(m):
            corpus.append(
                template.format(
                    color=colors[j % len(colors)],
                    shape=SHAPES[j % len(SHAPES)],
                    size_word=sizes[j % len(sizes)],
                    bg=bgs[j % len(bgs)],
                    where=TRAIN_WHERE[j % len(TRAIN_WHERE)],
                )
            )
    for template in EVAL_TEMPLATES:
        for color in colors:
            for shape in SHAPES:
                corpus.append(template.format(color=color, shape=shape))
    return corpus


class ShapesDataset(torch.utils.data.Dataset):
    """``num_samples`` (image, caption) pairs; item ``i`` depends only on
    ``(seed, i)``.  Items are ``{"pixel_values": float32 (3, H, W) in [-1, 1],
    "caption": str}``."""

    def __init__(self, num_samples: int, resolution: int = 64, seed: int = 0):
        if num_samples < 0:
            raise ValueError("num_samples must be >= 0")
        if not 0 <= seed < EVAL_SEED_OFFSET:
            raise ValueError(f"training seed must be in [0, {EVAL_SEED_OFFSET})")
        self.num_samples = int(num_samples)
        self.resolution = int(resolution)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, i) -> np.random.Generator:
        i = operator.index(i)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for ShapesDataset of length {self.num_samples}")
        return np.random.default_rng([self.seed, i])

    def spec(self, i) -> ShapeSpec:
        return sample_spec(self._rng(i), self.resolution)

    def _drawn(self, i) -> tuple[ShapeSpec, str]:
        """Item i's shape and caption (its image is rendered from the shape alone)."""
        rng = self._rng(i)
        spec = sample_spec(rng, self.resolution)
        return spec, caption(spec, rng, self.resolution)

    def caption_at(self, i) -> str:
        """Item i's caption without rendering its image."""
        return self._drawn(i)[1]

    def __getitem__(self, i) -> dict:
        spec, text = self._drawn(i)
        arr = np.asarray(render(spec, self.resolution), dtype=np.float32)
        pixels = torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()
        return {"pixel_values": pixels, "caption": text}
