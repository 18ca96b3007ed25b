"""Training on your own images: dataset controls (repeats, kohya folders, caption tags, prior
preservation), the held-out split and validation loss, sample prompts from the data, CLIP score / FID
from local weights, and `eval` choosing its scorer by the data."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from colodiffusion.config import ConfigError, load_config
from colodiffusion.data import build_datasets, dataset_args, sample_prompts
from colodiffusion.data.captions import CaptionTags
from colodiffusion.data.loader import ResumableLoader
from colodiffusion.data.views import SampleView, caption_of
from colodiffusion.diffusion import Objective

from common import TINY, crash_at, run_cli
from datagen import make_folder, make_kohya_folder, make_tiny_clip, truncated_jpeg


def folder_cfg(path, *extra):
    return load_config(None, [*TINY, "data.source=folder", f"data.path={path}", "data.resolution=16", *extra])


# -- the objective's per-sample weights -----------------------------------------------------------

def test_objective_weights_each_samples_loss():
    torch.manual_seed(0)
    obj = Objective(torch.linspace(0.99, 0.01, 100), min_snr_gamma=5.0)
    x0, ctx = torch.randn(3, 4, 8, 8), torch.zeros(3, 1, 1)

    def model_fn(x_t, t, context):
        return 0.5 * x_t

    def loss(weights):
        return obj.loss(model_fn, x0, ctx, torch.Generator().manual_seed(7), weights)

    t, noise = obj.draw(x0, torch.Generator().manual_seed(7))
    per_sample = obj.per_sample_loss(model_fn, x0, ctx, t, noise)
    w = torch.tensor([1.0, 0.0, 3.0])
    assert torch.allclose(loss(w), (per_sample * w).mean())
    assert torch.equal(loss(None), per_sample.mean())
    assert torch.equal(loss(torch.ones(3)), loss(None))


# -- caption tags ---------------------------------------------------------------------------------

def test_caption_tags_keep_leading_tokens_shuffle_and_drop_the_rest():
    caption = "sks, dog, beach, sunset, red collar, running"
    tags = CaptionTags(shuffle=True, keep=1)
    outs = {tags(caption, np.random.default_rng(s)) for s in range(20)}
    assert len(outs) > 5  # shuffled
    assert all(o.startswith("sks, ") for o in outs)  # the kept token stays first
    assert all(sorted(o.split(", ")) == sorted(caption.split(", ")) for o in outs)  # nothing lost
    assert tags(caption, np.random.default_rng(3)) == tags(caption, np.random.default_rng(3))

    drop = CaptionTags(keep=2, dropout=0.5)
    lengths = [len(drop(caption, np.random.default_rng(s)).split(", ")) for s in range(200)]
    assert min(lengths) >= 2 and max(lengths) == 6
    assert 3.5 < np.mean(lengths) < 4.5  # 2 kept + half of 4
    assert all(drop(caption, np.random.default_rng(s)).startswith("sks, dog") for s in range(20))


# -- views: repeats, kohya folders, held-out split, class images ---------------------------------

def test_kohya_folders_repeat_their_images_and_lend_their_name_as_caption(tmp_path):
    root = make_kohya_folder(tmp_path / "data", {"3_sks circle": 2, "1_shapes": 3}, captions=False)
    train, val = build_datasets(*dataset_args(folder_cfg(root)))
    assert val is None and len(train) == 2 * 3 + 3
    captions = sorted(caption_of(train, k) for k in range(len(train)))
    assert captions == ["shapes"] * 3 + ["sks circle"] * 6
    train2, _ = build_datasets(*dataset_args(folder_cfg(root, "data.repeats=2")))
    assert len(train2) == 2 * len(train)


def test_plain_data_without_controls_is_the_source_itself(tmp_path):
    cfg = folder_cfg(make_folder(tmp_path / "data", 12))
    train, val = build_datasets(*dataset_args(cfg))
    assert not isinstance(train, SampleView) and val is None  # the default run reads exactly as before


def test_held_out_samples_are_never_trained_on_and_the_split_is_fixed(tmp_path):
    root = make_kohya_folder(tmp_path / "data", {"4_a": 5, "1_b": 15})
    cfg = folder_cfg(root, "data.val_fraction=0.2")
    train, val = build_datasets(*dataset_args(cfg))
    held = {val.key(k) for k in range(len(val))}
    trained = {train.key(k) for k in range(len(train))}
    assert len(held) == 4 and not held & trained and len(held | trained) == 20
    assert held == {build_datasets(*dataset_args(cfg))[1].key(k) for k in range(4)}  # the same split every time
    reseeded = build_datasets(*dataset_args(folder_cfg(root, "data.val_fraction=0.2", "train.seed=1")))[1]
    other = {reseeded.key(k) for k in range(4)}
    assert other != held


def test_prior_preservation_mixes_class_images_with_their_loss_weight(tmp_path):
    inst = make_kohya_folder(tmp_path / "inst", {"5_sks circle": 2}, captions=False)
    cls = make_kohya_folder(tmp_path / "cls", {"1_circle": 3}, captions=False)
    train, _ = build_datasets(*dataset_args(folder_cfg(inst, f"data.class_path={cls}", "data.prior_loss_weight=0.25")))
    assert len(train) == 2 * 10  # as many class samples as instance samples
    samples = [train[k] for k in range(len(train))]
    weights = {s["caption"]: s["loss_weight"] for s in samples}
    assert weights == {"sks circle": 1.0, "circle": 0.25}
    batch = next(iter(ResumableLoader(train, 4, seed=0)))
    assert len(batch["loss_weight"]) == 4 and set(batch["loss_weight"]) <= {1.0, 0.25}


def test_a_bad_file_repeated_by_its_folder_is_listed_once(tmp_path):
    root = make_kohya_folder(tmp_path / "data", {"10_a": 3, "1_b": 20})
    (root / "10_a" / "000000.png").unlink(missing_ok=True)
    (root / "10_a" / "000000.jpg").write_bytes(truncated_jpeg())
    (root / "10_a" / "000000.txt").write_text("a caption")
    train, _ = build_datasets(*dataset_args(folder_cfg(root)))
    log = tmp_path / "bad.jsonl"
    loader = ResumableLoader(train, 10, seed=0, bad_log=log)
    for _ in range(len(train) // 10 * 2):  # two epochs
        next(loader)
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["key"].endswith("000000.jpg")
    assert loader.bad_counts() == {"bad/truncated": 1}


def test_own_data_options_fail_with_one_sentence(tmp_path):
    root = make_folder(tmp_path / "data", 8)
    with pytest.raises(ConfigError, match="not both"):
        folder_cfg(root, "data.val_fraction=0.1", f"data.val_path={root}")
    with pytest.raises(ConfigError, match="class_path"):
        folder_cfg(root, f"data.class_path={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="eval.clip_model and/or eval.fid_model"):
        folder_cfg(root, "eval.every=5", "data.val_fraction=0.2")
    with pytest.raises(ConfigError, match="hold out all"):
        build_datasets(*dataset_args(folder_cfg(root, "data.val_fraction=0.99")))


# -- sample grid prompts ---------------------------------------------------------------------------

def test_sample_prompts_come_from_the_data_unless_set(tmp_path):
    root = make_folder(tmp_path / "data", 12)
    cfg = folder_cfg(root)
    train, _ = build_datasets(*dataset_args(cfg))
    prompts = sample_prompts(cfg, train)
    captions = {(root / f"{i:06d}.txt").read_text() for i in range(12)}
    assert len(prompts) == 4 and set(prompts) <= captions and "a red circle" not in prompts
    assert sample_prompts(folder_cfg(root, "sample.prompts=[a cat]"), train) == ["a cat"]
    shapes = load_config(None, TINY)
    assert sample_prompts(shapes, None) == ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


# -- scoring from local weights --------------------------------------------------------------------

def test_frechet_distance_matches_the_textbook_formula_and_is_zero_for_the_same_set():
    """The reference takes the other road: Tr((S_a S_b)^(1/2)) as the sum of the square roots of the
    eigenvalues of the non-symmetric product (np.linalg.eig), where frechet_distance symmetrizes and
    uses eigh. (scipy.linalg.sqrtm was the reference; importing scipy costs every process the suite
    starts about a CPU-second, since transformers imports it when it is installed.)"""
    from colodiffusion.models.image_metrics import frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(0.3, 1.5, size=(150, 6)) @ rng.normal(size=(6, 6))
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_covmean = np.sqrt(np.linalg.eigvals(s_a @ s_b).astype(complex)).real.sum()
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b) - 2 * tr_covmean
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8
    # Diagonal covariances have a closed form: sum of (sqrt(var_a) - sqrt(var_b))^2 plus the means.
    va, vb = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    x = rng.normal(size=(4000, 3))
    x = (x - x.mean(0)) / x.std(0, ddof=1)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T  # exactly identity covariance
    d = frechet_distance(x * np.sqrt(va), x * np.sqrt(vb) + 2.0)
    assert d == pytest.approx(3 * 4.0 + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum(), rel=1e-9)


def test_clip_score_and_features_load_from_a_local_folder(tmp_path):
    from PIL import Image

    from colodiffusion.models.image_metrics import ClipScorer, ImageFeatures

    folder = make_tiny_clip(tmp_path / "clip")
    scorer = ClipScorer(folder, torch.device("cpu"))
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    s = scorer.score(images, ["a red circle", "a blue square"])
    assert 0 <= s <= 100 and s == scorer.score(images, ["a red circle", "a blue square"])
    feats = ImageFeatures(folder, torch.device("cpu"))(images)
    assert feats.shape == (2, 16)
    with pytest.raises(ConfigError, match="--clip-model '.*' is not a local CLIP"):
        ClipScorer(tmp_path, torch.device("cpu"), "--clip-model")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConfigError, match="safetensors"):  # a pickle is never loaded
        ImageFeatures(tmp_path / "pickled", torch.device("cpu"))


# -- end to end ------------------------------------------------------------------------------------

def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_validation_loss_is_reproducible_tracks_training_and_leaves_training_unchanged(run_dir, tmp_path):
    from colodiffusion.train import loop

    runs = {}
    for name, extra in (("a", ["data.val_fraction=0.1"]), ("b", ["data.val_fraction=0.1"]),
                        ("plain", ["data.val_fraction=0.1", "train.val_every=0"])):
        d = tmp_path / name
        shutil.copytree(run_dir / "components", d / "components")
        loop.train(load_config(None, [*TINY, f"run.dir={d}", "train.max_steps=16", "train.val_every=8", *extra]))
        runs[name] = metrics(d)
    val = [(m["step"], m["val_loss"]) for m in runs["a"] if "val_loss" in m]
    assert [s for s, _ in val] == [8, 16]
    assert val == [(m["step"], m["val_loss"]) for m in runs["b"] if "val_loss" in m]  # same model, same number
    assert val[-1][1] < val[0][1]  # the model learns the data it never saw
    losses = [m["loss"] for m in runs["a"] if "loss" in m]
    assert losses == [m["loss"] for m in runs["plain"]]  # validating does not change training


@pytest.mark.slow
def test_resume_with_repeats_tags_class_images_and_validation_is_exact(tmp_path):
    from safetensors.torch import load_file

    from colodiffusion.train import loop

    data = make_kohya_folder(tmp_path / "inst", {"3_sks circle": 4, "1_shapes": 8}, resolution=32)
    cls = make_kohya_folder(tmp_path / "cls", {"1_circle": 5}, resolution=32, captions=False)
    common = [*TINY, "data.source=folder", f"data.path={data}", f"data.class_path={cls}", "data.prior_loss_weight=0.5",
              "data.shuffle_caption=true", "data.keep_tokens=1", "data.tag_dropout=0.2", "data.val_fraction=0.1",
              "train.val_every=2", "train.max_steps=6", "train.checkpoint_every=3", "train.batch_size=4",
              "first_stage.batch_size=4"]
    a, b = tmp_path / "a", tmp_path / "b"
    loop.train(load_config(None, [*common, f"run.dir={a}"]))
    shutil.copytree(a / "components", b / "components")
    with crash_at(3):
        loop.train(load_config(None, [*common, f"run.dir={b}"]))
    loop.train(load_config(None, [*common, f"run.dir={b}", "train.resume=auto"]))
    wa = load_file(str(a / "checkpoints/step_00000006/unet.safetensors"))
    wb = load_file(str(b / "checkpoints/step_00000006/unet.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    val_a = {m["step"]: m["val_loss"] for m in metrics(a) if "val_loss" in m}
    assert list(val_a) == [2, 4, 6] and val_a == {m["step"]: m["val_loss"] for m in metrics(b) if "val_loss" in m}


@pytest.mark.slow
def test_eval_chooses_its_scorer_by_the_data(tmp_path, run_dir):
    from colodiffusion.train import loop

    data = make_folder(tmp_path / "data", 20, resolution=32)
    clip = make_tiny_clip(tmp_path / "clip")
    run = tmp_path / "own"
    loop.train(load_config(None, [*TINY, "data.source=folder", f"data.path={data}", "data.val_fraction=0.2",
                                  "train.batch_size=4", "first_stage.batch_size=4", "train.max_steps=2",
                                  f"run.dir={run}"]))

    def evaluate(*args):
        out = run_cli("eval", *args, "--json", "--steps", "2")
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr

    own, err = evaluate(run, "--num-images", 4)
    assert own["scorer"] == "data" and own["held_out"] and own["val_n"] == 4 and "prompt_accuracy" not in own
    assert "CLIP score and FID were not computed" in err
    own, _ = evaluate(run, "--num-images", 4, "--clip-model", clip, "--fid-model", clip)
    assert 0 <= own["clip_score"] <= 100 and own["fid"] >= 0 and own["quality_n"] == 4
    bare = tmp_path / "bare"
    shutil.copytree(run / "final", bare)
    shapes, err = evaluate(bare, "--per-combo", 1)
    assert shapes["scorer"] == "shapes" and "prompt_accuracy" in shapes
    assert "no run config.yaml" in err and "shapes judge" in err
    on_folder, _ = evaluate(bare, "--data", data, "--num-images", 4)
    assert on_folder["scorer"] == "data" and on_folder["held_out"] is False and on_folder["val_n"] == 20
