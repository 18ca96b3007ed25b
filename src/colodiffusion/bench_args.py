"""The arguments of `colodiffusion bench`, importable without torch (so that `--help` is quick).

`bench.py` runs the benchmark; this module only defines what it accepts."""

from __future__ import annotations

import argparse
from typing import Optional

DESCRIPTION = "time the UNet training step on synthetic latents and text embeddings"
FAST = ["perf.compile=full", "perf.param_dtype=bf16", "perf.channels_last=true", "perf.fuse_qkv=true"]
"""The fast path's levers (`--fast`): the set measured at 1.43x the diffusers-default loop (H100,
sd15, batch 32, bench/RESULTS.md); overrides given after them win."""


def build_parser(p: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="bench", description=DESCRIPTION)
    p.add_argument("-c", "--config", help="YAML recipe whose model/perf/precision/train settings are benchmarked")
    p.add_argument("--preset", help="model preset (default: the recipe's, else sd15 at 512 px; tiny for CPU)")
    p.add_argument("--resolution", type=int, help="image resolution in pixels (default: the preset's)")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--steps", type=int, default=12, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--fast", action="store_true", help=f"turn on the fast path: {' '.join(FAST)}")
    p.add_argument("--baseline", action="store_true", help="also time the diffusers-default loop; print the ratio")
    p.add_argument("--memory", action="store_true", help="report peak memory of full UNet training at batch 1 and 8")
    p.add_argument("--loss-match", type=int, default=0, metavar="N",
                   help="compare N steps of losses with the eager fp32-master path (exit 1 if they differ)")
    p.add_argument("--peak-tflops", type=float, help="bf16 peak for MFU (default: a table by device name)")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--tag", help="a label copied into every JSON line (bench/gpu_check.sh names its steps)")
    p.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. perf.compile=full")
    return p


NO_SDXL = ("colodiffusion bench times SD 1.x/2.x-shaped UNets on synthetic latents; SDXL (added text/time "
           "conditioning) is not benchmarked yet: use --preset sd15, sd2 or tiny.")


def checked_config(args):
    """The benchmarked config after checking the flags (ConfigError, one sentence); no torch needed."""
    from colodiffusion.config import ConfigError, load_config

    for name in ("batch", "steps", "warmup"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be a whole number >= 1, not {getattr(args, name)}.")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise ConfigError(f"--resolution must be a multiple of 8, at least 8, not {args.resolution}.")
    if args.preset == "sdxl":
        raise ConfigError(NO_SDXL)
    preset = [f"model.preset={args.preset}"] if args.preset else ([] if args.config else ["model.preset=sd15"])
    # The bench feeds synthetic latents: a recipe's data source (and its data.path) is not read.
    overrides = ["precision=bf16", "data.source=shapes", *preset] + (FAST if args.fast else []) + args.overrides
    cfg = load_config(args.config, overrides)
    if cfg.model.preset == "sdxl":
        raise ConfigError(NO_SDXL)
    return cfg
