"""A resumable, rank-sharded loader.

The sample order is a pure function of (seed, epoch): a seeded permutation, dealt round-robin to
the data-parallel ranks so that their slices are disjoint. The loader counts the samples it has
*handed out* (not the ones workers prefetched), so its `state_dict` is the exact position to
continue from mid-epoch.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def rank_indices(n: int, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool = True) -> list[int]:
    """This rank's indices for the epoch: disjoint across ranks, together the first
    n - n % world_size samples of the permutation (each rank gets the same count)."""
    order = epoch_order(n, seed, epoch, shuffle)
    usable = n - n % world_size
    return order[:usable][rank::world_size].tolist()


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "caption": [s["caption"] for s in samples],
    }


class ResumableLoader:
    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, shuffle: bool = True, collate_fn: Callable = collate):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.num_workers, self.shuffle = rank, world_size, num_workers, shuffle
        self.collate_fn = collate_fn
        self.epoch, self.consumed = 0, 0  # consumed: samples of this epoch handed out on this rank
        self._it: Optional[Any] = None
        if len(dataset) // world_size < batch_size:
            raise ValueError(
                f"the dataset has {len(dataset)} samples, fewer than one batch of {batch_size} per rank "
                f"on {world_size} rank(s)"
            )

    def _start(self):
        idx = rank_indices(len(self.dataset), self.seed, self.epoch, self.rank, self.world_size, self.shuffle)
        idx = idx[: len(idx) - len(idx) % self.batch_size][self.consumed:]  # whole batches only
        # Own generator: DataLoader draws its worker base seed from it, not from the global RNG
        # (a resume starts an iterator mid-epoch, which would otherwise shift the global stream).
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self._it = iter(DataLoader(self.dataset, batch_size=self.batch_size, sampler=idx,
                                   num_workers=self.num_workers, collate_fn=self.collate_fn,
                                   persistent_workers=False, generator=gen))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.consumed = self.epoch + 1, 0
            self._start()
            batch = next(self._it)
        self.consumed += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._it = None
