"""log.report_to: TensorBoard (default), wandb and mlflow (offline) get the scalars and the sample grids;
a missing tracker package is one sentence naming the extra."""

import json
import sys

import pytest
from PIL import Image

from colodiffusion.config import ConfigError, load_config
from colodiffusion.train import trackers
from colodiffusion.train.trackers import Trackers

from common import TINY


def tb_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_scalars_and_images(tmp_path):
    t = Trackers(load_config(), tmp_path)
    t.scalars(3, {"loss": 0.5, "epoch": 1, "flag": True, "note": "x"})
    t.image(3, "samples", Image.new("RGB", (8, 4), (255, 0, 0)))
    t.close()
    acc = tb_events(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(3, 0.5)]
    assert set(acc.Tags()["scalars"]) == {"loss", "epoch"}  # numbers only
    (img,) = acc.Images("samples")
    assert (img.step, img.width, img.height) == (3, 8, 4)


def test_report_to_none_and_unknown_trackers(tmp_path):
    assert Trackers(load_config(None, ["log.report_to=none"]), tmp_path).open == []
    assert not (tmp_path / "tensorboard").exists()
    with pytest.raises(ConfigError, match="log.report_to' names 'comet'"):
        load_config(None, ["log.report_to=tensorboard,comet"])


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_one_sentence_naming_the_extra(monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else find_spec(n, *a))
    cfg = load_config(None, [f"log.report_to=tensorboard,{name}"])
    with pytest.raises(
        ConfigError, match=rf"needs the optional package '{name}': pip install 'colodiffusion\[{name}\]'"
    ):
        trackers.check_available(cfg)


def test_no_gpu_memory_metrics_on_the_cpu():
    import torch

    assert trackers.device_memory(torch.device("cpu")) == {}


@pytest.mark.slow
def test_training_feeds_every_tracker_offline(tmp_path, run_dir, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from colodiffusion.train import loop

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    loop.train(load_config(None, [*TINY, "train.max_steps=2", "train.sample_every=2", "sample.steps=2",
                                  f"run.dir={run_dir}", "log.report_to=all", "log.project=proj"]))
    acc = tb_events(run_dir / "tensorboard")
    assert [e.step for e in acc.Scalars("loss")] == [1, 2] and [e.step for e in acc.Images("samples")] == [2]
    (wb,) = (run_dir / "wandb").glob("offline-run-*")
    assert b"samples_per_s" in next(wb.glob("run-*.wandb")).read_bytes()
    assert list((wb / "files" / "media" / "images").glob("samples_2_*.png"))
    (exp,) = [p for p in (run_dir / "mlruns").iterdir() if p.is_dir() and p.name not in ("0", ".trash", "models")]
    (mrun,) = [p for p in exp.iterdir() if p.is_dir()]
    assert (mrun / "metrics" / "loss").read_text().count("\n") == 2
    assert (mrun / "params" / "train.max_steps").read_text() == "2"
    assert list((mrun / "artifacts" / "images").glob("samples+step+2+*.png"))
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
