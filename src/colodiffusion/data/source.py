"""The base of the image sources (folder, webdataset, parquet): raw bytes in, training sample out.

A source only knows how to find sample `i` (`key`, `raw`); decoding, filters and transforms are
`ImageTransform`'s. `bucket_sizes` (set by the loader when aspect-ratio bucketing is on) fixes the
output shape of every index, so a replacement for a bad sample has the shape of the slot it fills.
"""

from __future__ import annotations

import io
from typing import Any, Iterator, Optional

from PIL import Image
from torch.utils.data import Dataset

from colodiffusion.data.transforms import IMAGE_FORMATS, BadSample, ImageTransform, decode_caption
from colodiffusion.storage.images import TURNED, orientation


class ImageSource(Dataset):
    name = "source"

    def __init__(self, transform: ImageTransform, path: str = ""):
        self.transform = transform
        self.path = path  # data.path, for messages
        self.epoch = 0
        self.index_bad: list[dict] = []  # problems found while indexing (unreadable shards, ...)
        self.bucket_sizes: Optional[list] = None

    # -- what a subclass provides ---------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, i: int) -> str:
        raise NotImplementedError

    def raw(self, i: int) -> tuple[Optional[bytes], Optional[bytes | str], Optional[dict]]:
        """(image bytes, caption bytes or text, metadata dict); raises BadSample for unreadable storage."""
        raise NotImplementedError

    # -- shared behaviour -----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, caption, meta = self.raw(i)
        target = self.bucket_sizes[i] if self.bucket_sizes is not None else None
        return self.transform.sample(image, caption, meta, self.epoch, i, target=target)

    @property
    def bucketing(self) -> bool:
        return self.transform.bucket_list is not None

    def assign_buckets(self) -> list:
        """Fix every index's output (w, h) from its stored size; unreadable samples count as square."""
        square = (self.transform.resolution, self.transform.resolution)
        hints = (self.size_hint(i) for i in range(len(self)))
        self.bucket_sizes = [self.transform.target(h) if h else square for h in hints]
        return self.bucket_sizes

    def size_hint(self, i: int) -> Optional[tuple[int, int]]:
        """The stored image size without decoding pixels (header only); None if unreadable."""
        try:
            image, _, _ = self.raw(i)
            with Image.open(io.BytesIO(image), formats=IMAGE_FORMATS) as img:
                return img.size[::-1] if orientation(img) in TURNED else img.size  # as decode_image sees it
        except Exception:  # a bad sample: the loader treats it like a square image, then skips it
            return None

    def captions(self, limit: int = 50_000) -> Iterator[str]:
        """Captions for training the tiny preset's tokenizer (unreadable ones are left out)."""
        for i in range(min(len(self), limit)):
            try:
                yield decode_caption(self.raw(i)[1])
            except BadSample:
                continue
