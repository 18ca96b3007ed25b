"""Time the UNet training step: a thin entry point over `colodiffusion.bench` (same as `colodiffusion bench`).

    python bench/train_step.py --baseline --fast --batch 32          # sd15 at 512 px on a GPU
    python bench/train_step.py --preset tiny --batch 4 --steps 2     # CPU smoke run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from colodiffusion.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
