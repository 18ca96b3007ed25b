"""Samples per second per loader worker for each data source; prints one JSON object.

Each source is read through the real `ResumableLoader` (shuffled, bad-sample wrapper, collate) in
the main process (num_workers=0), so the rate is what one DataLoader worker delivers; with W
workers multiply by about W while cores last. Image sources use synthetic photo-like JPEGs;
the latent cache holds SD-sized entries (4x64x64 fp16 moments x2 + 77x768 fp16 context).

    PYTHONPATH=src python bench/data.py [--images 256] [--latents 4096] [--size 512]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, features
from safetensors.torch import save_file


def photo_jpeg(rng, w: int, h: int) -> bytes:
    """Smooth random content (upsampled noise plus gradients) compresses like a photo, not like noise."""
    small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_images(root: Path, n: int, size: int):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    rng = np.random.default_rng(0)
    items = [(f"{i:06d}", photo_jpeg(rng, size * 4 // 3, size), f"a photo number {i}") for i in range(n)]
    (root / "folder").mkdir()
    for k, data, cap in items:
        (root / "folder" / f"{k}.jpg").write_bytes(data)
        (root / "folder" / f"{k}.txt").write_text(cap)
    (root / "wds").mkdir()
    with wds.ShardWriter(str(root / "wds" / "%05d.tar"), maxcount=64, verbose=0) as sink:
        for k, data, cap in items:
            sink.write({"__key__": k, "jpg": data, "txt": cap.encode(), "json": b"{}"})
    pq.write_table(pa.table({"image": [d for _, d, _ in items], "caption": [c for _, _, c in items]}),
                   root / "data.parquet", row_group_size=64)
    return items


def make_latents(root: Path, n: int, per_shard: int = 1024):
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    shards = []
    for k in range(0, n, per_shard):
        m = min(per_shard, n - k)
        t = {
            "mean": torch.randn(m, 4, 64, 64, generator=g).half(),
            "logvar": torch.randn(m, 4, 64, 64, generator=g).half(),
            "context": torch.randn(m, 77, 768, generator=g).half(),
        }
        name = f"shard-{k // per_shard:05d}.safetensors"
        save_file(t, str(root / name), metadata={"captions": json.dumps([f"c{i}" for i in range(m)]),
                                                  "keys": json.dumps([str(k + i) for i in range(m)])})
        shards.append({"file": name, "count": m})
    save_file({"context": torch.zeros(77, 768).half()}, str(root / "empty_context.safetensors"))
    (root / "manifest.json").write_text(json.dumps({"version": 1, "shards": shards, "num_samples": n}))


def rate(dataset, batch_size: int, samples: int, **kw) -> float:
    from colodiffusion.data.loader import ResumableLoader

    loader = ResumableLoader(dataset, batch_size, seed=0, num_workers=0, **kw)
    next(loader)  # open files, first shard maps
    steps = max(1, samples // batch_size)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(loader)
    return steps * batch_size / (time.perf_counter() - t0)


def decode_rates(items, size: int, crop: int) -> dict:
    from colodiffusion.data.transforms import ImageTransform

    datas = [d for _, d, _ in items]

    def timed(fn):
        fn(datas[0])
        t0 = time.perf_counter()
        for d in datas:
            fn(d)
        return round(len(datas) / (time.perf_counter() - t0), 1)

    def plain(d):
        Image.open(io.BytesIO(d)).convert("RGB")

    out = {"pillow_plain_decode": timed(plain)}
    for res in sorted({size, crop}):
        tf = ImageTransform(resolution=res, crop="random")
        out[f"colodiffusion_decode_resize_crop_{res}"] = timed(lambda d: tf.sample(d, "x", None, 0, 0))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--latents", type=int, default=4096)
    ap.add_argument("--size", type=int, default=512, help="short side of the JPEGs (long side 4/3 of it)")
    ap.add_argument("--crop", type=int, default=256, help="a second, smaller training resolution")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from colodiffusion.data.folder import FolderDataset
    from colodiffusion.data.latents import LatentDataset
    from colodiffusion.data.parquet import ParquetDataset
    from colodiffusion.data.transforms import ImageTransform
    from colodiffusion.data.webdataset import WebDataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        items = make_images(root, args.images, args.size)
        make_latents(root / "latents", args.latents)
        tf = ImageTransform(resolution=args.size, crop="random")
        sources = {
            "folder": FolderDataset(str(root / "folder"), tf),
            "webdataset": WebDataset(str(root / "wds"), tf, None),
            "parquet": ParquetDataset(str(root / "data.parquet"), tf),
        }
        result = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "decode_library": f"Pillow {PIL.__version__} (libjpeg-turbo: {features.check_feature('libjpeg_turbo')})",
            "image_size": f"{args.size * 4 // 3}x{args.size} JPEG q90 -> random crop {args.size}x{args.size}",
            "latent_entry": "mean+logvar 4x64x64 fp16, context 77x768 fp16 (182 KiB)",
            "samples_per_s_per_worker": {},
        }
        for name, ds in sources.items():
            result["samples_per_s_per_worker"][name] = round(rate(ds, args.batch, args.images), 1)
        result["samples_per_s_per_worker"]["webdataset_block_shuffle"] = round(
            rate(sources["webdataset"], args.batch, args.images, block_shuffle=True), 1)
        lat = LatentDataset(root / "latents")
        rate(lat, args.batch, args.latents)  # first pass pulls the shards into the page cache
        result["samples_per_s_per_worker"]["latents"] = round(rate(lat, args.batch, args.latents), 1)
        result["decode_per_s"] = decode_rates(items, args.size, args.crop)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
