"""`colodiffusion bench`: time the UNet training step on synthetic latents and text embeddings.

Random weights and inputs (throughput does not depend on trained values; no tokenizer, VAE or
data). The *fast* path is the trainer's own step: preset UNet -> `apply_perf` -> backend ->
`build_optimizer` -> objective loss -> backward -> clip -> step. `--baseline` also runs, in the same
process, the plain diffusers-style loop of `shared/reference/gpu_anchor.py` ("diffusers-default":
fp32 weights, bf16 autocast, foreach AdamW, SDPA) and prints the ratio, so a speed claim never
depends on the machine's mood. Each result is one JSON line on stdout (and in `--out`).

Timing: warm-up steps first (compilation happens there and is reported as first_step_s), then
CUDA events around the timed steps on a GPU, perf_counter on the CPU. Memory: peak
torch.cuda.max_memory_allocated over the timed steps on a GPU; on the CPU the process's max RSS
(memory_kind says which).
"""

from __future__ import annotations

import json
import resource
import time
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from colodiffusion.bench_args import FAST, build_parser
from colodiffusion.config import Config, ConfigError, load_config
from colodiffusion.models.presets import Preset, build_unet, get_preset

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name substring; the longest match wins.
# The reference anchor (shared/reference) divided by 790 for its H200; pass --peak-tflops to match it.
PEAK_BF16_TFLOPS = {
    "H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "H200 NVL": 835.0,
    "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0,
}
StepFn = Callable[[], Optional[torch.Tensor]]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_tflops(device: torch.device, given: Optional[float]) -> tuple[Optional[float], str]:
    if given is not None:
        return given, "given"
    name = device_name(device)
    hits = [k for k in PEAK_BF16_TFLOPS if k in name]
    if not hits:
        return None, "unknown device: pass --peak-tflops"
    key = max(hits, key=len)
    return PEAK_BF16_TFLOPS[key], f"table ({key} dense bf16)"


def latent_shape(preset: Preset, resolution: Optional[int]) -> tuple[int, int]:
    """(channels, side) of the latents; side = resolution / the VAE's downsampling factor."""
    factor = 2 ** (len(preset.vae["block_out_channels"]) - 1)
    side = (resolution or preset.resolution) // factor
    return preset.unet.get("in_channels", 4), side


def synthetic_batch(preset: Preset, batch: int, resolution: Optional[int], device: torch.device, seed: int = 0):
    """Latents (B, C, H, W) and text context (B, L, D), as a latent cache would hand them over."""
    g = torch.Generator(device).manual_seed(seed)
    c, side = latent_shape(preset, resolution)
    seq, dim = preset.text_encoder["max_position_embeddings"], preset.unet["cross_attention_dim"]
    x0 = torch.randn(batch, c, side, side, generator=g, device=device)
    context = torch.randn(batch, seq, dim, generator=g, device=device)
    return x0, context


def make_unet(preset: Preset, device: torch.device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds instead of a minute for sd15 on CPU
        return build_unet(preset)


def count_train_flops(preset: Preset, resolution: Optional[int], device: torch.device) -> float:
    """FLOPs of one image's forward + backward, counted as the anchor does (eager, autocast bf16, batch 2)."""
    unet = make_unet(preset, device)
    x0, context = synthetic_batch(preset, 2, resolution, device)
    t = torch.tensor([10, 500], device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, torch.bfloat16):
            out = unet(x0, t, context).sample
        F.mse_loss(out.float(), x0).backward()
    del unet, out
    return counter.get_total_flops() / 2


# -- the two steps ------------------------------------------------------------------------------
def baseline_step(preset: Preset, batch: int, resolution: Optional[int], device: torch.device) -> StepFn:
    """gpu_anchor.py's "diffusers-default": fp32 weights, bf16 autocast, foreach AdamW, SDPA."""
    unet = make_unet(preset, device)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    c, side = latent_shape(preset, resolution)
    seq, dim = preset.text_encoder["max_position_embeddings"], preset.unet["cross_attention_dim"]

    def step():
        lat = torch.randn(batch, c, side, side, device=device)
        emb = torch.randn(batch, seq, dim, device=device)
        tt = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(lat)
        with torch.autocast(device.type, torch.bfloat16):
            pred = unet(lat + noise, tt, emb).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def trainer_step(cfg: Config, batch: int, resolution: Optional[int], device: torch.device, seed: int = 0) -> StepFn:
    """The trainer's step (backend, perf levers, optimizer, objective) on one fixed synthetic batch."""
    from colodiffusion.diffusion import alphas_cumprod, build_noise_scheduler, build_objective
    from colodiffusion.parallel import Backend
    from colodiffusion.train.optim import build_optimizer
    from colodiffusion.train.perf import apply_perf

    preset = get_preset(cfg.model.preset)
    backend = Backend(cfg)
    backend.device = device
    unet = apply_perf(make_unet(preset, device, seed), cfg, device)
    model, opt = backend.prepare(unet, lambda params: build_optimizer(params, cfg, device))
    prediction_type = cfg.model.prediction_type or preset.prediction_type
    acp = alphas_cumprod(build_noise_scheduler(cfg, prediction_type)).to(device)  # on the device: no copy per step
    objective = build_objective(cfg, acp, prediction_type)
    x0, context = synthetic_batch(preset, batch, resolution, device, seed)
    if cfg.perf.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    noise_gen = torch.Generator(device).manual_seed(seed + 1)

    def step():
        with backend.autocast():
            loss = objective.loss(lambda x_t, t, c: model(x_t, t, c).sample, x0, context, noise_gen)
        backend.backward(loss)
        backend.step(model, opt, cfg.train.grad_clip)
        return loss.detach()

    return step


# -- measuring ----------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_host_syncs(step: StepFn, device: torch.device) -> Optional[int]:
    """Synchronizing CUDA calls made by one step (None on the CPU, where there is nothing to wait for)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def time_step(step: StepFn, device: torch.device, warmup: int, steps: int) -> dict:
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    syncs = count_host_syncs(step, device)
    synchronize(device)
    extra = {}
    if device.type == "cuda":
        # the first steps allocate optimizer states and compile: report their peak too
        extra["peak_memory_incl_warmup_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
        memory, kind = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - t0
        memory, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_process_max_rss"
    return {"step_s": seconds / steps, "first_step_s": round(first, 2), "host_syncs_per_step": syncs,
            "peak_memory_gib": round(memory / 2**30, 3), "memory_kind": kind, **extra}


def measure(name: str, step: StepFn, batch: int, device: torch.device, warmup: int, steps: int,
            flops_per_img: float, peak: tuple[Optional[float], str]) -> dict:
    timing = time_step(step, device, warmup, steps)
    ips = batch / timing["step_s"]
    mfu = flops_per_img * ips / (peak[0] * 1e12) if peak[0] else None
    return {"event": "bench", "name": name, "batch": batch, "img_per_s": round(ips, 2),
            **timing, "step_s": round(timing["step_s"], 5), "train_flops_per_img": flops_per_img,
            "mfu": float(f"{mfu:.4g}") if mfu is not None else None, "peak_tflops": peak[0], "peak_source": peak[1]}


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- modes ----------------------------------------------------------------------------------------
LOSS_MATCH_RTOL = 0.05
"""Per-step |fast - reference| / reference loss allowed by `--loss-match` (mean over steps must stay
below a fifth of it): bf16 has 8 mantissa bits (relative rounding ~0.4% per op), and the two paths
round weights and activations differently, so their trajectories drift apart by a few percent."""


def reference_config(cfg: Config) -> Config:
    """The eager fp32-master path: same run, every perf lever off (fp32 weights under the same autocast)."""
    import dataclasses

    from colodiffusion.config import PerfConfig

    return dataclasses.replace(cfg, perf=PerfConfig())


def run_losses(step: StepFn, steps: int) -> torch.Tensor:
    losses = [step() for _ in range(steps)]  # device tensors: one host sync at the end
    return torch.stack(losses).float().cpu()


def loss_match(cfg: Config, steps: int, batch: int, resolution: Optional[int], device: torch.device) -> dict:
    fast = run_losses(trainer_step(cfg, batch, resolution, device), steps)
    free(device)
    ref = run_losses(trainer_step(reference_config(cfg), batch, resolution, device), steps)
    free(device)
    rel = (fast - ref).abs() / ref.abs().clamp_min(1e-8)
    ok = bool(rel.max() <= LOSS_MATCH_RTOL and rel.mean() <= LOSS_MATCH_RTOL / 5)
    return {"event": "loss_match", "steps": steps, "batch": batch, "max_rel_diff": round(float(rel.max()), 5),
            "mean_rel_diff": round(float(rel.mean()), 5), "rtol": LOSS_MATCH_RTOL, "ok": ok,
            "fast_first_last": [round(float(fast[0]), 5), round(float(fast[-1]), 5)],
            "reference_first_last": [round(float(ref[0]), 5), round(float(ref[-1]), 5)]}


def describe(cfg: Config, resolution: Optional[int], device: torch.device) -> dict:
    import dataclasses

    preset = get_preset(cfg.model.preset)
    return {"preset": cfg.model.preset, "resolution": resolution or preset.resolution,
            "precision": cfg.precision, "grad_clip": cfg.train.grad_clip, "optimizer_lr": cfg.train.lr,
            "perf": dataclasses.asdict(cfg.perf), "device": device_name(device), "torch": torch.__version__}


def run(cfg: Config, args, emit: Callable[[dict], None]) -> int:
    device = torch.device(args.device) if args.device else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the anchor: fp32 leftovers use TF32
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    preset, res = get_preset(cfg.model.preset), args.resolution
    config = describe(cfg, res, device)
    emit({"event": "env", **config})
    if args.loss_match:
        result = loss_match(cfg, args.loss_match, args.batch, res, device)
        emit(result)
        return 0 if result["ok"] else 1
    flops = count_train_flops(preset, res, device)
    free(device)
    peak = peak_tflops(device, args.peak_tflops)
    if args.memory:
        for batch in (1, 8):
            emit({**measure("memory", trainer_step(cfg, batch, res, device), batch, device, args.warmup,
                            args.steps, flops, peak), "config": config})
            free(device)
        return 0
    base = None
    if args.baseline:
        base = measure("diffusers-default", baseline_step(preset, args.batch, res, device), args.batch, device,
                       args.warmup, args.steps, flops, peak)
        emit(base)
        free(device)
    fast = measure("colodiffusion", trainer_step(cfg, args.batch, res, device), args.batch, device,
                   args.warmup, args.steps, flops, peak)
    emit({**fast, "config": config})
    if base is not None:
        emit({"event": "ratio", "batch": args.batch, "fast_img_per_s": fast["img_per_s"],
              "baseline_img_per_s": base["img_per_s"], "ratio": round(fast["img_per_s"] / base["img_per_s"], 3)})
    return 0


def main_args(args) -> int:
    for name in ("batch", "steps", "warmup"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be a whole number >= 1, not {getattr(args, name)}.")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise ConfigError(f"--resolution must be a multiple of 8, at least 8, not {args.resolution}.")
    overrides = ["precision=bf16", f"model.preset={args.preset}"] + (FAST if args.fast else []) + args.overrides
    cfg = load_config(args.config, overrides)

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    return run(cfg, args, emit)


def main(argv: Optional[list[str]] = None) -> int:
    import sys

    args = build_parser().parse_args(argv)
    try:
        return main_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
