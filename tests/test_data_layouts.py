"""Datasets in the layouts diffusers users already have: an ImageFolder with metadata.jsonl/csv, a
Hugging Face `datasets` dataset saved with save_to_disk (or its .arrow files), and its parquet export,
with data.image_column / data.caption_column. The `datasets` package only makes the fixtures here;
reading needs pyarrow alone."""

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from colodiffusion.config import ConfigError, load_config
from colodiffusion.data import build_dataset, dataset_args
from colodiffusion.data.loader import probe

from datagen import shapes_items


def dataset_for(tmp, source, path, *extra):
    cfg = load_config(None, [f"data.source={source}", f"data.path={path}", "data.resolution=16",
                             f"run.dir={tmp}/run", *extra])
    return build_dataset(*dataset_args(cfg))


def captions_of(ds):
    return sorted(ds[i]["caption"] for i in range(len(ds)))


def expected(n):
    return sorted(c for _, _, c in shapes_items(n))


def test_imagefolder_metadata_jsonl_and_csv(tmp_path):
    root = tmp_path / "imgs"
    (root / "train").mkdir(parents=True)
    rows = []
    for i, (key, data, caption) in enumerate(shapes_items(8)):
        (root / "train" / f"{key}.png").write_bytes(data)
        rows.append({"file_name": f"{key}.png", "text": caption, "additional_feature": f"alt {i}"})
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    with open(root / "train" / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows[5:])
    ds = dataset_for(tmp_path, "folder", root)  # diffusers' `text` column, found without being named
    assert len(ds) == 8 and captions_of(ds) == expected(8)
    ds = dataset_for(tmp_path, "folder", root, "data.caption_column=additional_feature")  # --caption_column
    assert captions_of(ds) == sorted(f"alt {i}" for i in range(8))


def hf_rows(n):
    return [(Image.open(io.BytesIO(data)).convert("RGB"), caption) for _, data, caption in shapes_items(n)]


def test_datasets_save_to_disk_dataset_dict_and_parquet_export(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = hf_rows(10)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [r[0] for r in rows], "text": [r[1] for r in rows]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "export.parquet"))
    for source, path in (("arrow", "saved"), ("arrow", "dict"), ("parquet", "export.parquet")):
        got = dataset_for(tmp_path, source, tmp_path / path, "data.caption_column=text")
        assert len(got) == 10 and captions_of(got) == expected(10), (source, path)
        assert got[0]["pixel_values"].shape == (3, 16, 16)
    with pytest.raises(ConfigError, match="no column 'caption'.*data.caption_column"):
        dataset_for(tmp_path, "arrow", tmp_path / "saved")


def write_stream(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def image_table(items, image_column="image"):
    images = [{"bytes": data, "path": None} for _, data, _ in items]
    return pa.table({image_column: images, "caption": [c for _, _, c in items]})


def test_arrow_files_without_the_datasets_package(tmp_path):
    items = list(shapes_items(9))
    (tmp_path / "shards").mkdir()
    write_stream(tmp_path / "shards" / "a.arrow", image_table(items[:4]))
    write_stream(tmp_path / "shards" / "b.arrow", image_table(items[4:]))
    ds = dataset_for(tmp_path, "arrow", tmp_path / "shards")
    assert len(ds) == 9 and captions_of(ds) == expected(9)
    assert len(dataset_for(tmp_path, "arrow", tmp_path / "shards" / "b.arrow")) == 5


def test_crafted_saved_datasets_are_refused_or_counted(tmp_path):
    items = list(shapes_items(4))
    outside = tmp_path / "outside.arrow"
    write_stream(outside, image_table(items))
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../outside.arrow"}]}))
    with pytest.raises(ConfigError, match="names a data file outside its folder"):
        dataset_for(tmp_path, "arrow", evil)
    # An image stored as a path (not embedded) is never opened: a bad sample, counted.
    by_path = tmp_path / "by_path"
    by_path.mkdir()
    table = pa.table(
        {
            "image": [{"bytes": None, "path": str(outside)}] + [{"bytes": d, "path": None} for _, d, _ in items],
            "caption": ["x"] + [c for _, _, c in items],
        }
    )
    write_stream(by_path / "data.arrow", table)
    (by_path / "junk.arrow").write_bytes(b"not arrow at all")
    ds = dataset_for(tmp_path, "arrow", by_path)
    assert len(ds) == 5 and [b["reason"] for b in ds.index_bad] == ["unreadable_shard"]
    read, bad, _ = probe(ds, 5)
    assert read == 4 and [b["reason"] for b in bad] == ["image_not_embedded"]


@pytest.mark.slow
def test_training_reads_a_saved_dataset(tmp_path, run_dir):
    from colodiffusion.train import loop
    from common import TINY

    items = list(shapes_items(16, resolution=32))
    (tmp_path / "saved").mkdir()
    write_stream(tmp_path / "saved" / "data-00000-of-00001.arrow", image_table(items, "img"))
    (tmp_path / "saved" / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    loop.train(load_config(None, [*TINY, "train.max_steps=2", f"run.dir={run_dir}", "data.source=arrow",
                                  f"data.path={tmp_path / 'saved'}", "data.image_column=img"]))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


DEEP = "[" * 200_000  # JSON nested past Python's recursion limit: json.loads raises RecursionError


def test_json_nested_past_the_recursion_limit_is_a_malformed_file_not_a_crash(tmp_path):
    """Every JSON a user hands us goes through storage.files.loads_json: a caption table, a latent
    cache's manifest, a checkpoint's manifest each get their one-sentence error."""
    from colodiffusion.data.folder import read_caption_table
    from colodiffusion.data.latents import read_manifest
    from colodiffusion.storage import checkpoint

    table = tmp_path / "captions.jsonl"
    table.write_text('{"file_name": "a.png", "text": "a red circle"}\n' + DEEP + "\n")
    with pytest.raises(ValueError, match="line 2 of .* is not JSON"):
        read_caption_table(table)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(DEEP)
    with pytest.raises(ValueError, match="manifest"):
        read_manifest(cache)
    folder = tmp_path / "step_00000001"
    folder.mkdir()
    (folder / "manifest.json").write_text(DEEP)
    with pytest.raises(checkpoint.CheckpointError, match="unreadable manifest.json"):
        checkpoint.verify(folder)
