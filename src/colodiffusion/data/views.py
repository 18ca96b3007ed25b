"""Which samples a run trains and validates on: a held-out split, repeats, class images for prior
preservation and caption tag controls, as one index view over the sources.

`SampleView` is a list of parts, each (source, indices, loss weight): sample k of the view is sample
`indices[j]` of its part's source. Repeating an image is listing its index N times; the class images
of prior preservation are a second part whose samples carry `loss_weight` (the objective weights each
sample's loss by it). The view is a pure function of the config and the data, so every rank, worker and
resumed run sees the same samples in the same places. Nothing here is used unless a feature is on: the
default run trains on the source itself.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from torch.utils.data import Dataset

from colodiffusion.data.captions import CaptionTags
from colodiffusion.data.source import ImageSource
from colodiffusion.data.transforms import BadSample, Filtered, decode_caption

if TYPE_CHECKING:
    from colodiffusion.config import DataConfig

VAL_STREAM = 0x5A17  # the held-out split's own seed stream (independent of the epoch orders)


@dataclass
class Part:
    source: Dataset
    indices: list[int]
    loss_weight: Optional[float] = None  # None: samples carry no weight (the objective's plain mean)
    tags: Any = False  # this part's own CaptionTags (None: none); False: the view's


class SampleView(Dataset):
    def __init__(self, parts: list[Part], captions: Optional[CaptionTags] = None, seed: int = 0):
        self.parts, self.caption_tags, self.seed, self.epoch = parts, captions, seed, 0
        self.starts = np.cumsum([0] + [len(p.indices) for p in parts]).tolist()
        self.offsets = np.cumsum([0] + [len(p.source) for p in parts]).tolist()  # distinct ids per source
        first = parts[0].source
        self.name, self.path = getattr(first, "name", type(first).__name__), getattr(first, "path", "")
        self.index_bad = [r for p in parts for r in getattr(p.source, "index_bad", [])]
        if hasattr(first, "batch_extras"):
            self.batch_extras = first.batch_extras

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, k: int) -> tuple[int, int]:
        """(part number, index in that part's source) of sample k."""
        if not 0 <= k < len(self):
            raise IndexError(f"index {k} out of range for a view of {len(self)} samples")
        p = bisect_right(self.starts, k) - 1
        return p, self.parts[p].indices[k - self.starts[p]]

    def __getitem__(self, k: int) -> dict[str, Any]:
        p, i = self.locate(k)
        part = self.parts[p]
        sample = dict(part.source[i])
        if part.loss_weight is not None:
            sample["loss_weight"] = part.loss_weight
        tags = part.tags if part.tags is not False else self.caption_tags
        if tags is not None:
            rng = np.random.default_rng([self.seed, self.epoch, k, 1])  # not the crop/flip stream
            sample["caption"] = tags(sample["caption"], rng)
        return sample

    def key(self, k: int) -> str:
        p, i = self.locate(k)
        source = self.parts[p].source
        return source.key(i) if hasattr(source, "key") else str(i)

    def source_index(self, k: int) -> int:
        """One id per stored sample, the same for all its repeats: a bad file is counted and listed once."""
        p, i = self.locate(k)
        return self.offsets[p] + i

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for part in self.parts:
            if hasattr(part.source, "set_epoch"):
                part.source.set_epoch(epoch)

    @property
    def bucketing(self) -> bool:
        return any(getattr(p.source, "bucketing", False) for p in self.parts)

    def assign_buckets(self) -> list:
        out = []
        for part in self.parts:
            sizes = part.source.assign_buckets()
            out.extend(sizes[i] for i in part.indices)
        return out

    def captions(self):
        """Each stored sample's caption once (the tiny preset trains its tokenizer on them)."""
        for part in self.parts:
            for i in sorted(set(part.indices)):
                try:
                    yield caption_of(part.source, i)
                except (BadSample, Filtered):
                    continue

    def eval_item(self, k: int) -> dict[str, Any]:
        """Sample k as validation and `eval` read it: a square center crop at the training resolution,
        no flip, the caption as written (no tag shuffling or dropout). Raises BadSample / Filtered."""
        p, i = self.locate(k)
        source = self.parts[p].source
        if not isinstance(source, ImageSource):  # shapes, latent cache: already fixed per index
            return dict(source[i])
        plain = replace(source.transform, crop="center", random_flip=False, bucket_list=None)
        image, caption, meta = source.raw(i)
        return plain.sample(image, caption, meta, epoch=0, index=i)


def caption_of(dataset: Dataset, i: int) -> str:
    """Sample i's caption as stored, without decoding its image where the source allows."""
    if isinstance(dataset, SampleView):
        p, j = dataset.locate(i)
        return caption_of(dataset.parts[p].source, j)
    if isinstance(dataset, ImageSource):
        return decode_caption(dataset.raw(i)[1])
    return dataset[i]["caption"]


def held_out(n: int, fraction: float, seed: int) -> list[int]:
    """The indices data.val_fraction holds out: at least one, never all, chosen by the seed."""
    k = max(1, round(fraction * n))
    if k >= n:
        raise ValueError(f"data.val_fraction={fraction} would hold out all {n} samples; lower it or add data")
    return sorted(np.random.default_rng([seed, VAL_STREAM]).permutation(n)[:k].tolist())


def repeat_counts(dataset: Dataset) -> list[int]:
    counts = getattr(dataset, "repeat_counts", None)
    return counts() if counts is not None else [1] * len(dataset)


def expand(indices: list[int], counts: list[int], times: int) -> list[int]:
    return [i for i in indices for _ in range(counts[i] * times)]


def subset_parts(dataset: Dataset, indices: list[int], weight: Optional[float]) -> list[Part]:
    """The training indices as one part, or for several folders (data.subsets) one part per run of
    the same subset, each with that subset's caption tag options."""
    subset_of = getattr(dataset, "subset_of", None)
    if subset_of is None:
        return [Part(dataset, indices, weight)]
    parts: list[Part] = []
    for i in indices:
        sub = subset_of(i)
        if not parts or subset_of(parts[-1].indices[-1]) is not sub:
            parts.append(Part(dataset, [], weight, CaptionTags.of(sub)))
        parts[-1].indices.append(i)
    return parts


def training_view(d: DataConfig, seed: int, dataset: Dataset, val_indices: list[int],
                  class_source: Optional[Dataset]) -> Dataset:
    """The samples a run trains on (`d`: data.*, `seed`: train.seed): `dataset` itself unless a split,
    repeats, class images or caption controls are configured."""
    held = set(val_indices)
    indices = expand([i for i in range(len(dataset)) if i not in held], repeat_counts(dataset), d.repeats)
    parts = subset_parts(dataset, indices, 1.0 if class_source is not None else None)
    if class_source is not None:
        pool = expand(list(range(len(class_source))), repeat_counts(class_source), 1)
        if not pool:
            raise ValueError(f"data.class_path '{d.class_path}' holds no class images with a repeat count above 0")
        parts.append(Part(class_source, [pool[j % len(pool)] for j in range(len(indices))], d.prior_loss_weight))
    tags = CaptionTags.of(d)
    if len(parts) == 1 and tags is None and parts[0].tags is False and indices == list(range(len(dataset))):
        return dataset
    if not indices:
        raise ValueError(f"no training samples are left in data.path '{d.path}' (held out, or repeat count 0)")
    return SampleView(parts, tags, seed)


def sample_prompts(dataset: Dataset, n: int = 4, skip: frozenset = frozenset()) -> list[str]:
    """Up to n distinct non-empty captions spread over the (instance) training samples, none of the
    indices in `skip` (samples known to be bad: their captions describe nothing the model sees)."""
    if isinstance(dataset, SampleView):  # the instance parts come first; class images are another source
        size = sum(len(p.indices) for p in dataset.parts if p.source is dataset.parts[0].source)
    else:
        size = len(dataset)
    out: list[str] = []
    for j in range(n):
        start = j * size // n
        for k in range(start, min(size, start + 16)):  # the next few samples if this one is bad or a repeat
            if k in skip:
                continue
            try:
                text = caption_of(dataset, k)
            except (BadSample, Filtered):
                continue
            if text and text not in out:
                out.append(text)
                break
    return out
