"""A dataset is data: nothing outside data.path is read because of what is inside it, images train
the way they look, a malformed caption table is one sentence, and a latent cache re-run with other
data is made again (issue 22, items 2, 7, 8 and the caption-table parts of 10)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datagen import make_folder
from PIL import Image

from colodiffusion.config import ConfigError, load_config
from colodiffusion.data import build_dataset, build_datasets, caption_corpus, dataset_args, sample_prompts
from colodiffusion.data.transforms import BadSample, ImageTransform, decode_image
from colodiffusion.train import dataset_info

SECRET = "hf_this_token_must_never_be_read"


def _folder_cfg(path: Path, *extra: str):
    return load_config(None, ["data.source=folder", f"data.path={path}", "train.batch_size=4", *extra])


def test_links_out_of_the_dataset_are_never_read(tmp_path):
    data = make_folder(tmp_path / "data", 6)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "token.txt").write_text(SECRET)
    shutil.copy(sorted(data.glob("*.png"))[0], outside / "photo.png")
    (data / "000001.txt").unlink()
    (data / "000001.txt").symlink_to(outside / "token.txt")  # a caption that is a link to a token file
    (data / "000002.txt").unlink()
    (data / "000002.txt").symlink_to("/proc/self/environ")
    (data / "zz_linked.png").symlink_to(outside / "photo.png")  # an image that is a link out
    (data / "zz_linked.txt").write_text("a linked photo")
    inner = data / "000003.txt"
    (data / "000004.txt").unlink()
    (data / "000004.txt").symlink_to(inner)  # a link inside the folder is fine

    cfg = _folder_cfg(data)
    dataset, _ = build_datasets(*dataset_args(cfg))
    seen = [*caption_corpus(cfg.data, dataset), *sample_prompts(cfg, dataset),
            *dataset_info.sample_captions(dataset)[0]]
    assert seen and not any(SECRET in c or "PATH=" in c for c in seen)
    source = build_dataset(*dataset_args(cfg))
    stems = [Path(source.key(i)).stem for i in range(len(source))]
    for stem in ("000001", "000002", "zz_linked"):
        with pytest.raises(BadSample) as bad:
            source[stems.index(stem)]
        assert bad.value.reason == "outside_folder"
    assert source[stems.index("000004")]["caption"] == inner.read_text()

    (data / "metadata.jsonl").symlink_to(outside / "token.txt")  # a caption table that links out
    with pytest.raises(ConfigError, match="outside") as err:
        build_dataset(*dataset_args(cfg))
    assert SECRET not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("table, content, words", [
    ("metadata.jsonl", '{"file_name": "000000.png", "text": "ok"}\n[1, 2]\n', "line 2 of .* is a JSON list, not an "
                                                                              "object"),
    ("metadata.jsonl", '"just a string"\n', "line 1 of .* is a JSON str, not an object"),
    ("captions.csv", "file,caption\n000000.png," + "x" * (200 << 10) + "\n", "line 2 of .* cannot be read as CSV"),
])
def test_a_malformed_caption_table_is_one_sentence(tmp_path, table, content, words):
    data = make_folder(tmp_path / "data", 4)
    (data / table).write_text(content)
    with pytest.raises(ConfigError, match=words) as err:
        build_dataset(*dataset_args(_folder_cfg(data)))
    assert "\n" not in str(err.value)


def _png(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **save)
    return buf.getvalue()


def test_16_bit_images_are_scaled_not_clipped():
    levels = np.array([[0, 1000, 40000, 65535]], dtype=np.uint16).repeat(4, axis=0)
    img, size = decode_image(_png(Image.fromarray(levels)), 10**6)
    assert img.mode == "RGB" and size == (4, 4)
    assert np.asarray(img)[0, :, 0].tolist() == [0, 4, 156, 255]  # level * 255 / 65535


def test_exif_orientation_is_applied_as_a_viewer_shows_it():
    """A phone photo is stored on its side with orientation 6 (turn 90 degrees clockwise to view)."""
    stored = Image.new("RGB", (16, 8), "blue")
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # stored: red on the left, blue on the right
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _png(stored, exif=exif)
    img, size = decode_image(data, 10**6)
    assert img.size == (8, 16) and size == (8, 16)  # viewed: it stands upright
    top, bottom = np.asarray(img)[2, 4], np.asarray(img)[13, 4]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red on top, blue below
    sample = ImageTransform(resolution=8, report_sizes=True).sample(data, "a photo", None, 0, 0, target=(8, 16))
    assert sample["pixel_values"].shape == (3, 16, 8) and sample["original_size"].tolist() == [16, 8]


def _cache_captions(out: Path) -> list[str]:
    from colodiffusion.data.latents import LatentDataset

    cache = LatentDataset(out)
    return sorted(cache[i]["caption"] for i in range(len(cache)))


def test_a_cache_rerun_with_other_data_is_made_again(tmp_path, tiny_components, capsys):
    from colodiffusion.data.cache import build_cache
    from colodiffusion.train.first_stage import frozen_components

    a, b = make_folder(tmp_path / "a", 4), make_folder(tmp_path / "b", 4)
    for txt in b.glob("*.txt"):
        txt.write_text("a zebra " + txt.stem)
    run = tmp_path / "run"
    shutil.copytree(tiny_components, run / "components")
    out = tmp_path / "cache"

    def make(path: Path) -> list[str]:
        cfg = load_config(None, ["data.source=folder", f"data.path={path}", f"run.dir={run}", "train.batch_size=4"])
        build_cache(cfg, out, lambda ds, dev, show: frozen_components(cfg, ds, run / "components", dev, False),
                    shard_size=3, batch_size=4)
        return _cache_captions(out)

    torch.set_num_threads(2)
    assert make(a) == sorted(t.read_text() for t in a.glob("*.txt"))
    assert make(b) == sorted(t.read_text() for t in b.glob("*.txt"))  # not a's shards under b's manifest
    assert "was made from other data or settings (data.path changed)" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["path"] == str(b)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    cfg = load_config(None, ["data.source=folder", f"data.path={a}", f"run.dir={run}"])
    with pytest.raises(ConfigError, match="is not a cache folder of ours"):
        build_cache(cfg, mine, lambda ds, dev, show: None)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_fewer_images_than_a_first_stage_batch_train_the_autoencoder_with_all_of_them(tmp_path, capsys):
    """10 images and first_stage.batch_size=16 (its default) used to stop with the loader's ValueError."""
    from colodiffusion.train.first_stage import frozen_components

    data = make_folder(tmp_path / "data", 3)
    cfg = _folder_cfg(data, "train.batch_size=2", "first_stage.steps=1", "first_stage.scale_samples=4")
    assert cfg.first_stage.batch_size > 3
    torch.set_num_threads(2)
    dataset = build_dataset(*dataset_args(cfg))
    comps = frozen_components(cfg, dataset, tmp_path / "components", torch.device("cpu"), False)
    assert comps.vae.config.scaling_factor > 0
    assert "fewer than first_stage.batch_size=16: training the autoencoder with batches of 3" in capsys.readouterr().out
