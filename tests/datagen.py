"""Small datasets on disk for the data tests: shapes images as folder / webdataset / parquet,
and the corrupt inputs of the bad-sample suite."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from colodiffusion.data.shapes import ShapesDataset


def shapes_items(n: int, resolution: int = 16, seed: int = 0):
    """n (jpeg bytes, caption) pairs; images vary in size so resize/crop are exercised."""
    ds = ShapesDataset(n, resolution=resolution, seed=seed)
    for i in range(n):
        x = ds[i]
        arr = ((x["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr).resize((resolution + 4 * (i % 3), resolution))
        buf = io.BytesIO()
        img.save(buf, format="JPEG" if i % 4 else "PNG", quality=95)
        yield f"{i:06d}", buf.getvalue(), x["caption"]


def make_folder(root: Path, n: int, resolution: int = 16, captions: str = "txt") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    table = []
    for key, data, cap in shapes_items(n, resolution):
        ext = ".jpg" if data[:2] == b"\xff\xd8" else ".png"
        (root / f"{key}{ext}").write_bytes(data)
        if captions == "txt":
            (root / f"{key}.txt").write_text(cap)
        else:
            table.append({"file": f"{key}{ext}", "caption": cap})
    if captions == "jsonl":
        (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table))
    elif captions == "csv":
        import csv

        with open(root / "captions.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["file", "caption"])
            w.writeheader()
            w.writerows(table)
    return root


def make_webdataset(root: Path, n: int, per_shard: int, resolution: int = 16, extra=()) -> str:
    """Shards written by webdataset's own ShardWriter, img2dataset layout (jpg/png + txt + json)."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    items = list(shapes_items(n, resolution)) + list(extra)
    with wds.ShardWriter(str(root / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for key, data, cap, *meta in items:
            ext = "jpg" if data[:2] == b"\xff\xd8" or data[:1] != b"\x89" else "png"
            sample = {"__key__": key, ext: data, "json": json.dumps(meta[0] if meta else {"key": key}).encode()}
            if cap is not None:
                sample["txt"] = cap if isinstance(cap, bytes) else cap.encode()
            sink.write(sample)
    shards = sorted(root.glob("*.tar"))
    return str(root / f"{{00000..{len(shards) - 1:05d}}}.tar")


def make_parquet(path: Path, n: int, resolution: int = 16, row_group: int = 16, extra=()) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(shapes_items(n, resolution)) + list(extra)
    table = pa.table({
        "key": [r[0] for r in rows],
        "jpg": [r[1] for r in rows],
        "text": [r[2] for r in rows],
        "punsafe": [float(r[3]["punsafe"]) if len(r) > 3 else 0.01 for r in rows],
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group)
    return path


# -- corrupt inputs --------------------------------------------------------------------------------
def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def bomb_png(side: int = 30000) -> bytes:
    """A PNG whose header claims side x side pixels (a decompression bomb's signature)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8  # signature, then length + b"IHDR" + data + crc
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", side, side)
    crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 8 + 13])) & 0xFFFFFFFF
    data[ihdr + 8 + 13:ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


def good_png_bytes(seed: int = 1, size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def image_bytes(fmt: str, size: int = 20, frames: int = 1) -> bytes:
    """A small image in any format Pillow writes (GIF with several frames when asked)."""
    imgs = [Image.new("RGB", (size, size), (40 * k, 90, 160)) for k in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, fmt, save_all=frames > 1, append_images=imgs[1:])
    return buf.getvalue()


def make_latent_cache(root: Path, n: int = 6, per_shard: int = 3) -> Path:
    """A latent cache in the layout `colodiffusion cache` writes (manifest, shards, empty context)."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, n, per_shard)):
        count = min(per_shard, n - start)
        tensors = {"mean": torch.randn(count, 4, 2, 2).half(), "logvar": torch.zeros(count, 4, 2, 2).half(),
                   "context": torch.randn(count, 3, 8).half()}
        meta = {"captions": json.dumps([f"c{start + r}" for r in range(count)]),
                "keys": json.dumps([f"k{start + r}" for r in range(count)])}
        save_file(tensors, str(root / f"shard-{k:05d}.safetensors"), metadata=meta)
        shards.append({"file": f"shard-{k:05d}.safetensors", "count": count})
    save_file({"context": torch.zeros(1, 3, 8).half()}, str(root / "empty_context.safetensors"))
    (root / "manifest.json").write_text(json.dumps({"version": 1, "num_samples": n, "shards": shards}))
    return root


def make_tiny_clip(folder: Path, captions=("a red circle", "a blue square", "a green triangle")) -> Path:
    """A CLIP model with a tiny config, random weights and a tokenizer trained offline, saved as
    save_pretrained writes it (config.json + model.safetensors): what eval.clip_model points to."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from colodiffusion.models.tokenizer import train_clip_tokenizer

    tok = train_clip_tokenizer(list(captions) * 4, vocab_size=300, max_length=16)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(common, vocab_size=len(tok), max_position_embeddings=16,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(common, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def make_kohya_folder(root: Path, groups: dict[str, int], resolution: int = 16, captions: bool = True) -> Path:
    """kohya's layout: root/N_name/ holds `count` images each (groups: {"10_sks circle": count});
    with captions=False the images carry no .txt and take the folder's text as caption."""
    for name, count in groups.items():
        sub = root / name
        sub.mkdir(parents=True, exist_ok=True)
        for key, data, cap in shapes_items(count, resolution, seed=len(name)):
            ext = ".jpg" if data[:2] == b"\xff\xd8" else ".png"
            (sub / f"{key}{ext}").write_bytes(data)
            if captions:
                (sub / f"{key}.txt").write_text(cap)
    return root
