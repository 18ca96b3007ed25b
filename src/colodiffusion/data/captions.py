"""Caption tag controls (kohya sd-scripts' shuffle_caption, keep_tokens, caption_tag_dropout_rate).

A caption is read as comma-separated tags ("sks dog, on a beach, sunset"). The first `keep` tags stay
in front and are never dropped (a trigger word keeps its place); the others are dropped with
probability `dropout` and shuffled, so the model does not learn tag order or lean on one tag. The
random draws come from a generator seeded by (seed, epoch, sample), so resume is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

SEPARATOR = ","


@dataclass(frozen=True)
class CaptionTags:
    shuffle: bool = False
    keep: int = 0
    dropout: float = 0.0

    @classmethod
    def of(cls, options) -> Optional["CaptionTags"]:
        """From data.* or one of data.subsets (shuffle_caption, keep_tokens, tag_dropout); None: captions as written."""
        o = options
        return cls(o.shuffle_caption, o.keep_tokens, o.tag_dropout) if o.shuffle_caption or o.tag_dropout else None

    def __call__(self, caption: str, rng: np.random.Generator) -> str:
        tags = [t.strip() for t in caption.split(SEPARATOR)]
        tags = [t for t in tags if t]
        kept, rest = tags[:self.keep], tags[self.keep:]
        if self.dropout:
            rest = [t for t, u in zip(rest, rng.random(len(rest))) if u >= self.dropout]
        if self.shuffle:
            rest = [rest[j] for j in rng.permutation(len(rest))]
        return f"{SEPARATOR} ".join(kept + rest)
