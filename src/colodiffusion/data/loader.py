"""A resumable, rank-sharded loader.

The sample order is a pure function of (seed, epoch): a seeded permutation, dealt round-robin to
the data-parallel ranks so that their slices are disjoint. The loader counts the samples it has
*handed out* (not the ones workers prefetched), so its `state_dict` is the exact position to
continue from mid-epoch.

Bad samples never stop a run: `SkipBad` replaces a sample that fails to load by the next good index
(i+1, i+2, ... in dataset order, a pure function of the data), so batches keep their size and resume
stays exact. The failure travels back with the batch (workers cannot write the run's files); the
loader counts each bad sample once (by index, not once per epoch), appends it to `bad_log`
(RUN_DIR/bad_samples.jsonl) and stops the run with one sentence once clearly more than
`max_bad_fraction` of the distinct samples read were bad (`too_many_bad`). `probe` reads a spread
of samples the same way before training, so broken data is found before any compute is spent.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from colodiffusion.config import ConfigError
from colodiffusion.data.transforms import BadSample, Filtered
from colodiffusion.storage.files import loads_json

MAX_PROBE = 1024  # consecutive unreadable samples before a slot gives up
MIN_CHECKED = 256  # samples dealt before the bad-sample rate is judged (or one epoch, if shorter)


class AllBad(Exception):
    """MAX_PROBE samples in a row are bad: raised in a worker, turned into one sentence by the loader."""


def too_many_bad(bad: int, seen: int, limit: float) -> bool:
    """Whether `bad` of `seen` samples is more than a bad fraction of `limit` explains by chance: above
    the expected count by three standard deviations (a false alarm about once in 300 checks of data
    that is exactly at the limit), so a small sample such as the preflight probe is judged fairly."""
    expected = limit * seen
    return bad > expected + 3 * math.sqrt(expected * (1 - limit))


def epoch_order(
    n: int, seed: int, epoch: int, shuffle: bool = True, blocks: Optional[list[int]] = None
) -> torch.Tensor:
    """A seeded permutation; with `blocks` (sizes of consecutive runs: shards, row groups) the blocks
    are shuffled and then the samples within each, so reads stay local to one block at a time."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if not blocks:
        return torch.randperm(n, generator=g)
    starts = [0]
    for size in blocks[:-1]:
        starts.append(starts[-1] + size)
    parts = [
        starts[b] + torch.randperm(blocks[b], generator=g) for b in torch.randperm(len(blocks), generator=g).tolist()
    ]
    return torch.cat(parts)


def rank_indices(n: int, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool = True,
                 blocks: Optional[list[int]] = None) -> list[int]:
    """This rank's indices for the epoch: disjoint across ranks, together the first
    n - n % world_size samples of the permutation (each rank gets the same count)."""
    order = epoch_order(n, seed, epoch, shuffle, blocks)
    usable = n - n % world_size
    return order[:usable][rank::world_size].tolist()


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, list everything else; `_skips` (bad/filtered records) are gathered per batch."""
    out: dict[str, Any] = {}
    for k in samples[0]:
        values = [s[k] for s in samples]
        out[k] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class SkipBad(Dataset):
    """Item i, or if it is bad (or filtered) the next good index with the same bucket."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.epoch = 0
        self.groups: Optional[list] = None  # bucket per index (aspect-ratio bucketing), else None

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def record(self, i: int, exc: BadSample) -> dict:
        key = self.dataset.key(i) if hasattr(self.dataset, "key") else str(i)
        rec = {"source": getattr(self.dataset, "name", type(self.dataset).__name__), "key": key,
               "reason": exc.reason, "epoch": self.epoch}
        if exc.detail:
            rec["detail"] = exc.detail
        return rec

    def attempt(self, j: int) -> tuple[Optional[dict], Optional[dict], Optional[str]]:
        """(sample, None, None), or (None, bad record, None), or (None, None, filter name)."""
        try:
            return dict(self.dataset[j]), None, None
        except BadSample as exc:
            return None, self.record(j, exc), None
        except Filtered as exc:
            return None, None, exc.reason

    def __getitem__(self, i: int) -> dict[str, Any]:
        n, bad, filtered = len(self.dataset), [], {}
        for k in range(min(n, MAX_PROBE)):
            j = (i + k) % n
            if k and self.groups is not None and self.groups[j] != self.groups[i]:
                continue
            sample, rec, reason = self.attempt(j)
            if sample is not None:
                sample["_skips"] = (bad, filtered)
                return sample
            if k == 0:  # only the slot's own sample is reported: each bad sample once per epoch
                if rec is not None:  # (a repeated file has one source_index: it is counted once)
                    source_index = getattr(self.dataset, "source_index", None)
                    bad.append({**rec, "index": source_index(j) if source_index else j})
                else:
                    filtered[reason] = 1
        raise AllBad(f"{min(n, MAX_PROBE)} samples in a row from index {i} are unreadable or filtered out")


def probe(dataset: Dataset, n: int = 64) -> tuple[int, list[dict], Counter]:
    """Read `n` samples spread evenly over the dataset, skipping as the loader does:
    (samples read, bad records, filtered counts). Used by the preflight before any training."""
    skip = dataset if isinstance(dataset, SkipBad) else SkipBad(dataset)
    size, count = len(skip), min(n, len(skip))
    read, bad, filtered = 0, [], Counter()
    for j in (k * size // count for k in range(count)):
        sample, rec, reason = skip.attempt(j)
        read += sample is not None
        if rec is not None:
            bad.append({**rec, "index": j})
        elif reason is not None:
            filtered[reason] += 1
    return read, bad, filtered


class ResumableLoader:
    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, shuffle: bool = True, collate_fn: Callable = collate,
                 bad_log: Optional[str | Path] = None, max_bad_fraction: float = 1.0, block_shuffle: bool = False,
                 pin_memory: bool = False):
        """`pin_memory`: batches (and the dataset's batch extras) in page-locked memory, so the trainer's
        `.to(cuda, non_blocking=True)` copies overlap the GPU's work instead of waiting for it."""
        self.dataset = dataset if isinstance(dataset, SkipBad) else SkipBad(dataset)
        self.pin_memory = pin_memory
        self._extras: Optional[dict] = None
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.num_workers, self.shuffle = rank, world_size, num_workers, shuffle
        self.collate_fn = collate_fn
        self.epoch, self.consumed = 0, 0  # consumed: samples of this epoch handed out on this rank
        self._it: Optional[Any] = None
        self.bad_log, self.max_bad_fraction = (Path(bad_log) if bad_log else None), max_bad_fraction
        self.bad: Counter = Counter()  # distinct bad samples by reason (cumulative over the run)
        self.bad_indices: set[int] = set()  # which: a sample bad every epoch is counted and listed once
        self._listed_indices: Optional[set] = None  # indices bad_log lists, read once (see _listed)
        self.filtered: Counter = Counter()  # samples the filters rejected, by filter
        self.dealt = 0  # samples dealt on this rank over the run (bad ones included)
        sizes = getattr(dataset, "block_sizes", None)
        self.blocks = sizes() if block_shuffle and sizes is not None else None
        if len(dataset) // world_size < batch_size:
            raise ValueError(
                f"the dataset has {len(dataset)} samples, fewer than one batch of {batch_size} per rank "
                f"on {world_size} rank(s)"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of an epoch: whole batches only; with bucketing, each of one bucket."""
        idx = rank_indices(len(self.dataset), self.seed, epoch, self.rank, self.world_size, self.shuffle, self.blocks)
        groups, bs = self.dataset.groups, self.batch_size
        if groups is None:
            return [idx[k:k + bs] for k in range(0, len(idx) - len(idx) % bs, bs)]
        batches, queues = [], {}
        for i in idx:
            q = queues.setdefault(groups[i], [])
            q.append(i)
            if len(q) == bs:
                batches.append(q)
                queues[groups[i]] = []
        return batches

    def _start(self):
        source = self.dataset.dataset
        if getattr(source, "bucketing", False) and self.dataset.groups is None:
            self.dataset.groups = source.assign_buckets()
        if self.epoch == 0 and self.consumed == 0 and self.dealt == 0:
            self._account([(list(getattr(source, "index_bad", [])), {})])
        self.dataset.set_epoch(self.epoch)
        batches = self.epoch_batches(self.epoch)[self.consumed // self.batch_size:]
        # Own generator: DataLoader draws its worker base seed from it, not from the global RNG
        # (a resume starts an iterator mid-epoch, which would otherwise shift the global stream).
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self._it = iter(DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                                   collate_fn=self.collate_fn, persistent_workers=False, generator=gen,
                                   pin_memory=self.pin_memory))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            batch = self._next_batch()
        except AllBad:  # (from a worker its message carries a traceback: say it again, in one sentence)
            path = getattr(self.dataset.dataset, "path", "") or "the dataset"
            raise ConfigError(
                f"{min(len(self.dataset), MAX_PROBE)} samples in a row of data.path '{path}' are bad or filtered "
                f"out, so no batch can be filled; fix the data or loosen the data.* filters.") from None
        self.consumed += self.batch_size
        self.dealt += self.batch_size
        self._account(batch.pop("_skips", ()))
        extras = getattr(self.dataset.dataset, "batch_extras", None)
        if extras is not None:
            if self._extras is None:  # the same tensors every batch: pinned once
                self._extras = {k: v.pin_memory() if self.pin_memory else v for k, v in extras().items()}
            batch.update(self._extras)
        return batch

    def _next_batch(self) -> dict[str, Any]:
        if self._it is None:
            self._start()
        try:
            return next(self._it)
        except StopIteration:
            self.epoch, self.consumed = self.epoch + 1, 0
            self._start()
            return next(self._it)

    def _account(self, skips) -> None:
        records = []
        for bad, filtered in skips:
            self.filtered.update(filtered)
            for r in bad:
                i = r.get("index")  # index problems (unreadable shards) have none: seen once anyway
                if i not in self.bad_indices:
                    records.append(r)
                    if i is not None:
                        self.bad_indices.add(i)
        self.bad.update(r["reason"] for r in records)
        if records and self.bad_log is not None:
            listed = self._listed()
            with open(self.bad_log, "a", encoding="utf-8") as f:  # O_APPEND: one write per line
                for r in records:
                    if r.get("index") is None or r["index"] not in listed:
                        f.write(json.dumps({**r, "rank": self.rank}) + "\n")
        epoch_len = len(self.dataset) // self.world_size
        total = sum(self.bad.values())
        # Distinct samples seen: every dealt one in the first epoch, then at most the whole dataset
        # (an upper bound: the rate is never overstated).
        seen = min(self.dealt, len(self.dataset))
        if self.dealt >= min(MIN_CHECKED, epoch_len) and too_many_bad(total, seen, self.max_bad_fraction):
            where = f" (listed in {self.bad_log})" if self.bad_log else ""
            raise ConfigError(
                f"{total} of the {seen} distinct samples read so far are bad{where}, more than "
                f"data.max_bad_fraction={self.max_bad_fraction} allows; fix the data or raise the limit.")

    def _listed(self) -> set:
        """Indices the log already lists. After a resume, samples met between the checkpoint and the
        kill are met again (and counted again, as in an uninterrupted run) but not listed twice."""
        if self._listed_indices is None:
            self._listed_indices = set()
            if self.bad_log is not None and self.bad_log.is_file():
                line = "\n"
                with open(self.bad_log, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        try:
                            index = loads_json(line).get("index")
                        except (ValueError, AttributeError):  # a line cut by the kill
                            continue
                        if isinstance(index, int):
                            self._listed_indices.add(index)
                if not line.endswith("\n"):  # the kill cut the last line: end it, so the next one stays whole,
                    with open(self.bad_log, "ab") as f:  # by appending (another rank may be appending too)
                        f.write(b"\n")
        return self._listed_indices

    def bad_counts(self) -> dict[str, int]:
        """Counts for the metrics: bad samples by reason ("bad/<reason>") and filtered ("filtered/<filter>")."""
        return {**{f"bad/{k}": v for k, v in sorted(self.bad.items())},
                **{f"filtered/{k}": v for k, v in sorted(self.filtered.items())}}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "dealt": self.dealt,
                "bad": dict(self.bad), "filtered": dict(self.filtered), "bad_indices": sorted(self.bad_indices)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.dealt = int(state.get("dealt", 0))
        self.bad, self.filtered = Counter(state.get("bad", {})), Counter(state.get("filtered", {}))
        self.bad_indices = {int(i) for i in state.get("bad_indices", ())}
        self._it = None
