"""`colodiffusion cache`: precompute VAE posterior moments and text-encoder outputs once.

The dataset (in its own order, no shuffle) is cut into shards of `shard_size` samples; under
`torchrun` rank r encodes shards r, r + world, ... Each finished shard is published atomically
(written to a temporary name, then renamed) with a marker shard-NNNNN.json holding its sample count,
size and SHA-256. A rerun keeps every shard whose file still matches its marker and recomputes the
rest, so a cache killed part way resumes where it stopped. Bad samples are skipped (not replaced)
and listed in CACHE/bad_samples.jsonl. The last step writes manifest.json, which training reads.

The output folder is claimed like a run folder (storage/owned.py: new, empty or a cache of ours;
locked while the cache is made). `plan.json` records what the shards are made from (data, model,
frozen parts' run folder, resolution, shard size, the dataset's keys); a rerun with another plan
(other data in the same --out) removes the old shards and components and makes them again, and a
shard's marker carries the plan too, so a shard of another plan is never kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from colodiffusion.config import Config, ConfigError
from colodiffusion.data.latents import MANIFEST
from colodiffusion.data.transforms import BadSample, Filtered
from colodiffusion.models import Components, encode_prompts
from colodiffusion.storage import owned
from colodiffusion.storage.files import loads_json, sha256
from colodiffusion.storage.sealed import is_sealed, write_sealed

PLAN = "plan.json"


def shard_done(out: Path, k: int, plan: str) -> bool:
    """A shard counts as done only if its marker exists, names this plan, and the file matches its size and hash."""
    marker, data = out / f"shard-{k:05d}.json", out / f"shard-{k:05d}.safetensors"
    try:
        m = loads_json(marker.read_text())
        return m.get("plan") == plan and data.stat().st_size == m["bytes"] and sha256(data) == m["sha256"]
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def make_plan(cfg: Config, dataset, shard_size: int) -> dict:
    """What the shards are made from: a cache made from anything else is another cache."""
    d, m = cfg.data, cfg.model
    local = d.path and "://" not in d.path and Path(d.path).exists()
    keys = "\n".join(dataset.key(i) if hasattr(dataset, "key") else str(i) for i in range(len(dataset)))
    return {"data.source": d.source, "data.path": str(Path(d.path).resolve()) if local else d.path,
            "data.resolution": d.resolution, "data.crop": d.crop, "data.caption_column": d.caption_column,
            "data.image_column": d.image_column, "data.num_samples": d.num_samples if d.source == "shapes" else None,
            "model": [m.preset, m.pretrained, m.revision, m.variant, m.vae, m.text_encoder, m.tokenizer],
            "run.dir": str(Path(cfg.run.dir).resolve()), "train.seed": cfg.train.seed, "shard_size": shard_size,
            "samples": len(dataset), "keys_sha256": hashlib.sha256(keys.encode()).hexdigest()}


def _is_legacy_cache(folder: Path) -> bool:
    """A cache made before the folder marker: its manifest or shard markers."""
    return (folder / MANIFEST).is_file() or any(folder.glob("shard-*.json"))


def plan_id(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def _start_over_if_replanned(out: Path, plan: dict) -> None:
    """Remove what another plan made in `out` (main rank, holding the cache's lock), then record this plan."""
    try:
        old = loads_json((out / PLAN).read_text())
    except (OSError, ValueError):
        old = None
    made = [p for p in out.iterdir() if p.name.startswith("shard-") or p.name in (
        MANIFEST, "components", "empty_context.safetensors", "bad_samples.jsonl")]
    if old != plan and made:
        changed = sorted(k for k in plan if not isinstance(old, dict) or old.get(k) != plan[k])
        print(
            f"latent cache {out} was made from other data or settings ({', '.join(changed)} changed): making it again"
        )
        for p in made:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    _atomic_json(out / PLAN, plan)


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class _Ranks:
    """Rank, world size and barrier from torchrun's environment (gloo: works on CPU and GPU hosts)."""

    def __init__(self, timeout_s: float):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        if self.world > 1:
            import datetime

            import torch.distributed as dist

            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))  # parallel.timeout_s
        self.is_main = self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


@torch.no_grad()
def encode_shard(comps, dataset, indices: range, device, batch_size: int, bad_log: Path) -> dict:
    means, logvars, contexts, captions, keys = [], [], [], [], []
    pending: list[tuple[int, dict]] = []

    def flush():
        if not pending:
            return
        x = torch.stack([s["pixel_values"] for _, s in pending]).to(device, comps.vae.dtype)
        dist = comps.vae.encode(x).latent_dist
        text = [s["caption"] for _, s in pending]
        means.append(dist.mean.half().cpu())
        logvars.append(dist.logvar.half().cpu())
        contexts.append(encode_prompts(comps.tokenizer, comps.text_encoder, text, device).half().cpu())
        captions.extend(text)
        keys.extend(dataset.key(i) if hasattr(dataset, "key") else str(i) for i, _ in pending)
        pending.clear()

    for i in indices:
        try:
            pending.append((i, dataset[i]))
        except BadSample as exc:
            with open(bad_log, "a", encoding="utf-8") as f:
                key = dataset.key(i) if hasattr(dataset, "key") else str(i)
                f.write(json.dumps({"source": getattr(dataset, "name", "?"), "key": key, "reason": exc.reason}) + "\n")
        except Filtered:
            pass
        if len(pending) == batch_size:
            flush()
    flush()
    if not captions:
        return {"count": 0}
    return {"tensors": {"mean": torch.cat(means).contiguous(), "logvar": torch.cat(logvars).contiguous(),
                        "context": torch.cat(contexts).contiguous()},
            "metadata": {"captions": json.dumps(captions), "keys": json.dumps(keys)}, "count": len(captions)}


def write_shard(out: Path, k: int, result: dict, plan: str) -> None:
    data = out / f"shard-{k:05d}.safetensors"
    if result["count"]:
        tmp = data.with_name(data.name + f".tmp{os.getpid()}")
        save_file(result["tensors"], str(tmp), metadata=result["metadata"])
        os.replace(tmp, data)
    else:  # every sample of the shard was bad: an empty marker, no file
        data.write_bytes(b"")
    _atomic_json(out / f"shard-{k:05d}.json",
                 {"count": result["count"], "bytes": data.stat().st_size, "sha256": sha256(data), "plan": plan})


def build_cache(cfg: Config, out: str | Path, make_components: Callable[[Dataset, torch.device, bool], Components],
                shard_size: int = 1000, batch_size: int = 32) -> Path:
    """Encode the dataset into `out`. `make_components(dataset, device, is_main)` builds (on the main
    rank, which goes first: the tiny preset trains its first stage there) or loads the frozen parts;
    the caller supplies it, so that data never trains a model."""
    from colodiffusion.data import build_dataset, dataset_args

    if cfg.data.source == "latents":
        raise ConfigError("colodiffusion cache reads images: set data.source to folder, webdataset, parquet or shapes.")
    if cfg.data.bucketing:
        raise ConfigError("colodiffusion cache stores one resolution: turn data.bucketing off.")
    if cfg.model.preset == "sdxl":
        raise ConfigError("colodiffusion cache does not support model.preset=sdxl (it stores one text encoder's "
                          "context and no image sizes): train SDXL from the images.")
    out = Path(out)
    ranks = _Ranks(cfg.parallel.timeout_s)
    lock = None
    try:
        dataset = build_dataset(*dataset_args(cfg))
        plan = make_plan(cfg, dataset, shard_size)
        if ranks.is_main:  # ours, locked, and emptied of another plan's shards before anyone reads them
            lock = owned.claim(out, "cache", "--out", legacy=_is_legacy_cache)
            _start_over_if_replanned(out, plan)
        comps = make_components(dataset, ranks.device, True) if ranks.is_main else None
        ranks.barrier()
        comps = comps or make_components(dataset, ranks.device, False)
        comps.vae.to(ranks.device)
        comps.text_encoder.to(ranks.device)
        if ranks.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / MANIFEST).unlink(missing_ok=True)  # the manifest marks a finished cache
            _save_components(comps, out / "components")
            empty = encode_prompts(comps.tokenizer, comps.text_encoder, [""], ranks.device)[0].half().cpu()
            save_file({"context": empty.contiguous()}, str(out / "empty_context.safetensors"))
        ranks.barrier()
        n = len(dataset)
        shards = (n + shard_size - 1) // shard_size
        mine = list(range(ranks.rank, shards, ranks.world))
        todo = [k for k in mine if not shard_done(out, k, plan_id(plan))]
        if len(todo) < len(mine):
            print(f"rank {ranks.rank}: kept {len(mine) - len(todo)} finished shard(s), {len(todo)} to do")
        total = sum(len(range(k * shard_size, min(n, (k + 1) * shard_size))) for k in todo)
        bar = tqdm(total=total, desc=f"cache (rank {ranks.rank})", unit="img", position=ranks.rank,
                   mininterval=1.0, disable=total == 0)
        crash_after = int(os.environ.get("COLODIFFUSION_CACHE_CRASH_AFTER", "-1"))  # tests: die like a kill
        for done, k in enumerate(todo):
            if done == crash_after:
                (out / f"shard-{k:05d}.safetensors.tmp{os.getpid()}").write_bytes(b"partial")
                os._exit(137)
            idx = range(k * shard_size, min(n, (k + 1) * shard_size))
            write_shard(out, k, encode_shard(comps, dataset, idx, ranks.device, batch_size, out / "bad_samples.jsonl"),
                        plan_id(plan))
            bar.update(len(idx))
        bar.close()
        ranks.barrier()
        if ranks.is_main:
            _write_manifest(cfg, comps, out, shards, n)
        ranks.barrier()
        return out
    finally:
        if lock is not None:
            lock.release()
        ranks.close()


def _save_components(comps, folder: Path) -> None:
    """The frozen parts the latents were made with, each a sealed folder (`storage/sealed.py`)."""
    for name in ("tokenizer", "text_encoder", "vae"):
        if not is_sealed(folder / name):
            write_sealed(folder / name, getattr(comps, name).save_pretrained)


def _write_manifest(cfg: Config, comps, out: Path, shards: int, n: int) -> None:
    entries = []
    for k in range(shards):
        m = json.loads((out / f"shard-{k:05d}.json").read_text())
        for tmp in out.glob(f"shard-{k:05d}.safetensors.tmp*"):  # leftovers of a killed run
            tmp.unlink()
        if m["count"]:
            entries.append({"file": f"shard-{k:05d}.safetensors", **m})
    factor = comps.vae.config.get("scaling_factor", 1.0)
    _atomic_json(out / MANIFEST, {
        "version": 1, "source": cfg.data.source, "path": cfg.data.path, "resolution": cfg.data.resolution,
        "num_samples": sum(e["count"] for e in entries), "dataset_size": n, "scaling_factor": factor,
        "shards": entries,
    })
