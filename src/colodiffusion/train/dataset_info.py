"""What the trainer learns about its data before the first step: said once, and recorded.

`fit_batch`: a dataset smaller than one batch (20 images and the default batch of 32, or 12 images and
the first stage's 16) trains with the largest batch it fills, and one line says so, instead of refusing to start.
`report`: the share of caption words the tokenizer splits into more than `MAX_PIECES` pieces (words
the text encoder barely knows), and RUN_DIR/run_info.json, the facts about the data that an exported
model's metadata records (`export` writes them as kohya's `ss_*` keys).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from colodiffusion.config import Config
from colodiffusion.data.transforms import BadSample, decode_caption
from colodiffusion.models.tokenizer import MAX_PIECES, coverage

RUN_INFO = "run_info.json"
CAPTION_SAMPLE = 512  # captions read for the report: all of a small dataset, an even spread of a large one


def fit_batch(cfg: Config, backend, dataset) -> None:
    """Lower train.batch_size to what the dataset fills when it holds less than one micro-batch per rank
    (the autoencoder's batch: first_stage.first_stage_batch)."""
    train = cfg.train
    micro = len(dataset) // backend.dp_size  # the most samples one rank can take per micro-batch
    if micro < 1 or micro >= train.batch_size // backend.dp_size // train.grad_accum:
        return  # it fits, or nothing can fit (the preflight says so)
    batch = micro * backend.dp_size * train.grad_accum
    if backend.is_main:
        print(f"the dataset has {len(dataset)} samples, fewer than train.batch_size={train.batch_size}: training with "
              f"train.batch_size={batch} (every sample once per micro-batch); set train.batch_size to choose another")
    train.batch_size = batch


def sample_captions(dataset, limit: int = CAPTION_SAMPLE, skip: frozenset = frozenset()) -> tuple[list[str], bool]:
    """Up to `limit` captions spread evenly over the dataset (none of the indices in `skip`), and
    whether they are all of them."""
    n = len(dataset)
    indices = range(n) if n <= limit else [i * n // limit for i in range(limit)]
    captions = []
    for i in (i for i in indices if i not in skip):
        try:
            captions.append(decode_caption(dataset.raw(i)[1]) if hasattr(dataset, "raw") else dataset[i]["caption"])
        except BadSample:  # the loader skips and counts it
            continue
    return captions, n <= limit


def coverage_line(tokenizer, captions: list[str], complete: bool) -> str:
    total, split, pieces = coverage(tokenizer, captions)
    share = sum(split.values()) / max(1, total)
    where = "the captions" if complete else f"{len(captions)} captions spread over the data"
    line = f"tokenizer: {share:.0%} of the {total} words in {where} are split into more than {MAX_PIECES} pieces"
    if split:
        line += ", e.g. " + ", ".join(f"'{w}' ({pieces[w]})" for w, _ in split.most_common(3))
    if share > 0.05:
        line += ("; the text encoder learns such words slowly: fine-tune it too (model.train_text_encoder=true) "
                 "or caption with words it knows")
    return line


def report(cfg: Config, backend, dataset, tokenizer, run_dir: Path, bad: frozenset = frozenset()) -> None:
    """Print the tokenizer's coverage of the captions and write run_info.json (main rank only); the
    samples known to be bad (`bad`: their indices) count neither as training images nor as captions."""
    if not backend.is_main:
        return
    captions, complete = sample_captions(dataset, skip=bad)
    print(coverage_line(tokenizer, captions, complete))
    previous = read_run_info(run_dir) if cfg.train.resume else None
    tags = Counter(tag.strip() for c in captions for tag in c.split(",") if tag.strip())
    info = {
        "started_at": (previous or {}).get("started_at", round(time.time())),
        "num_train_images": len(dataset) - len(bad),
        "batch_size": cfg.train.batch_size,
        "dp_size": backend.dp_size,
        "data_dir": Path(cfg.data.path).name if cfg.data.path else cfg.data.source,
        "tag_frequency": dict(tags.most_common()) if complete else None,  # partial counts would mislead
    }
    tmp = run_dir / f".{RUN_INFO}.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, run_dir / RUN_INFO)


def read_run_info(run_dir: Path) -> Optional[dict]:
    try:
        info = json.loads((Path(run_dir) / RUN_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None
