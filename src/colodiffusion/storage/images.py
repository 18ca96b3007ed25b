"""Decoded images as a viewer shows them, for every reader of a user's image (training data, img2img).

A camera stores its orientation in EXIF instead of turning the pixels (phone photos stand on their
side without it), and 16-bit greyscale PNGs hold levels up to 65535, which Pillow's RGB conversion
clips to white: both are corrected here, so an image trains (and starts img2img) the way it looks.
"""

from __future__ import annotations

import numpy as np
from PIL import ExifTags, Image, ImageOps

TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) a camera stored instead of turning the pixels; 1 when there is none."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a malformed EXIF block: the pixels as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(img: Image.Image) -> Image.Image:
    """The image turned and mirrored as its EXIF orientation says (what every viewer shows)."""
    return ImageOps.exif_transpose(img) if orientation(img) != 1 else img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit greyscale (PNG) is scaled to 8 bits; Pillow's convert would clip it to white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        levels = np.asarray(img, dtype=np.float64) / 257.0  # 65535 -> 255
        img = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")
