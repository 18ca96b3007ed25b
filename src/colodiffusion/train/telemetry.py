"""Metrics as JSON lines and TensorBoard, and a progress bar; only the main rank writes.

A run that starts at step N (resumed, or N = 0) first cuts both logs back to step N: the steps a
killed attempt logged after its last checkpoint are trained again and must not appear twice."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm import tqdm


class Telemetry:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool = True, trackers=None):
        """`trackers`: the experiment trackers of log.report_to (train/trackers.py), fed on the main rank."""
        self.enabled = enabled
        self.bar = None
        self.tb = None
        if not enabled:
            return
        cut_metrics(run_dir / "metrics.jsonl", start_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.tb = trackers
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0)
        self._t = time.perf_counter()
        self._last_step = start_step

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics, "time": round(time.time(), 3)}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            self.tb.scalars(step, metrics)
        if "loss" in metrics:  # (validation records carry val_loss only)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics.get('samples_per_s', 0):.1f}",
                                 refresh=False)

    def image(self, step: int, name: str, image) -> None:
        """A PIL image (the sample grid) to the trackers."""
        if self.enabled and self.tb is not None:
            self.tb.image(step, name, image)

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


def cut_metrics(path: Path, step: int) -> None:
    """Keep the records of steps up to `step`; drop later ones and lines cut short by a kill."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
