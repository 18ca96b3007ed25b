"""Wall time of `colodiffusion [COMMAND] --help` (a fresh interpreter each time), as JSON lines.

    python bench/help_time.py [--repeat 5] [--baseline-src OLD/src]

Each command's median over --repeat runs, for the package under src/ (and, with --baseline-src,
for another copy of the package in the same run, e.g. `git archive OLD src | tar -x -C /tmp/old`),
with the ratio. The parser must not import torch or diffusers (tests/test_ux.py checks it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [[], ["train"], ["sample"], ["eval"], ["export"], ["cache"], ["bench"], ["config"]]
SRC = Path(__file__).resolve().parents[1] / "src"


def help_seconds(src: Path, command: list[str], repeat: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "colodiffusion", *command, "--help"], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--baseline-src", type=Path, help="another copy of the package's src/ to time in the same run")
    args = p.parse_args()
    for command in COMMANDS:
        record = {"command": " ".join(["colodiffusion", *command, "--help"]),
                  "median_s": round(help_seconds(SRC, command, args.repeat), 3)}
        if args.baseline_src:
            record["baseline_median_s"] = round(help_seconds(args.baseline_src, command, args.repeat), 3)
            record["speedup"] = round(record["baseline_median_s"] / record["median_s"], 1)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
