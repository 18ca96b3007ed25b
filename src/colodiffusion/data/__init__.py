"""Data sources, transforms, the resumable rank-sharded loader and the latent cache.

May import: `config`, `diffusion`, `storage`, `models` (encoding images and prompts for the cache),
`generate`. A data source never trains a model: the cache gets its components from its caller."""

from __future__ import annotations

from typing import Optional

from torch.utils.data import Dataset

from colodiffusion.config import Config, ConfigError, DataConfig

# Optional packages the image sources import, and the extra that installs each.
EXTRAS = {"braceexpand": "data", "pyarrow": "data", "webdataset": "data", "fsspec": "s3", "s3fs": "s3"}


def build_dataset(d: DataConfig, seed: int, run_dir: str = ".", sizes: bool = False) -> Dataset:
    """The source `d` (data.*) names. `seed` (train.seed) draws the shapes and seeds random crops and
    flips; a webdataset's tar index lives in `run_dir` (run.dir) unless data.index_dir says where;
    `sizes`: each image also reports its original size and crop (SDXL's size conditioning)."""
    if d.source == "shapes":
        from colodiffusion.data.shapes import ShapesDataset

        return ShapesDataset(d.num_samples, resolution=d.resolution, seed=seed)
    try:
        return _build_files_dataset(d, seed, run_dir, sizes)
    except ValueError as exc:
        raise ConfigError(str(exc).rstrip(".") + ".") from None
    except ImportError as exc:
        raise missing_extra(exc, f"data.source={d.source}") from None


def build_datasets(d: DataConfig, seed: int, run_dir: str = ".", sizes: bool = False
                   ) -> tuple[Dataset, Optional[Dataset]]:
    """(training data, validation data or None) with the data.* split, repeats, class images and caption
    controls applied (data/views.py); without them the training data is `build_dataset(...)` itself.
    The arguments are build_dataset's."""
    from dataclasses import replace

    from colodiffusion.data.views import Part, SampleView, held_out, training_view

    dataset = build_dataset(d, seed, run_dir, sizes)
    try:
        val_indices = held_out(len(dataset), d.val_fraction, seed) if d.val_fraction else []
        val = SampleView([Part(dataset, val_indices)]) if val_indices else None
        if d.val_path:
            source = build_dataset(replace(d, path=d.val_path), seed, run_dir, sizes)
            val = SampleView([Part(source, list(range(len(source))))])
        class_images = None
        if d.class_path:
            from colodiffusion.data.folder import FolderDataset

            class_images = FolderDataset(d.class_path, _transform(d, seed, sizes))
        return training_view(d, seed, dataset, val_indices, class_images), val
    except ValueError as exc:
        raise ConfigError(str(exc).rstrip(".") + ".") from None


def dataset_args(cfg: Config) -> tuple[DataConfig, int, str, bool]:
    """build_dataset's / build_datasets' arguments from a whole config (what the trainer, `cache` and
    `eval` pass): data.*, train.seed, run.dir, and whether the preset is SDXL."""
    return cfg.data, cfg.train.seed, cfg.run.dir, cfg.model.preset == "sdxl"


def _transform(d: DataConfig, seed: int, sizes: bool):
    from colodiffusion.data.transforms import ImageTransform

    return ImageTransform.of(d, seed, report_sizes=sizes)


# The shapes demo's grid prompts: one of each shape, three colours.
SHAPES_SAMPLE_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle")


def sample_prompts(cfg: Config, dataset: Dataset, bad: frozenset = frozenset()) -> list[str]:
    """The sample grid's prompts: sample.prompts, else the demo's for shapes data, else four captions
    spread over the training data (skipping the indices in `bad`: samples known to be unreadable)."""
    if cfg.sample.prompts:
        return list(cfg.sample.prompts)
    if cfg.data.source == "shapes":
        return list(SHAPES_SAMPLE_PROMPTS)
    from colodiffusion.data.views import sample_prompts as from_data

    return from_data(dataset, skip=bad) or [""]


def missing_extra(exc: ImportError, what: str) -> ConfigError:
    """One sentence naming the extra that installs a missing optional package (other ImportErrors re-raise)."""
    name = (exc.name or "").split(".")[0] or next((n for n in EXTRAS if n in str(exc)), "")
    if name not in EXTRAS:
        raise exc
    return ConfigError(f"{what} needs the optional package '{name}': pip install 'colodiffusion[{EXTRAS[name]}]'.")


def _build_files_dataset(d: DataConfig, seed: int, run_dir: str, sizes: bool) -> Dataset:
    if d.source == "latents":
        from colodiffusion.data.latents import LatentDataset

        return LatentDataset(d.path)
    transform = _transform(d, seed, sizes)
    if d.source == "folder":
        from colodiffusion.config import folder_subsets
        from colodiffusion.data.folder import FolderDataset, FolderSubsets

        if d.path:
            return FolderDataset(d.path, transform, d.caption_column, d.caption_extension)
        return FolderSubsets(folder_subsets(d), transform, d.caption_column)
    if d.source == "webdataset":
        from colodiffusion.data.webdataset import WebDataset, index_file_for

        index_file = index_file_for(d.index_dir or str(run_dir) + "/data_index", d.path)
        return WebDataset(d.path, transform, index_file)
    if d.source == "parquet":
        from colodiffusion.data.parquet import ParquetDataset

        return ParquetDataset(d.path, transform, d.image_column, d.caption_column)
    if d.source == "arrow":
        from colodiffusion.data.arrow import ArrowDataset

        return ArrowDataset(d.path, transform, d.image_column, d.caption_column)
    raise ConfigError(f"data.source '{d.source}' is not supported.")


def caption_corpus(d: DataConfig, dataset: Dataset) -> list[str]:
    """Texts to train the tiny preset's tokenizer on (`d`: data.*)."""
    if d.source == "shapes":
        from colodiffusion.data.shapes import caption_corpus as shapes_corpus

        return shapes_corpus()
    return list(dataset.captions())
