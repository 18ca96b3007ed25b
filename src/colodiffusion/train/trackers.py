"""Experiment trackers (`log.report_to`): TensorBoard (a dependency), Weights & Biases and MLflow
(optional extras), each getting the logged scalars and the sample grids as images. Only the main
rank opens them. Their own settings work as usual: WANDB_MODE=offline, WANDB_DIR, MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from colodiffusion.config import Config, ConfigError, report_to

EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ConfigError(f"log.report_to={name} needs the optional package '{name}': "
                          f"pip install 'colodiffusion[{EXTRAS[name]}]' (or drop it from log.report_to).") from None


def flat_config(cfg: Config) -> dict:
    """{'train.lr': 0.001, ...}: the run's hyperparameters as trackers show them."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)

    walk(dataclasses.asdict(cfg), "")
    return out


class TensorBoard:
    def __init__(self, cfg: Config, run_dir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events at or after it that an earlier (killed) attempt wrote
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

    def scalars(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def image(self, step: int, name: str, image) -> None:
        self.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, cfg: Config, run_dir: Path, start_step: int = 0):
        self.wandb = _import("wandb")
        self.run = self.wandb.init(project=cfg.log.project, name=cfg.log.run_name or run_dir.name,
                                   dir=os.environ.get("WANDB_DIR") or str(run_dir), config=flat_config(cfg))

    def scalars(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def image(self, step: int, name: str, image) -> None:
        self.run.log({name: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()
        # wandb keeps a service process until the interpreter exits; a run in a longer-lived process
        # (a notebook, a test) would leave it behind
        self.wandb.teardown()


class MLflow:
    def __init__(self, cfg: Config, run_dir: Path, start_step: int = 0):
        self.mlflow = _import("mlflow")
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # no server given: a local store in the run folder
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow>=3 wants it said for file stores
            self.mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        self.mlflow.set_experiment(cfg.log.project)
        self.run = self.mlflow.start_run(run_name=cfg.log.run_name or run_dir.name)
        params = {k: str(v)[:500] for k, v in flat_config(cfg).items()}  # mlflow limits a value's length
        self.mlflow.log_params(params)

    def scalars(self, step: int, metrics: dict) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def image(self, step: int, name: str, image) -> None:
        self.mlflow.log_image(image, key=name, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


OPENERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Trackers:
    """The trackers named by log.report_to, fed together."""

    def __init__(self, cfg: Config, run_dir: Path, start_step: int = 0):
        self.open = []
        try:
            for name in report_to(cfg):
                self.open.append(OPENERS[name](cfg, run_dir, start_step))
        except BaseException:
            self.close()
            raise

    def scalars(self, step: int, metrics: dict) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for t in self.open:
            t.scalars(step, numbers)

    def image(self, step: int, name: str, image) -> None:
        for t in self.open:
            t.image(step, name, image)

    def close(self) -> None:
        for t in self.open:
            t.close()
        self.open = []


def check_available(cfg: Config) -> None:
    """Fail before training (one sentence) when a named tracker's package is missing."""
    import importlib.util

    for name in report_to(cfg):
        if name in EXTRAS and importlib.util.find_spec(name) is None:
            _import(name)


def device_memory(device: torch.device) -> dict:
    """Peak and reserved accelerator memory since the last call (GiB); nothing on the CPU."""
    if device.type != "cuda":
        return {}
    gib = 1024 ** 3
    out = {"gpu_mem_peak_gb": torch.cuda.max_memory_allocated(device) / gib,
           "gpu_mem_reserved_gb": torch.cuda.memory_reserved(device) / gib}
    torch.cuda.reset_peak_memory_stats(device)
    return out
