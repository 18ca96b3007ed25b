"""Time each SDPA kernel on each attention shape of a preset's UNet; print the fastest per head dim.

The shapes come from the UNet itself (hooks on its Attention layers during one forward on the meta
device: no memory), with how often each occurs per step. For every shape and kernel (PyTorch's own
choice `auto`, flash, cudnn, efficient, math) the forward + backward of
`F.scaled_dot_product_attention` in bf16 is timed with CUDA events (median of `--reps` after
warm-up). The last line is the recommendation: per head dim the kernel with the least time summed
over that head dim's shapes and occurrences, as a `perf.sdpa_by_head_dim` value, and the estimated
attention time per step with it and with `auto`.

    python bench/sdpa_shapes.py --preset sd15 --batch 32        # on a GPU (~20 s)
    PYTHONPATH=src python bench/sdpa_shapes.py --preset tiny --batch 2 --device cpu --reps 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402
from torch.nn.attention import sdpa_kernel  # noqa: E402

from colodiffusion import bench  # noqa: E402
from colodiffusion.train.perf import SDPA_BACKENDS  # noqa: E402


def attention_shapes(preset_name: str, resolution) -> Counter:
    """(seq_q, seq_kv, heads, head_dim) -> occurrences in one UNet forward."""
    preset = bench.get_preset(preset_name)
    meta = torch.device("meta")
    unet = bench.make_unet(preset, meta)
    shapes: Counter = Counter()

    def hook(attn, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        seq_kv = ctx.shape[1] if ctx is not None else x.shape[1]
        shapes[(x.shape[1], seq_kv, attn.heads, attn.inner_dim // attn.heads)] += 1

    for m in unet.modules():
        if isinstance(m, Attention):
            m.register_forward_pre_hook(hook, with_kwargs=True)
    c, side = bench.latent_shape(preset, resolution)
    with torch.no_grad():
        unet(torch.empty(1, c, side, side, device=meta), torch.zeros(1, device=meta, dtype=torch.long),
             torch.empty(1, *bench.context_shape(preset), device=meta))
    return shapes


def time_kernel(name: str, shape: tuple, batch: int, device: torch.device, reps: int) -> float | None:
    """Median seconds of one forward + backward, or None if the kernel refuses the shape."""
    seq_q, seq_kv, heads, dim = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(batch, heads, seq_q, dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, heads, seq_kv, dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, heads, seq_kv, dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, heads, seq_q, dim, device=device, dtype=dtype)

    def once():
        if name == "auto":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel([SDPA_BACKENDS[name]]):
                out = F.scaled_dot_product_attention(q, k, v)
        out.backward(grad)

    try:
        for _ in range(2):
            once()
    except RuntimeError:
        return None
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd15")
    p.add_argument("--resolution", type=int)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also append the JSON lines here")
    args = p.parse_args()
    device = torch.device(args.device)

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    kernels = ["auto", *SDPA_BACKENDS]
    per_dim: dict[int, Counter] = {}
    auto_total = 0.0
    for shape, count in sorted(attention_shapes(args.preset, args.resolution).items()):
        times = {k: time_kernel(k, shape, args.batch, device, args.reps) for k in kernels}
        seq_q, seq_kv, heads, dim = shape
        emit(
            {
                "event": "sdpa_shape",
                "seq_q": seq_q,
                "seq_kv": seq_kv,
                "heads": heads,
                "head_dim": dim,
                "per_step": count,
                "batch": args.batch,
                "ms": {k: (round(t * 1e3, 3) if t else None) for k, t in times.items()},
            }
        )
        auto_total += count * (times["auto"] or 0.0)
        totals = per_dim.setdefault(dim, Counter())
        for k, t in times.items():
            totals[k] += count * t if t is not None else float("inf")
    choice = {dim: min((k for k in SDPA_BACKENDS), key=lambda k: totals[k]) for dim, totals in per_dim.items()}
    chosen_total = sum(per_dim[dim][k] for dim, k in choice.items())
    emit(
        {
            "event": "sdpa_recommendation",
            "preset": args.preset,
            "batch": args.batch,
            "device": bench.device_name(device),
            "torch": torch.__version__,
            "sdpa_by_head_dim": ",".join(f"{d}:{k}" for d, k in sorted(choice.items())),
            "attention_ms_per_step_fwd_bwd": {
                "auto": round(auto_total * 1e3, 2),
                "chosen": round(chosen_total * 1e3, 2),
            },
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
