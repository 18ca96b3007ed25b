"""Metrics as JSON lines and TensorBoard, and a progress bar; only the main rank writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


class Telemetry:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.tb = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; degrade to JSON lines if it is broken
            self.tb = None
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0)
        self._t = time.perf_counter()
        self._last_step = start_step

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics, "time": round(time.time(), 3)}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if "loss" in metrics:  # (validation records carry val_loss only)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics.get('samples_per_s', 0):.1f}",
                                 refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
