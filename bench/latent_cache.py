"""Write a synthetic latent cache (random posterior moments and text contexts, the real file format)
with freshly initialised frozen components, so `colodiffusion train` can run a preset from
`data.source=latents` where no pretrained weights or images exist (the GPU check's trainer step).

    PYTHONPATH=src python bench/latent_cache.py --preset sd15 --out /tmp/sd15_cache --samples 2048

Throughput does not depend on the values; the files are exactly what `colodiffusion cache` writes
(shards, markers, manifest, empty_context, components/), so the trainer reads them through its own
loader. sd15: ~183 KB per sample.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from colodiffusion import bench  # noqa: E402
from colodiffusion.config import load_config  # noqa: E402
from colodiffusion.data.cache import _save_components, _write_manifest, write_shard  # noqa: E402
from colodiffusion.data.shapes import caption_corpus  # noqa: E402
from colodiffusion.models.presets import build_text_encoder, build_vae  # noqa: E402
from colodiffusion.models.tokenizer import train_clip_tokenizer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd15")
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--shard-size", type=int, default=512)
    args = p.parse_args()
    preset = bench.get_preset(args.preset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = caption_corpus()
    seq, dim = bench.context_shape(preset)
    tokenizer = train_clip_tokenizer(corpus, max_length=seq)
    torch.manual_seed(0)
    comps = SimpleNamespace(tokenizer=tokenizer, text_encoder=build_text_encoder(preset, vocab_size=len(tokenizer)),
                            vae=build_vae(preset))
    _save_components(comps, out / "components")
    g = torch.Generator().manual_seed(0)
    save_file({"context": torch.randn(seq, dim, generator=g).half()}, str(out / "empty_context.safetensors"))
    c, side = bench.latent_shape(preset, None)
    shards = (args.samples + args.shard_size - 1) // args.shard_size
    for k in range(shards):
        n = min(args.shard_size, args.samples - k * args.shard_size)
        captions = [corpus[(k * args.shard_size + i) % len(corpus)] for i in range(n)]
        tensors = {"mean": torch.randn(n, c, side, side, generator=g).half(),
                   "logvar": (torch.randn(n, c, side, side, generator=g) - 6).half(),
                   "context": torch.randn(n, seq, dim, generator=g).half()}
        keys = [str(k * args.shard_size + i) for i in range(n)]
        write_shard(out, k, {"tensors": tensors, "count": n,
                             "metadata": {"captions": json.dumps(captions), "keys": json.dumps(keys)}})
    cfg = load_config(None, [f"model.preset={args.preset}", f"data.resolution={preset.resolution}"])
    _write_manifest(cfg, comps, out, shards, args.samples)
    print(json.dumps({"event": "latent_cache", "preset": args.preset, "out": str(out), "samples": args.samples}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
