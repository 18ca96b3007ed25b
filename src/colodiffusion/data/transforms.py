"""Decoding, filters and image transforms shared by every image source.

A source hands raw bytes (image, caption) and optional metadata to `ImageTransform.sample`, which
either returns `{"pixel_values", "caption"}` or raises `BadSample(reason)` (a corrupt input, skipped
and listed) or `Filtered(reason)` (a valid sample the filters reject, only counted). Randomness
(crop position, flips) comes from a generator seeded by (seed, epoch, index), so any worker on any
rank draws the same crop for the same sample and resume is exact.

For SDXL's micro-conditioning (`report_sizes`) a sample also says what was done to it: the image's
stored size before resizing (`original_size`, (h, w)) and the crop's top-left corner in the resized
image (`crop_top_left`, (top, left)); `size_conditioning` turns a batch of them into SDXL's time ids.
"""

from __future__ import annotations

import io
import math
from struct import error as struct_error
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from PIL import Image

from colodiffusion.storage.images import TURNED, orientation, to_rgb, upright

if TYPE_CHECKING:
    from colodiffusion.config import DataConfig

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# The formats training decodes (GIF: its first frame). Pillow knows ~40 more, some with a long record of
# decoder bugs and EPS, which it hands to Ghostscript: a file in any other format is a bad sample.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
MAX_TEXT_BYTES = 1 << 20  # a caption or metadata file larger than 1 MiB is not read (a bad sample)
# Magic bytes of things that are often saved with an image extension (error pages, JSON answers, PDFs).
_NOT_IMAGES = (b"<!doctype", b"<html", b"<?xml", b"{", b"[", b"%pdf", b"<head", b"<body")


class BadSample(Exception):
    """A corrupt input: skipped, counted by `reason` and listed in bad_samples.jsonl."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


class Filtered(Exception):
    """A readable sample that the configured filters reject: skipped and counted, not listed."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(data: Optional[bytes], max_pixels: int, draft_to=None) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> (RGB image, stored size), by content (the extension is not trusted). `draft_to(size)`
    may name a (w, h) the image is needed at: JPEG then decodes at 1/2, 1/4 or 1/8 scale when it is
    that much larger (libjpeg DCT scaling), which is most of the decode time saved."""
    if data is None:
        raise BadSample("missing_image")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        kind = type(data).__name__
        raise BadSample("wrong_type", f"the image field holds a {kind} ({str(data)[:60]!r}), not image bytes")
    if len(data) == 0:
        raise BadSample("zero_byte")
    head = data[:64].lstrip().lower()
    if head.startswith(_NOT_IMAGES):
        raise BadSample("mislabelled", "the content is text/markup, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise Image.DecompressionBombError(f"{w}x{h} pixels is more than {max_pixels}")
            turned = orientation(img) in TURNED
            size = (h, w) if turned else (w, h)  # as the image is seen: a phone photo stands upright
            if draft_to is not None and img.format == "JPEG":
                dw, dh = draft_to(size)
                img.draft("RGB", (dh, dw) if turned else (dw, dh))
            img.load()
            return to_rgb(upright(img)), size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample("decompression_bomb", str(exc)[:200]) from None
    except Image.UnidentifiedImageError:
        raise BadSample("not_an_image", f"not one of the formats read ({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct_error) as exc:
        msg = str(exc)
        truncated = "truncated" in msg or "end of file" in msg.lower() or isinstance(exc, EOFError)
        raise BadSample("truncated" if truncated else "corrupt_image", msg[:200]) from None


def decode_caption(data: Optional[bytes | str]) -> str:
    if data is None:
        raise BadSample("missing_caption")
    if isinstance(data, str):
        return data.strip()
    if not isinstance(data, (bytes, bytearray)):
        raise BadSample("wrong_type", f"the caption field holds a {type(data).__name__}, not text")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadSample("caption_not_utf8") from None


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def resize_crop(img: Image.Image, width: int, height: int, rng: Optional[np.random.Generator]) -> Image.Image:
    """Scale so the image covers (width, height), then crop: centered, or at a random offset if rng."""
    return resize_crop_at(img, width, height, rng)[0]


def resize_crop_at(img: Image.Image, width: int, height: int,
                   rng: Optional[np.random.Generator]) -> tuple[Image.Image, int, int, int]:
    """`resize_crop`, also returning the crop's (top, left) in the resized image and that image's width."""
    w, h = img.size
    s = max(width / w, height / h)
    nw, nh = max(width, round(w * s)), max(height, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    if rng is None:
        left, top = (nw - width) // 2, (nh - height) // 2
    else:
        left, top = int(rng.integers(0, nw - width + 1)), int(rng.integers(0, nh - height + 1))
    return img.crop((left, top, left + width, top + height)), top, left, nw


def buckets(resolution: int, max_aspect: float, step: int = 64) -> list[tuple[int, int]]:
    """(width, height) pairs of about resolution**2 pixels, sides multiples of `step`, aspect <= max_aspect."""
    out = set()
    area = resolution * resolution
    w = step
    while w <= resolution * max_aspect:
        h = max(step, int(area / w) // step * step)
        if max(w / h, h / w) <= max_aspect + 1e-6:
            out.update({(w, h), (h, w)})  # landscape and portrait
        w += step
    out.add((resolution, resolution))
    return sorted(out)


def nearest_bucket(size: tuple[int, int], choices: list[tuple[int, int]]) -> tuple[int, int]:
    ar = math.log(size[0] / size[1])
    return min(choices, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


@dataclass
class ImageTransform:
    """What every image source does to a decoded sample (configured from `data.*`)."""
    resolution: int = 64
    crop: str = "center"  # center | random
    random_flip: bool = False
    min_size: int = 0
    max_aspect: float = 0.0  # 0: no aspect filter
    max_punsafe: Optional[float] = None
    max_pwatermark: Optional[float] = None
    max_image_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485
    bucket_list: Optional[list] = None  # aspect-ratio buckets, or None for square crops
    seed: int = 0
    report_sizes: bool = False  # add original_size and crop_top_left (SDXL's micro-conditioning)

    @property
    def max_image_bytes(self) -> int:
        """Files above this size are not read into memory: an uncompressed RGBA image of max_image_pixels
        plus 1 MiB of metadata is the most any accepted format can need."""
        return 4 * self.max_image_pixels + (1 << 20)

    @classmethod
    def of(cls, d: DataConfig, seed: int, report_sizes: bool = False) -> "ImageTransform":
        """From data.* (a DataConfig), seeded by train.seed; `report_sizes` for SDXL's micro-conditioning."""
        return cls(d.resolution, d.crop, d.random_flip, d.min_size, d.max_aspect, d.max_punsafe, d.max_pwatermark,
                   d.max_image_pixels, buckets(d.resolution, d.bucket_max_aspect) if d.bucketing else None,
                   seed, report_sizes=report_sizes)

    def check_meta(self, meta: Optional[dict]) -> None:
        """Metadata filters (img2dataset/LAION columns), applied before decoding."""
        if not isinstance(meta, dict):  # metadata is optional: a list or number only disables the filters
            return
        for key, limit in (("punsafe", self.max_punsafe), ("pwatermark", self.max_pwatermark)):
            value = meta.get(key)
            if limit is not None and isinstance(value, (int, float)) and value > limit:
                raise Filtered(key)

    def check_size(self, w: int, h: int) -> None:
        if min(w, h) < self.min_size:
            raise Filtered("min_size")
        if self.max_aspect and max(w / h, h / w) > self.max_aspect:
            raise Filtered("aspect")

    def target(self, size: tuple[int, int]) -> tuple[int, int]:
        return nearest_bucket(size, self.bucket_list) if self.bucket_list else (self.resolution, self.resolution)

    def sample(self, image: Optional[bytes], caption: Optional[bytes | str], meta: Optional[dict],
               epoch: int, index: int, target: Optional[tuple[int, int]] = None) -> dict[str, Any]:
        self.check_meta(meta)
        text = decode_caption(caption)
        img, size = decode_image(image, self.max_image_pixels, draft_to=lambda s: target or self.target(s))
        self.check_size(*size)
        rng = sample_rng(self.seed, epoch, index)
        w, h = target or self.target(size)
        img, top, left, resized_w = resize_crop_at(img, w, h, rng if self.crop == "random" else None)
        x = to_tensor(img)
        if self.random_flip and rng.random() < 0.5:
            x = x.flip(-1)
            left = resized_w - left - w  # the crop's place in the mirrored image
        out = {"pixel_values": x, "caption": text}
        if self.report_sizes:
            out.update(original_size=torch.tensor([size[1], size[0]]), crop_top_left=torch.tensor([top, left]))
        return out


def size_conditioning(batch: dict[str, Any]) -> torch.Tensor:
    """(B, 6) float SDXL time ids of a collated batch: original (h, w), crop (top, left), target (h, w).
    A source that reports no sizes (the shapes data, drawn at the training size) gives original = target
    and no crop, as the SDXL pipeline assumes when sampling."""
    B, _, H, W = batch["pixel_values"].shape
    target = torch.tensor([[H, W]]).repeat(B, 1)
    original = batch.get("original_size", target)
    crop = batch.get("crop_top_left", torch.zeros(B, 2, dtype=torch.long))
    return torch.cat([original, crop, target], dim=1).float()

