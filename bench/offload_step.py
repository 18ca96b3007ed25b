"""Time the offloaded fp32-master optimizer step alone: fused vs foreach CPU AdamW, by chunk size.

bf16 parameters and gradients on the device (or the CPU), fp32 masters and AdamW states on the CPU,
as `perf.optimizer_offload=true` runs them (train/master_weights.py). One JSON line per variant with
the median step time and parameters per second; `--params` sets the model size (sd15: 859.5e6).

    PYTHONPATH=src python bench/offload_step.py --params 20e6          # CPU: the staging path, forced
    python bench/offload_step.py --params 859.5e6                       # on a GPU: real D2H/H2D overlap
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from colodiffusion.train.master_weights import CHUNK_NUMEL, MasterWeightOptimizer  # noqa: E402


def run(numel: int, device: torch.device, fused: bool, chunk: int, steps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    sizes = [numel // 64] * 64  # sd15 has 686 tensors, the largest 14.7M: 64 equal ones are close enough
    params = [torch.nn.Parameter(torch.randn(n, generator=g).to(device, torch.bfloat16)) for n in sizes]
    opt = MasterWeightOptimizer(
        params, lambda m: torch.optim.AdamW(m, lr=1e-4, fused=fused, foreach=None if fused else True),
        master_device="cpu", offload=True, chunk_numel=chunk)
    times = []
    for i in range(steps + 1):
        for p in params:
            p.grad = torch.ones_like(p)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step allocates the AdamW states
            times.append(time.perf_counter() - t0)
        opt.zero_grad()
    step = statistics.median(times)
    return {
        "event": "offload_step",
        "params": numel,
        "device": str(device),
        "inner": "fused" if fused else "foreach",
        "chunk_numel": chunk,
        "chunks": len(opt.chunks),
        "step_s": round(step, 4),
        "params_per_s": float(f"{numel / step:.3g}"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=20e6)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also append the JSON lines here")
    args = p.parse_args()
    for fused, chunk in ((False, CHUNK_NUMEL), (True, CHUNK_NUMEL), (True, CHUNK_NUMEL // 8)):
        line = json.dumps(run(int(args.params), torch.device(args.device), fused, chunk, args.steps))
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
