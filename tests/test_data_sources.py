"""Data sources, sharding, exact resume and bad-sample accounting (CPU, small and fast)."""

import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from datagen import (bomb_png, good_png_bytes, make_folder, make_parquet, make_webdataset,  # noqa: E402
                     shapes_items, truncated_jpeg)

from colodiffusion.config import ConfigError, load_config  # noqa: E402
from colodiffusion.data import build_dataset  # noqa: E402
from colodiffusion.data.loader import ResumableLoader  # noqa: E402


def dataset_for(tmp, source, path, *extra):
    cfg = load_config(None, [f"data.source={source}", f"data.path={path}", "data.resolution=16",
                             f"run.dir={tmp}/run", *extra])
    return build_dataset(cfg)


def all_captions(ds):
    return sorted(ds[i]["caption"] for i in range(len(ds)))


def expected_captions(n):
    return sorted(c for _, _, c in shapes_items(n))


@pytest.mark.parametrize("captions", ["txt", "jsonl", "csv"])
def test_folder_caption_styles(tmp_path, captions):
    make_folder(tmp_path / "f", 12, captions=captions)
    ds = dataset_for(tmp_path, "folder", tmp_path / "f")
    assert len(ds) == 12 and all_captions(ds) == expected_captions(12)
    assert ds[0]["pixel_values"].shape == (3, 16, 16)


def test_webdataset_and_parquet_read_every_sample(tmp_path):
    wd = make_webdataset(tmp_path / "w", 20, per_shard=6)
    ds = dataset_for(tmp_path, "webdataset", wd)
    assert len(ds) == 20 and len(ds.urls) == 4 and all_captions(ds) == expected_captions(20)
    assert (tmp_path / "run" / "data_index").is_dir()  # the tar index is cached next to the run
    make_parquet(tmp_path / "p.parquet", 20, row_group=8)
    pq = dataset_for(tmp_path, "parquet", tmp_path / "p.parquet", "data.image_column=jpg", "data.caption_column=text")
    assert len(pq) == 20 and pq.block_sizes() == [8, 8, 4] and all_captions(pq) == expected_captions(20)
    with pytest.raises(ConfigError, match="no column 'image'"):
        dataset_for(tmp_path, "parquet", tmp_path / "p.parquet")


def test_metadata_size_filters_are_counted(tmp_path):
    extra = [("unsafe", good_png_bytes(3), "unsafe one", {"punsafe": 0.9}),
             ("tiny", good_png_bytes(4, size=4), "tiny one", {"punsafe": 0.0})]
    make_parquet(tmp_path / "p.parquet", 6, extra=extra)
    ds = dataset_for(tmp_path, "parquet", tmp_path / "p.parquet", "data.image_column=jpg",
                     "data.caption_column=text", "data.max_punsafe=0.5", "data.min_size=8")
    loader = ResumableLoader(ds, 8, seed=0, shuffle=False)
    batch = next(loader)
    assert "unsafe one" not in batch["caption"] and "tiny one" not in batch["caption"]
    assert loader.bad_counts() == {"filtered/min_size": 1, "filtered/punsafe": 1}


class Indexed(Dataset):
    def __len__(self):
        return 60

    def __getitem__(self, i):
        return {"i": torch.tensor(i), "caption": str(i)}


@pytest.mark.parametrize("workers", [0, 2])
def test_rank_worker_sharding_is_disjoint_and_complete(workers):
    world, bs, seen = 3, 4, []
    for rank in range(world):
        loader = ResumableLoader(Indexed(), bs, seed=5, rank=rank, world_size=world, num_workers=workers)
        seen.append([int(i) for _ in range(60 // world // bs) for i in next(loader)["i"]])
        assert loader.epoch == 0 and loader.consumed == 20
    flat = [i for r in seen for i in r]
    assert len(flat) == len(set(flat)) == 60  # disjoint across ranks and workers, and complete
    assert flat != sorted(flat)  # shuffled


def test_block_shuffle_keeps_blocks_together(tmp_path):
    make_parquet(tmp_path / "p.parquet", 32, row_group=8)
    ds = dataset_for(tmp_path, "parquet", tmp_path / "p.parquet", "data.image_column=jpg", "data.caption_column=text")
    loader = ResumableLoader(ds, 8, seed=1, block_shuffle=True)
    order = [i for b in loader.epoch_batches(0) for i in b]
    assert sorted(order) == list(range(32))
    assert all(len({i // 8 for i in order[k:k + 8]}) == 1 for k in range(0, 32, 8))  # one row group per 8
    assert order != list(range(32))


def _sequence(loader, n):
    return [(tuple(b["caption"]), b["pixel_values"].sum().item()) for b in (next(loader) for _ in range(n))]


@pytest.mark.parametrize("source", ["webdataset", "folder"])
def test_exact_mid_epoch_resume(tmp_path, source):
    path = make_webdataset(tmp_path / "w", 24, per_shard=5) if source == "webdataset" else make_folder(tmp_path / "f", 24)
    ds = dataset_for(tmp_path, source, path, "data.crop=random", "data.random_flip=true")
    make = lambda: ResumableLoader(ds, 4, seed=3, rank=1, world_size=2, num_workers=2)  # noqa: E731
    full = _sequence(make(), 7)  # 3 batches per rank-epoch: crosses two epoch boundaries
    first = make()
    head = _sequence(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as plain data
    resumed = make()
    resumed.load_state_dict(state)
    assert head + _sequence(resumed, 3) == full
    assert full[0] != full[3]  # epochs differ (new permutation, new crops)


def test_bucketing_gives_one_shape_per_batch(tmp_path):
    from PIL import Image

    root = tmp_path / "f"
    root.mkdir()
    for i in range(24):
        w, h = (128, 64) if i % 2 else (64, 128)
        Image.new("RGB", (w, h), (i * 10, 0, 0)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"c{i}")
    ds = dataset_for(tmp_path, "folder", root, "data.resolution=64", "data.bucketing=true")
    loader = ResumableLoader(ds, 4, seed=0)
    shapes = {tuple(next(loader)["pixel_values"].shape) for _ in range(6)}
    assert shapes == {(4, 3, 64, 128), (4, 3, 128, 64)}


# -- the corrupt-input suite -------------------------------------------------------------------------
def corrupt_webdataset(root: Path, n_good: int = 25):
    """Good samples with unique captions plus every kind of bad sample; returns (pattern, expected)."""
    good = [(f"g{i:03d}", data, f"good {i}") for i, (_, data, _) in enumerate(shapes_items(n_good))]
    bad = [("zero", b"", "zero byte"), ("trunc", truncated_jpeg(), "truncated"),
           ("noimg", b"\x00\x01garbage" * 50, "not an image"),
           ("html", b"<!DOCTYPE html><html><body>404</body></html>", "an error page saved as .jpg"),
           ("bomb", bomb_png(), "decompression bomb"), ("nocap", good_png_bytes(5), None),
           ("latin1", good_png_bytes(6), "caf\xe9".encode("latin-1"))]
    pattern = make_webdataset(root, 0, per_shard=8, extra=good[:12] + bad + good[12:])
    shards = sorted(root.glob("*.tar"))
    # a corrupt tar header: the image member of good sample g003 becomes unreadable
    with tarfile.open(shards[0]) as tf:
        victim = next(m for m in tf.getmembers() if m.name.startswith("g003.") and m.name.endswith((".jpg", ".png")))
    raw = bytearray(shards[0].read_bytes())
    raw[victim.offset_data - 512:victim.offset_data] = b"\xab" * 512  # its ustar header (after any pax header)
    shards[0].write_bytes(bytes(raw))
    # a shard cut off inside its last image member
    last = shards[-1]
    with tarfile.open(last) as tf:
        cut = [m for m in tf.getmembers() if m.name.endswith((".jpg", ".png"))][-1]
    last.write_bytes(last.read_bytes()[:cut.offset_data + cut.size // 2])
    cut_key = cut.name.split(".")[0]
    # an unreadable shard (not a tar) and a missing one
    k = len(shards)
    (root / f"{k:05d}.tar").write_bytes(b"this is not a tar file" * 10)
    pattern = str(root / f"{{00000..{k + 1:05d}}}.tar")
    expected = {"zero": "zero_byte", "trunc": "truncated", "noimg": "not_an_image", "html": "mislabelled",
                "bomb": "decompression_bomb", "nocap": "missing_caption", "latin1": "caption_not_utf8",
                "g003": "missing_image", cut_key: "corrupt_tar_member"}
    return pattern, expected, {f"good {i}" for i in range(n_good) if f"g{i:03d}" not in expected}


def test_corrupt_inputs_are_skipped_counted_and_listed(tmp_path):
    pattern, expected, good = corrupt_webdataset(tmp_path / "w")
    ds = dataset_for(tmp_path, "webdataset", pattern, "data.max_image_pixels=100000000")
    log = tmp_path / "bad.jsonl"
    loader = ResumableLoader(ds, 4, seed=0, num_workers=2, bad_log=log, max_bad_fraction=0.6, shuffle=False)
    assert len(ds) % 4 == 0  # one epoch deals every sample (no partial-batch tail)
    seen = [c for _ in range(len(ds) // 4) for c in next(loader)["caption"]]
    assert good <= set(seen)  # nothing good is lost
    assert len(seen) == len(ds)  # no batch got shorter
    records = [json.loads(line) for line in log.read_text().splitlines()]
    by_key = {r["key"].rsplit(":", 1)[-1]: r["reason"] for r in records}
    assert {k: by_key.get(k) for k in expected} == expected
    reasons = {r["reason"] for r in records}
    assert {"corrupt_tar", "unreadable_shard"} <= reasons
    assert sum(1 for r in records if r["reason"] == "unreadable_shard") == 2  # garbage file + missing file
    counts = loader.bad_counts()
    assert sum(counts.values()) == len(records) and len(reasons) >= 10


def test_too_many_bad_samples_stop_with_one_sentence(tmp_path):
    pattern, _, _ = corrupt_webdataset(tmp_path / "w")
    ds = dataset_for(tmp_path, "webdataset", pattern)
    loader = ResumableLoader(ds, 4, seed=0, max_bad_fraction=0.05, shuffle=False)
    with pytest.raises(ConfigError, match=r"samples read so far are bad.*data.max_bad_fraction=0.05"):
        for _ in range(len(ds) // 4):
            next(loader)
