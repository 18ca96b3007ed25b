"""Checks before any compute is spent (before the autoencoder stage): the run folder takes a
checkpoint, the data reads (64 samples spread over the dataset, skipped and judged as the loader
does), the config fits the world. Each failure is one sentence (ConfigError, exit code 2), on every rank.
"""

from __future__ import annotations

import math
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from colodiffusion.config import Config, ConfigError
from colodiffusion.data.loader import probe, too_many_bad
from colodiffusion.models import bounds
from colodiffusion.train import signals

# Bytes per trainable parameter in a checkpoint: fp32 weights + fp32 EMA + AdamW's two fp32 moments.
BYTES_PER_PARAM = 16
SLACK = 1.10  # file headers, RNG and loader state, the manifest


def unet_parameters(cfg: Config) -> int:
    """UNet parameter count, without reading weights: from the UNet's config on the meta device (the
    preset's for model.init=scratch, an unset model.pretrained or a folder without unet/), or from a
    single .safetensors file's header. A Hub id is resolved first (its one sentence if it is not there)."""
    from diffusers import UNet2DConditionModel

    from colodiffusion.models import hub
    from colodiffusion.models.presets import build_unet, get_preset

    m = cfg.model
    # The folder loading reads (a Hub id: its snapshot, which must lie inside the Hub cache), bounded
    # before diffusers builds what its config says; a single .safetensors is counted from its header.
    root = hub.resolve(m.pretrained, "model.pretrained", m.revision, m.variant) \
        if m.pretrained and m.init != "scratch" else None
    if root is not None and root.is_file():
        counted = _single_file_unet_parameters(root)
        if counted:
            return counted
    with torch.device("meta"):
        if root is not None and (root / "unet").is_dir():
            bounds.check_folder(root / "unet", "UNet")
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root, subfolder="unet"))
        else:  # the preset's shape: a fresh UNet, or a .ckpt (not unpickled for an estimate) of that family
            unet = build_unet(get_preset(m.preset))
    return sum(p.numel() for p in unet.parameters())


def _single_file_unet_parameters(path: Path) -> int:
    """Parameters under the LDM layout's UNet prefix, from a .safetensors header (0 for anything else)."""
    if path.suffix != ".safetensors":
        return 0
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = [f.get_slice(k).get_shape() for k in f.keys() if k.startswith("model.diffusion_model.")]
    except Exception:  # an unreadable file is the loader's to explain, with its own sentence
        return 0
    return sum(math.prod(shape) for shape in shapes)


def checkpoint_bytes(cfg: Config) -> int:
    per_param = BYTES_PER_PARAM if cfg.train.ema.enabled else BYTES_PER_PARAM - 4
    return int(unet_parameters(cfg) * per_param * SLACK)


def _writable(folder: Path) -> Optional[str]:
    probe = folder / f".preflight-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return f"the run folder '{folder}' is not writable ({exc.strerror or exc}); choose another run.dir"
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return None


def _space(cfg: Config, folder: Path) -> Optional[str]:
    try:
        need = checkpoint_bytes(cfg)
    except ConfigError as exc:  # e.g. a Hub id that is not in the cache: said here, and on every rank
        return str(exc).rstrip(".")
    free = shutil.disk_usage(folder).free
    if free < need:
        return (f"the run folder '{folder}' has {free / 2**20:.0f} MiB free but one checkpoint needs about "
                f"{need / 2**20:.0f} MiB; free space or choose another run.dir")
    return None


PROBE_SAMPLES = 64  # samples read before training: a few seconds, even from object storage


def _data(cfg: Config, backend, dataset) -> tuple[Optional[str], list[dict]]:
    """(what stops the run or None, the bad samples the probe met)."""
    per_rank = cfg.train.batch_size // max(1, backend.dp_size) // cfg.train.grad_accum
    if len(dataset) // max(1, backend.dp_size) < per_rank:
        return (f"the dataset has {len(dataset)} samples, fewer than one batch of {per_rank} per rank on "
                f"{backend.dp_size} rank(s); lower train.batch_size or add data"), []
    try:
        read, bad, filtered = probe(dataset, PROBE_SAMPLES)
    except Exception as exc:  # not a bad sample but a reader failure: the point is to say it before training
        msg = (str(exc).splitlines() or [""])[0][:200]
        return f"the training data cannot be read ({type(exc).__name__}: {msg}); check data.source and data.path", []
    tried = read + len(bad) + sum(filtered.values())
    where = f" of data.path '{cfg.data.path}'" if cfg.data.path else ""
    reasons = ", ".join(f"{n} {r}" for r, n in Counter(b["reason"] for b in bad).most_common())
    example = f", such as '{bad[0]['key']}'" if bad else ""
    if read == 0:
        filters = f", {sum(filtered.values())} filtered out" if filtered else ""
        return (f"none of the {tried} samples probed{where} can be used ({len(bad)} bad: {reasons or 'none'}"
                f"{example}{filters}); check data.source, data.path and the data.* filters"), bad
    if too_many_bad(len(bad), tried, cfg.data.max_bad_fraction):
        return (f"{len(bad)} of the {tried} samples probed{where} are bad ({reasons}{example}), more than "
                f"data.max_bad_fraction={cfg.data.max_bad_fraction} allows; fix the data or raise the limit"), bad
    if bad and backend.is_main:  # below the limit they are skipped, but never silently
        keys = ", ".join(f"'{k}'" for k in dict.fromkeys(b["key"] for b in bad))
        print(f"{len(bad)} of the {tried} samples probed{where} cannot be used and are skipped ({reasons}: "
              f"{keys}); bad_samples.jsonl lists each one the run meets")
    return None, bad


def check(cfg: Config, backend, run_dir: Path, dataset) -> set[int]:
    """Raise ConfigError (on every rank) if the run cannot checkpoint or read its data; return the
    indices of the bad samples the probe met (all of them for a dataset of up to PROBE_SAMPLES)."""
    problem, bad = _data(cfg, backend, dataset)
    if problem is None and backend.is_main:
        problem = _writable(run_dir / "checkpoints") or _space(cfg, run_dir)
    if not signals.all_ranks(backend, problem is None):
        raise ConfigError(problem or "preflight failed on another rank (see its message)")
    if cfg.train.debug_nan_steps and backend.is_main:
        print(f"warning: train.debug_nan_steps={list(cfg.train.debug_nan_steps)} makes those steps' loss NaN (a test "
              "hook)")
    return {b["index"] for b in bad}
