"""Caption dropout, so one model learns both the conditional and the unconditional prediction
that classifier-free guidance mixes at sampling time."""

from __future__ import annotations

import torch


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" with probability p (draws from `generator` even when p == 0,
    so the RNG stream does not depend on the dropout setting)."""
    keep = torch.rand(len(captions), generator=generator, device=generator.device) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]
