"""End-to-end data runs (tiny): webdataset with every kind of bad sample, parquet, and the latent
cache (same loss as training from images; resumes after a kill)."""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import run_cli  # noqa: E402
from datagen import make_folder, make_parquet  # noqa: E402

from colodiffusion.data.latents import mmap_safetensors  # noqa: E402
from test_data_sources import corrupt_webdataset  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["data.resolution=16", "first_stage.steps=2", "first_stage.scale_samples=16", "first_stage.batch_size=8",
        "train.batch_size=8", "train.sample_every=0", "train.log_every=1", "train.checkpoint_every=0",
        "diffusion.caption_dropout=0.3"]


def cli(*args, env=None, check=True):
    """The command in this process (common.run_cli); in a process of its own where `env` sets a fault to inject."""
    if env is None:
        p = run_cli(*args)
    else:
        p = subprocess.run([sys.executable, "-m", "colodiffusion", *map(str, args)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **env}, timeout=240)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr[-3000:])
    return p


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_webdataset_with_bad_samples_trains_and_reports(tmp_path):
    pattern, expected, _ = corrupt_webdataset(tmp_path / "w")
    run = tmp_path / "run"
    cli("train", f"run.dir={run}", "data.source=webdataset", f"data.path={pattern}", "data.num_workers=2",
        "data.max_bad_fraction=0.6", "train.max_steps=4", *TINY)
    listed = [json.loads(line) for line in (run / "bad_samples.jsonl").read_text().splitlines()]
    assert {"unreadable_shard", "corrupt_tar"} <= {r["reason"] for r in listed}
    last = metrics(run)[-1]
    counted = {k[4:]: v for k, v in last.items() if k.startswith("bad/")}
    assert sum(counted.values()) == len(listed) and len(counted) >= 8
    assert (run / "final" / "model_index.json").exists()
    p = cli("train", f"run.dir={tmp_path / 'strict'}", "data.source=webdataset", f"data.path={pattern}",
            "data.max_bad_fraction=0.05", "train.max_steps=6", *TINY, check=False)
    assert p.returncode == 2 and "data.max_bad_fraction=0.05" in p.stderr and "Traceback" not in p.stderr
    # found by the preflight probe, before the autoencoder stage spent any time
    assert "samples probed" in p.stderr and not (tmp_path / "strict").exists()  # no run folder left behind


@pytest.mark.slow
def test_one_bad_file_among_twenty_trains_with_the_defaults(tmp_path):
    """The own-data report: one truncated PNG among 20 images must not stop a 3-epoch run."""
    root = make_folder(tmp_path / "f", 20)
    victim = sorted(root.glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:len(victim.read_bytes()) // 2])
    run = tmp_path / "run"
    cli("train", f"run.dir={run}", "data.source=folder", f"data.path={root}", "train.max_steps=6", *TINY)
    listed = [json.loads(line) for line in (run / "bad_samples.jsonl").read_text().splitlines()]
    assert [(r["key"], r["reason"]) for r in listed] == [(victim.name, "truncated")]
    assert metrics(run)[-1]["epoch"] >= 2 and metrics(run)[-1]["bad/truncated"] == 1


@pytest.mark.slow
def test_parquet_trains(tmp_path):
    import pyarrow.parquet as pq

    path = make_parquet(tmp_path / "p.parquet", 32, row_group=8)
    run = tmp_path / "run"
    cli("train", f"run.dir={run}", "data.source=parquet", f"data.path={path}",
        "data.image_column=jpg", "data.caption_column=text", "data.shuffle=block", "train.max_steps=2", *TINY)
    # It trained on the file's 32 rows and their `text` captions (run_info.json counts what the run read) ...
    info = json.loads((run / "run_info.json").read_text())
    captions = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    assert (info["num_train_images"], info["data_dir"]) == (32, "p.parquet")
    assert info["tag_frequency"] == dict(Counter(captions))
    # ... for two steps with finite losses, and exported the result.
    assert [m["step"] for m in metrics(run)] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics(run))
    assert (run / "final" / "model_index.json").exists()


@pytest.mark.slow
def test_latent_cache_matches_images_and_resumes(tmp_path):
    make_folder(tmp_path / "f", 32)
    data = ["data.source=folder", f"data.path={tmp_path / 'f'}", *TINY]
    images = tmp_path / "images"
    cli("train", f"run.dir={images}", "train.max_steps=3", *data)
    full = tmp_path / "cache_full"
    cli("cache", "--out", full, "--shard-size", 6, f"run.dir={images}", *data)  # reuses the run's frozen VAE
    # killed after two shards (os._exit, like SIGKILL: a half-written temp file stays behind)
    part = tmp_path / "cache"
    p = cli("cache", "--out", part, "--shard-size", 6, f"run.dir={images}", *data,
            env={"COLODIFFUSION_CACHE_CRASH_AFTER": "2"}, check=False)
    assert p.returncode == 137 and not (part / "manifest.json").exists()
    kept = {k: (part / f"shard-{k:05d}.safetensors").stat().st_mtime_ns for k in (0, 1)}
    p = cli("cache", "--out", part, "--shard-size", 6, f"run.dir={images}", *data)
    assert "kept 2 finished shard(s), 4 to do" in p.stdout
    assert all((part / f"shard-{k:05d}.safetensors").stat().st_mtime_ns == t for k, t in kept.items())
    assert not list(part.glob("*.tmp*"))
    # a damaged shard is detected by its hash and recomputed
    shard = part / "shard-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")
    p = cli("cache", "--out", part, "--shard-size", 6, f"run.dir={images}", *data)
    assert "kept 5 finished shard(s), 1 to do" in p.stdout
    for k in range(6):  # same tensors and metadata as the uninterrupted cache (header key order may differ)
        (ta, ma), (tb, mb) = (mmap_safetensors(d / f"shard-{k:05d}.safetensors") for d in (part, full))
        assert ma == mb and ta.keys() == tb.keys() and all((ta[n] == tb[n]).all() for n in ta)
    manifest = json.loads((part / "manifest.json").read_text())
    assert manifest["num_samples"] == 32 and len(manifest["shards"]) == 6

    latents = tmp_path / "latents"
    cli("train", f"run.dir={latents}", "train.max_steps=3", *TINY, "data.source=latents", f"data.path={part}")
    a, b = metrics(images), metrics(latents)
    # Same frozen VAE, seed and noise stream; the only difference is fp16 storage of the moments
    # and context, so losses agree to 1e-3 relative (fp32 compute on CPU).
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-3 * abs(x["loss"]), (x["loss"], y["loss"])


def _train_in_process(run, *overrides):
    import torch

    from colodiffusion.config import load_config
    from colodiffusion.train import loop

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loop.train(load_config(None, [f"run.dir={run}", "data.source=shapes", "data.num_samples=16",
                                      "train.max_steps=4", "train.warmup_steps=1", *TINY, *overrides]))
    finally:
        torch.set_num_threads(threads)
    return [m["loss"] for m in metrics(run) if "loss" in m]


@pytest.mark.slow
def test_shapes_latents_in_memory_train_as_encoding_would(tmp_path, monkeypatch, capsys):
    """data.cache_latents: each shapes image is encoded once before training, and the steps sample the
    same latents (same generator draws) as encoding each batch would: the losses agree to float noise."""
    from colodiffusion.train import loop

    calls = []
    real = loop.encode_images
    monkeypatch.setattr(loop, "encode_images", lambda *a: calls.append(1) or real(*a))
    encoded = _train_in_process(tmp_path / "memory", "data.cache_latents=true")
    assert calls == [] and "16 images encoded once" in capsys.readouterr().out
    pixels = _train_in_process(tmp_path / "pixels", "data.cache_latents=false")  # same seed: same autoencoder
    assert len(calls) == 4 and len(encoded) == len(pixels) == 4
    for x, y in zip(encoded, pixels):
        assert abs(x - y) <= 1e-4 * abs(y), (encoded, pixels)


def test_latents_in_memory_only_when_images_are_read_again(tmp_path):
    """null (the default) caches when the run reads each image more than once; never for image data."""
    from types import SimpleNamespace

    from colodiffusion.config import ConfigError, load_config
    from colodiffusion.data.shapes import ShapesDataset
    from colodiffusion.train.build import encode_once

    shapes = ShapesDataset(16, 16)
    comps = SimpleNamespace(is_sdxl=False, vae=None)  # never touched when nothing is encoded
    backend = SimpleNamespace(is_main=True)
    for steps in (1, 2):  # 8 or 16 reads of 16 images
        cfg = load_config(None, [f"run.dir={tmp_path}", "data.num_samples=16", f"train.max_steps={steps}", *TINY])
        assert encode_once(cfg, backend, comps, shapes) is shapes
    with pytest.raises(ConfigError, match="data.cache_latents is for the shapes data"):
        load_config(None, ["data.source=folder", f"data.path={tmp_path}", "data.cache_latents=true"])
