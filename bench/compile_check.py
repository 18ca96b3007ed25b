"""Graph breaks and recompiles of the compiled training step (one JSON line per configuration).

Runs the bench's fast step (= the trainer's `train_step`, compile=full) for a few steps and reads
dynamo's counters: a graph break splits the UNet into several graphs (Python between them, lost
fusion), a recompile after the first step means the step does not hold one graph per shape. Then
`torch._dynamo.explain` on the UNet's forward lists any break with its reason.

    PYTHONPATH=src python bench/compile_check.py                       # tiny on the CPU, aot_eager
    PYTHONPATH=src python bench/compile_check.py --backend inductor    # with code generation (slow on CPU)
    PYTHONPATH=src python bench/compile_check.py --preset sd15 --batch 8 --backend inductor   # on a GPU

Each `--variant` adds overrides to the fast levers; the default set covers the per-head-dim SDPA
kernel choice (an `sdpa_kernel` context inside the compiled graph) and activation checkpointing.
Exit code 1 if any configuration breaks or recompiles.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from colodiffusion import bench  # noqa: E402
from colodiffusion.config import load_config  # noqa: E402
import colodiffusion.parallel.parallelize as parallelize_module  # noqa: E402

VARIANTS = {
    "fast": [],
    "sdpa_by_head_dim": ["perf.sdpa_by_head_dim='8:math,16:math,40:flash,80:flash,160:flash'"],
    "checkpointing": ["perf.activation_checkpointing=attention"],
}


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def check(name: str, overrides: list[str], args) -> dict:
    torch._dynamo.reset()
    counters.clear()
    cfg = load_config(None, ["precision=bf16", f"model.preset={args.preset}", *bench.FAST,
                             "perf.compile_cache=off", *overrides])
    device = torch.device(args.device)
    keep: dict = {}
    step = bench.trainer_step(cfg, args.batch, None, device, steps=args.steps + 1, keep=keep)
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    after_first = graphs()
    for _ in range(args.steps - 1):
        step()
    breaks, after_all = dict(counters["graph_break"]), graphs()
    unet = keep["model"]
    x0, context = bench.synthetic_batch(bench.get_preset(args.preset), args.batch, None, device)
    if cfg.perf.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    t = torch.zeros(args.batch, dtype=torch.long, device=device)
    with torch.autocast(device.type, torch.bfloat16):
        explained = torch._dynamo.explain(unet.forward)(x0, t, context)  # the plain forward, not the compiled call
    return {"event": "compile_check", "variant": name, "overrides": overrides, "preset": args.preset,
            "batch": args.batch, "backend": args.backend, "steps": args.steps,
            "graphs_after_first_step": after_first, "graphs_after_all_steps": after_all,
            "recompiles": after_all - after_first, "graph_breaks_in_steps": sum(breaks.values()),
            "break_reasons_in_steps": list(breaks)[:5], "explain_graphs": explained.graph_count,
            "explain_breaks": explained.graph_break_count,
            "explain_reasons": [str(r.reason)[:200] for r in explained.break_reasons][:5],
            "first_step_s": round(first, 1), "torch": torch.__version__, "device": bench.device_name(device)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="aot_eager", help="aot_eager (trace + autograd, no codegen) or inductor")
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="default: all")
    p.add_argument("--out", help="also append the JSON lines here")
    args = p.parse_args()
    # compile=full through the trainer's own parallelize (in backend.prepare), with the chosen dynamo backend
    parallelize_module.compile_unet = functools.partial(parallelize_module.compile_unet, backend=args.backend)
    ok = True
    for name in args.variant or list(VARIANTS):
        result = check(name, VARIANTS[name], args)
        result["ok"] = (
            result["recompiles"] == 0 and result["graph_breaks_in_steps"] == 0 and result["explain_breaks"] == 0
        )
        ok &= result["ok"]
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
