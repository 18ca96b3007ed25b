"""The "shapes" dataset and the pixel judge that scores samples against prompts.

The judge is only worth anything if it reads real dataset images correctly, so
the accuracy floor on rendered images (clean, noisy, lower resolution) is
asserted here rather than assumed.
"""

import itertools
import string

import numpy as np
import pytest
import torch
from PIL import Image

from colodiffusion.data.shapes import (  # noqa: E402
    BACKGROUNDS,
    COLORS,
    EVAL_SEED_OFFSET,
    SIZE_RANGE,
    SMALL_BELOW,
    EVAL_TEMPLATES,
    SHAPES,
    TRAIN_TEMPLATES,
    TRAIN_WHERE,
    ShapeSpec,
    ShapesDataset,
    caption_corpus,
    eval_prompts,
    render,
    sample_spec,
)
from colodiffusion.evaluate import judge, score, wilson  # noqa: E402


def _all_training_captions() -> set[str]:
    out = set()
    for t, c, s, z, b, w in itertools.product(
        TRAIN_TEMPLATES, COLORS, SHAPES, ("small", "large"), BACKGROUNDS, TRAIN_WHERE
    ):
        out.add(t.format(color=c, shape=s, size_word=z, bg=b, where=w))
    return out


def test_item_is_pure_function_of_seed_and_index():
    a, b = ShapesDataset(50, seed=3), ShapesDataset(50, seed=3)
    for i in (0, 7, 49):
        x, y = a[i], b[i]
        assert torch.equal(x["pixel_values"], y["pixel_values"])
        assert x["caption"] == y["caption"]
    # Order of access does not matter.
    assert torch.equal(ShapesDataset(50, seed=3)[7]["pixel_values"], a[7]["pixel_values"])
    other = ShapesDataset(50, seed=4)
    assert any(
        not torch.equal(a[i]["pixel_values"], other[i]["pixel_values"]) for i in range(10)
    )
    assert a.spec(5) == b.spec(5) and a.spec(5) != a.spec(6)


def test_item_range_shape_and_bounds():
    ds = ShapesDataset(8, resolution=32, seed=0)
    assert len(ds) == 8
    for i in range(len(ds)):
        px = ds[i]["pixel_values"]
        assert px.dtype == torch.float32 and px.shape == (3, 32, 32)
        assert px.min() >= -1.0 and px.max() <= 1.0
        assert px.max() - px.min() > 0.5  # a shape is visible
    for bad in (8, -1, 100):
        with pytest.raises(IndexError):
            ds[bad]
        with pytest.raises(IndexError):
            ds.spec(bad)


def test_spec_matches_rendered_item():
    ds = ShapesDataset(5, resolution=64, seed=11)
    for i in range(5):
        expected = np.asarray(render(ds.spec(i), 64), dtype=np.float32) / 127.5 - 1.0
        got = ds[i]["pixel_values"].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_sampled_shapes_fit_with_margin(resolution):
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = sample_spec(rng, resolution)
        assert SIZE_RANGE[0] * resolution - 0.5 <= s.size <= SIZE_RANGE[1] * resolution + 0.5
        half = s.size / 2
        assert min(s.cx, s.cy) - half >= 1 and max(s.cx, s.cy) + half <= resolution - 1
        img = np.asarray(render(s, resolution))
        ring = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        assert (ring == BACKGROUNDS[s.background]).all()


def test_render_geometry():
    def area(shape):
        img = np.asarray(render(ShapeSpec(shape, "red", "black", 40, 32, 32), 64)).astype(float)
        return ((img - BACKGROUNDS["black"]) @ (np.subtract(COLORS["red"], BACKGROUNDS["black"]))).sum() / (
            np.subtract(COLORS["red"], BACKGROUNDS["black"]) ** 2
        ).sum()

    assert area("square") == pytest.approx(1600, rel=0.02)
    assert area("circle") == pytest.approx(np.pi * 400, rel=0.02)
    assert area("triangle") == pytest.approx(800, rel=0.03)
    with pytest.raises(ValueError):
        render(ShapeSpec("square", "red", "black", 40, 10, 32), 64)  # sticks out


def test_captions_name_colour_and_shape():
    ds = ShapesDataset(200, seed=1)
    templates_seen = set()
    for i in range(len(ds)):
        spec, text = ds.spec(i), ds[i]["caption"]
        words = text.replace(",", " ").split()
        assert spec.color in words and spec.shape in words, text
        templates_seen.add(text)
    assert len(templates_seen) > 50  # templates and attributes actually vary


def test_position_phrase_is_true():
    ds = ShapesDataset(300, seed=2)
    for i in range(len(ds)):
        spec, text = ds.spec(i), ds[i]["caption"]
        dx, dy = spec.cx - 32, spec.cy - 32
        if "on the left" in text:
            assert dx < 0 and abs(dx) >= abs(dy)
        elif "on the right" in text:
            assert dx > 0 and abs(dx) >= abs(dy)
        elif "at the top" in text:
            assert dy < 0 and abs(dy) > abs(dx)
        elif "at the bottom" in text:
            assert dy > 0 and abs(dy) > abs(dx)
        elif "in the middle" in text:
            assert abs(dx) < 8 and abs(dy) < 8
        if "small" in text.split():
            assert spec.size < SMALL_BELOW * 64
        if "large" in text.split():
            assert spec.size >= SMALL_BELOW * 64


def test_eval_prompts_are_held_out():
    prompts = eval_prompts(per_combo=2)
    assert len(prompts) == 2 * len(COLORS) * len(SHAPES)
    assert prompts == eval_prompts(per_combo=2)
    assert {(p["color"], p["shape"]) for p in prompts} == set(itertools.product(COLORS, SHAPES))
    seeds = [p["seed"] for p in prompts]
    assert len(set(seeds)) == len(seeds) and min(seeds) >= EVAL_SEED_OFFSET
    assert {p["prompt"] for p in prompts}.isdisjoint(_all_training_captions())
    used = []
    for p in prompts:
        matches = [t for t in EVAL_TEMPLATES if p["prompt"] == t.format(color=p["color"], shape=p["shape"])]
        assert len(matches) == 1, p
        used.append(matches[0])
    assert set(used) == set(EVAL_TEMPLATES)
    for p in prompts:
        assert p["color"] in p["prompt"].split() and p["shape"] in p["prompt"].replace(",", " ").split()
    # Eval-only wordings: position phrases that no training template contains.
    assert not any("corner" in t for t in TRAIN_TEMPLATES)
    assert sum("corner" in t for t in EVAL_TEMPLATES) >= 2
    assert len(EVAL_TEMPLATES) >= 4 and not set(EVAL_TEMPLATES) & set(TRAIN_TEMPLATES)


def test_caption_corpus_covers_every_prompt_word():
    corpus = caption_corpus(n=50, seed=0)
    assert corpus == caption_corpus(n=50, seed=0)
    vocab = {w.strip(string.punctuation) for line in corpus for w in line.split()}
    wanted = set(_all_training_captions()) | {p["prompt"] for p in eval_prompts(4)}
    needed = {w.strip(string.punctuation) for line in wanted for w in line.split()}
    assert needed <= vocab


def _dataset_images(n, resolution, seed, noise=0.0):
    ds = ShapesDataset(n, resolution=resolution, seed=seed)
    rng = np.random.default_rng(1234)
    images, targets = [], []
    for i in range(n):
        spec = ds.spec(i)
        img = np.asarray(render(spec, resolution)).astype(np.float32)
        if noise:
            img = np.clip(img + rng.normal(0.0, noise, img.shape), 0, 255)
        images.append(img.astype(np.uint8))
        targets.append((spec.color, spec.shape))
    return images, targets


@pytest.mark.parametrize("resolution,n", [(64, 300), (32, 300)])
def test_judge_reads_dataset_images(resolution, n):
    images, targets = _dataset_images(n, resolution, seed=7)
    result = score(images, targets)
    assert result["n"] == n
    assert result["prompt_accuracy"] >= 0.95, result
    assert result["color_accuracy"] >= result["prompt_accuracy"]
    assert result["shape_accuracy"] >= result["prompt_accuracy"]


def test_judge_tolerates_noise():
    images, targets = _dataset_images(150, 64, seed=8, noise=10.0)
    assert score(images, targets)["prompt_accuracy"] >= 0.9


def test_judge_tolerates_blur():
    from PIL import ImageFilter

    ds = ShapesDataset(60, resolution=64, seed=9)
    images = [render(ds.spec(i), 64).filter(ImageFilter.GaussianBlur(1.5)) for i in range(len(ds))]
    targets = [(ds.spec(i).color, ds.spec(i).shape) for i in range(len(ds))]
    assert score(images, targets)["prompt_accuracy"] >= 0.9


def test_judge_rejects_empty_images():
    for rgb in BACKGROUNDS.values():
        assert judge(Image.new("RGB", (64, 64), rgb)) == (None, None)
    noisy = np.clip(128 + np.random.default_rng(0).normal(0, 10, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert judge(noisy) == (None, None)
    # Pure noise (an untrained model's output) has no plain background.
    static = np.random.default_rng(1).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    assert judge(static) == (None, None)
    # A speck far below 1.5% of the image is not an object.
    speck = np.full((64, 64, 3), 245, np.uint8)
    speck[30:33, 30:33] = COLORS["blue"]
    assert judge(speck) == (None, None)


def test_judge_ignores_specks_and_accepts_pil():
    spec = ShapeSpec("triangle", "green", "white", 30, 24, 30)
    img = np.asarray(render(spec, 64)).copy()
    img[55:58, 55:58] = COLORS["red"]  # a stray speck elsewhere
    assert judge(img) == ("green", "triangle")
    assert judge(Image.fromarray(img)) == ("green", "triangle")


def test_score_counts():
    a = np.asarray(render(ShapeSpec("square", "red", "grey", 30, 32, 32), 64))
    b = np.asarray(render(ShapeSpec("circle", "blue", "black", 30, 32, 32), 64))
    r = score([a, b, b], [("red", "square"), ("blue", "square"), ("red", "circle")])
    assert {k: v for k, v in r.items() if not k.endswith("_ci95")} == {
        "prompt_accuracy": 1 / 3, "color_accuracy": 2 / 3, "shape_accuracy": 2 / 3, "n": 3}
    assert r["prompt_accuracy_ci95"] == wilson(1, 3) and r["color_accuracy_ci95"] == wilson(2, 3)
    with pytest.raises(ValueError):
        score([a], [])


def test_wilson_interval_matches_known_values_and_stays_in_range():
    # 96 of 96 right bounds the rate only above 0.9615; 48 of 96 gives 0.40-0.60 (Wilson, z = 1.96; by hand).
    assert wilson(96, 96) == [0.9615, 1.0]
    assert wilson(48, 96) == [0.4019, 0.5981]
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] > 0.2
    assert wilson(0, 0) == [0.0, 1.0]


def test_the_held_out_set_is_96_images_and_harder_than_training():
    """Every held-out wording once per colour x shape (8 x 12 = 96 by default); some name the colour
    after the shape (no training caption does) and some use words no training caption contains."""
    prompts = eval_prompts()
    assert len(prompts) >= 96
    after = [t for t in EVAL_TEMPLATES if t.index("{color}") > t.index("{shape}")]
    assert len(after) >= 2 and all(t.index("{color}") < t.index("{shape}") for t in TRAIN_TEMPLATES)
    train_words = {w for line in _all_training_captions() for w in line.replace(",", " ").split()}
    unseen = [
        t for t in EVAL_TEMPLATES if set(t.format(color="red", shape="circle").replace(",", " ").split()) - train_words
    ]
    assert len(unseen) >= 4
    for p in prompts:  # no other colour or shape word hides inside a word of the prompt ("centred" holds "red")
        others = [w for w in (*COLORS, *SHAPES) if w not in (p["color"], p["shape"])]
        assert not any(o in p["prompt"] for o in others), p
