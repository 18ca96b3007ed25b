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

from datagen import (bomb_png, good_png_bytes, image_bytes, make_folder, make_latent_cache,  # noqa: E402
                     make_parquet, make_webdataset, shapes_items, truncated_jpeg)

from colodiffusion.config import ConfigError, load_config  # noqa: E402
from colodiffusion.data import build_dataset, dataset_args  # noqa: E402
from colodiffusion.data.latents import mmap_safetensors  # noqa: E402
from colodiffusion.data.loader import ResumableLoader, too_many_bad  # noqa: E402
from colodiffusion.data.transforms import BadSample, ImageTransform, decode_image  # noqa: E402


def dataset_for(tmp, source, path, *extra):
    cfg = load_config(None, [f"data.source={source}", f"data.path={path}", "data.resolution=16",
                             f"run.dir={tmp}/run", *extra])
    return build_dataset(*dataset_args(cfg))


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
    path = (
        make_webdataset(tmp_path / "w", 24, per_shard=5) if source == "webdataset" else make_folder(tmp_path / "f", 24)
    )
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


# -- hardening: formats, types, sizes, patterns, dependencies, accounting ------------------------------
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_the_common_formats_decode(fmt):
    img, size = decode_image(image_bytes(fmt), 10**6)
    assert size == (20, 20) and img.mode == "RGB"


def test_an_animated_gif_gives_its_first_frame():
    img, _ = decode_image(image_bytes("GIF", frames=3), 10**6)
    assert img.getpixel((0, 0))[0] < 20  # frame 0 is (0, 90, 160); frame 2 would be (80, ...)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 20 20\n0 0 moveto 20 20 lineto stroke\nshowpage\n%%EOF\n"


@pytest.mark.parametrize("fmt", ["TIFF", "PPM", "ICO", "TGA", "EPS"])
def test_other_formats_are_bad_samples(fmt, monkeypatch):
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript was called"))
    data = EPS if fmt == "EPS" else image_bytes(fmt)
    with pytest.raises(BadSample) as e:
        decode_image(data, 10**6)
    assert e.value.reason == "not_an_image" and "JPEG, PNG, WEBP, BMP, GIF" in e.value.detail


def test_wrong_typed_fields_are_bad_samples(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "p"
    folder.mkdir()
    make_parquet(folder / "good.parquet", 8)
    pq.write_table(pa.table({"jpg": ["photos/1.jpg"] * 4, "text": ["a path, not bytes"] * 4}), folder / "paths.parquet")
    ints = pa.table({"jpg": [good_png_bytes(k) for k in range(4)], "text": [1, 2, 3, 4]})
    pq.write_table(ints, folder / "ints.parquet")
    ds = dataset_for(tmp_path, "parquet", folder, "data.image_column=jpg", "data.caption_column=text")
    loader = ResumableLoader(ds, 16, seed=0, shuffle=False)
    assert set(next(loader)["caption"]) <= set(expected_captions(8))  # bad rows are replaced by good ones
    assert loader.bad_counts() == {"bad/wrong_type": 8}
    # metadata of the wrong shape (a webdataset .json holding a list) only disables the filters
    t = ImageTransform(resolution=16, max_punsafe=0.5)
    assert t.sample(good_png_bytes(1), "caption", [0.9, "x"], 0, 0)["caption"] == "caption"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_of_bad_samples_stops_with_one_sentence(tmp_path, workers):
    root = make_folder(tmp_path / "f", 8)
    for p in root.glob("*.[jp][pn]g"):
        p.write_bytes(b"")
    ds = dataset_for(tmp_path, "folder", root)
    loader = ResumableLoader(ds, 4, seed=0, num_workers=workers, max_bad_fraction=1.0)
    with pytest.raises(ConfigError) as e:
        next(loader)
    msg = str(e.value)
    assert f"8 samples in a row of data.path '{root}' are bad or filtered out" in msg
    assert "\n" not in msg and "Traceback" not in msg


def test_brace_patterns_may_hold_commas(tmp_path):
    make_webdataset(tmp_path / "w", 20, per_shard=6)
    w = tmp_path / "w"
    ds = dataset_for(tmp_path, "webdataset", f"{w}/{{00000,00001}}.tar, {w}/0000{{2..3}}.tar")
    assert [Path(u).name for u in ds.urls] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert len(ds) == 20 and all_captions(ds) == expected_captions(20)
    with pytest.raises(ConfigError, match=r"has unbalanced braces in '.*0000\{2\.\.3\.tar'"):
        dataset_for(tmp_path, "webdataset", f"{w}/0000{{2..3.tar")


def test_oversized_files_are_not_read_into_memory(tmp_path, monkeypatch):
    from colodiffusion.data.webdataset import WebDataset

    big = b"\xff\xd8" + bytes(2 << 20)  # 2 MiB: above the cap for max_image_pixels=1000 (4000 B + 1 MiB)
    huge_caption = b"x" * ((1 << 20) + 1)
    items = [("big", big, "big image"), ("long", good_png_bytes(2), huge_caption), ("ok", good_png_bytes(3), "fine")]
    pattern = make_webdataset(tmp_path / "w", 0, per_shard=8, extra=items)
    reads = []
    read = WebDataset._read
    monkeypatch.setattr(
        WebDataset, "_read", lambda self, url, at, size: reads.append(size) or read(self, url, at, size)
    )
    ds = dataset_for(tmp_path, "webdataset", pattern, "data.max_image_pixels=1000")
    reasons = {}
    for i in range(len(ds)):
        try:
            ds[i]
        except BadSample as exc:
            reasons[ds.key(i).rsplit(":", 1)[-1]] = exc.reason
    assert reasons == {"big": "too_large", "long": "too_large"}
    assert max(reads) <= ds.transform.max_image_bytes
    # the folder source caps its reads the same way
    root = tmp_path / "f"
    root.mkdir()
    (root / "a.jpg").write_bytes(big)
    (root / "a.txt").write_text("big image")
    (root / "b.png").write_bytes(good_png_bytes(4))
    (root / "b.txt").write_bytes(huge_caption)
    folder = dataset_for(tmp_path, "folder", root, "data.max_image_pixels=1000")
    for i in range(2):
        with pytest.raises(BadSample) as e:
            folder[i]
        assert e.value.reason == "too_large"


@pytest.mark.parametrize("source,modules", [("webdataset", ["braceexpand"]),
                                            ("parquet", ["pyarrow", "pyarrow.parquet"])])
def test_a_missing_optional_package_names_its_extra(tmp_path, monkeypatch, source, modules):
    path = make_parquet(tmp_path / "p.parquet", 4) if source == "parquet" else make_webdataset(tmp_path / "w", 4, 4)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # `import m` now raises ModuleNotFoundError
    with pytest.raises(ConfigError) as e:
        dataset_for(tmp_path, source, path)
    assert str(e.value) == (f"data.source={source} needs the optional package '{modules[0]}': "
                            f"pip install 'colodiffusion[data]'.")


def test_a_bad_file_is_counted_once_and_skipped_every_epoch(tmp_path):
    """One truncated image among 20 (the own-data report): 3 epochs pass under the default limit, it is
    counted and listed once (also across a resume), and never trained on."""
    root = make_folder(tmp_path / "f", 20)
    victim = sorted(root.glob("*.png"))[1]
    victim.write_bytes(truncated_jpeg())
    cfg = load_config(None, [f"run.dir={tmp_path}/run"])
    ds = dataset_for(tmp_path, "folder", root)
    log = tmp_path / "bad.jsonl"
    make = lambda: ResumableLoader(ds, 8, seed=0, bad_log=log, max_bad_fraction=cfg.data.max_bad_fraction)  # noqa: E731
    loader = make()
    captions = [c for _ in range(3) for c in next(loader)["caption"]]
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    captions += [c for _ in range(3) for c in next(resumed)["caption"]]
    assert resumed.epoch == 2
    assert (root / victim.with_suffix(".txt").name).read_text() not in captions
    assert resumed.bad_counts() == {"bad/truncated": 1}
    assert [json.loads(line)["key"] for line in log.read_text().splitlines()] == [victim.name]


def test_the_bad_fraction_is_judged_with_a_margin_for_small_samples():
    assert not too_many_bad(1, 20, 0.05)  # one bad file in 20 is not evidence of more than 5%
    assert not too_many_bad(8, 64, 0.05) and too_many_bad(9, 64, 0.05)  # the preflight probe's threshold
    assert too_many_bad(32, 64, 0.05)  # half of the probe bad: stop before training
    assert not too_many_bad(5_150, 100_000, 0.05) and too_many_bad(5_300, 100_000, 0.05)  # large: the fraction
    assert too_many_bad(1, 100, 0.0) and not too_many_bad(0, 100, 0.0)  # limit 0: any bad sample stops
    assert not too_many_bad(100, 100, 1.0)


# -- the latent cache's files are untrusted ----------------------------------------------------------
def _header_file(path: Path, header_len: int, header: bytes, body: bytes = b"") -> None:
    path.write_bytes(header_len.to_bytes(8, "little") + header + body)


def _latents(tmp_path, cache):
    return dataset_for(tmp_path, "latents", cache)


def test_a_valid_latent_cache_reads(tmp_path):
    ds = _latents(tmp_path, make_latent_cache(tmp_path / "c"))
    assert len(ds) == 6 and ds[4]["caption"] == "c4" and ds.key(5) == "k5"


@pytest.mark.parametrize("damage", ["huge_header_length", "header_past_the_end", "offsets_outside",
                                    "shape_mismatch", "bf16", "not_json"])
def test_crafted_latent_shards_are_one_sentence(tmp_path, damage):
    cache = make_latent_cache(tmp_path / "c")
    shard = cache / "shard-00001.safetensors"
    good = json.dumps({"mean": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    if damage == "huge_header_length":  # would make a naive reader allocate an exabyte
        _header_file(shard, 2**60, good, b"\0" * 4)
    elif damage == "header_past_the_end":
        _header_file(shard, 10**6, good, b"\0" * 4)
    elif damage == "not_json":
        _header_file(shard, 9, b"not json!")
    else:  # a well-formed header whose tensor does not fit the 4 data bytes, or is not a numpy dtype
        header = {"offsets_outside": good.replace(b"[0, 4]", b"[0, 4000000]"),
                  "shape_mismatch": good.replace(b"[2]", b"[1000]"), "bf16": good.replace(b"F16", b"BF16")}[damage]
        _header_file(shard, len(header), header, b"\0" * 4)
    with pytest.raises(ValueError, match="rebuild it with `colodiffusion cache`"):
        mmap_safetensors(shard)
    with pytest.raises(ConfigError) as e:  # found when the dataset is built, not in a worker mid-run
        _latents(tmp_path, cache)
    msg = str(e.value)
    assert str(shard) in msg and "rebuild it with `colodiffusion cache`" in msg and "\n" not in msg


@pytest.mark.parametrize("damage", ["path_outside", "count_mismatch", "missing_captions"])
def test_a_latent_manifest_must_match_its_shards(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    cache = make_latent_cache(tmp_path / "c")
    manifest = json.loads((cache / "manifest.json").read_text())
    if damage == "path_outside":
        (tmp_path / "outside.safetensors").write_bytes((cache / "shard-00000.safetensors").read_bytes())
        manifest["shards"][0]["file"] = "../outside.safetensors"
    elif damage == "count_mismatch":
        manifest["shards"][0]["count"] = 5  # rows 3 and 4 would index past the shard
    else:
        shard = str(cache / "shard-00000.safetensors")
        save_file(load_file(shard), shard, metadata={"keys": "[]"})
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="rebuild it with `colodiffusion cache`"):
        _latents(tmp_path, cache)
