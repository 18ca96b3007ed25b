"""Data sources, transforms and the resumable rank-sharded loader."""

from __future__ import annotations

from torch.utils.data import Dataset

from colodiffusion.config import Config, ConfigError


def build_dataset(cfg: Config) -> Dataset:
    d = cfg.data
    if d.source == "shapes":
        from colodiffusion.data.shapes import ShapesDataset

        return ShapesDataset(d.num_samples, resolution=d.resolution, seed=cfg.train.seed)
    if d.source == "folder":
        from colodiffusion.data.folder import FolderDataset

        try:
            return FolderDataset(d.path, d.resolution, d.random_flip)
        except ValueError as exc:
            raise ConfigError(str(exc) + ".") from None
    raise ConfigError(f"data.source '{d.source}' is not supported.")


def caption_corpus(cfg: Config, dataset: Dataset) -> list[str]:
    """Texts to train the tiny preset's tokenizer on."""
    if cfg.data.source == "shapes":
        from colodiffusion.data.shapes import caption_corpus as shapes_corpus

        return shapes_corpus()
    return list(dataset.captions())
