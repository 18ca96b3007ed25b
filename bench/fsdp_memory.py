"""Per-rank parameter + optimizer-state memory: ddp vs fsdp (ZeRO-3), printed as JSON.

    python bench/fsdp_memory.py --nproc 2 --preset tiny          # CPU, gloo: sizes of the local tensors
    python bench/fsdp_memory.py --nproc 8 --preset sd15          # GPUs: also CUDA peak memory per rank

It re-launches itself under torchrun. Each strategy wraps the preset's UNet, takes one optimizer step
on a random batch (so AdamW has its state), then counts the bytes of this rank's *local* parameter
and optimizer tensors (DTensor shards for fsdp). Expect fsdp/ddp ~ 1/N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def measure(strategy: str, preset_name: str, extra: list[str]) -> dict:
    import torch.nn.functional as F

    from colodiffusion.config import load_config
    from colodiffusion.models.presets import build_unet, get_preset
    from colodiffusion.parallel import build_backend
    from colodiffusion.train.optim import build_optimizer

    cfg = load_config(None, [f"parallel.strategy={strategy}", f"model.preset={preset_name}", *extra])
    backend = build_backend(cfg)
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    model, opt = backend.prepare(build_unet(preset), lambda p: build_optimizer(p, cfg, backend.device))
    u = preset.unet
    x = torch.randn(1, u.get("in_channels", 4), u["sample_size"], u["sample_size"], device=backend.device)
    ctx = torch.randn(1, 77, u["cross_attention_dim"], device=backend.device)
    with backend.autocast():
        out = model(x, torch.tensor([500], device=backend.device), ctx).sample
    backend.backward(F.mse_loss(out.float(), x))
    backend.step(model, opt, 1.0)
    params = local_bytes(model.parameters())
    optim = local_bytes(v for state in opt.state.values() for v in state.values())
    row = {"rank": backend.rank, "param_bytes": params, "optimizer_bytes": optim, "total_bytes": params + optim}
    if backend.device.type == "cuda":
        row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    rows = [None] * backend.world_size
    torch.distributed.all_gather_object(rows, row)
    return {"strategy": strategy, "world_size": backend.world_size, "ranks": rows, "_backend": backend}


def worker(args) -> None:
    results = []
    backend = None
    for strategy in ("ddp", "fsdp"):
        r = measure(strategy, args.preset, [f"precision={args.precision}", "parallel.zero=3"])
        backend = r.pop("_backend")
        results.append(r)
    if backend.rank == 0:
        ddp, fsdp = (max(row["total_bytes"] for row in r["ranks"]) for r in results)
        print(json.dumps({"preset": args.preset, "device": str(backend.device.type), "precision": args.precision,
                          "world_size": backend.world_size, "results": results,
                          "max_rank_total_bytes": {"ddp": ddp, "fsdp_zero3": fsdp},
                          "fsdp_over_ddp": round(fsdp / ddp, 4)}))
    backend.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return worker(args)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           __file__, "--preset", args.preset, "--precision", args.precision]
    sys.exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
