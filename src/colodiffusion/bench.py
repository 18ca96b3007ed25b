"""`colodiffusion bench`: time the UNet training step on synthetic latents and text embeddings.

Random weights and inputs (throughput does not depend on trained values; no tokenizer or VAE). The
*fast* path IS the trainer's step: `train.loop.build_state` (backend, `build_optimizer`, the
numerical guard, LR schedule, EMA, data loader) over an in-memory latent dataset shaped like a
latent cache, and `train.loop.Trainer.train_step` for each step (caption dropout, posterior sample,
objective, backward, guard, clip, step, EMA), after `apply_perf` on the preset's UNet (checkpointing and
compile come with the backend's `prepare`, as in the trainer). `--baseline`
also runs, in the same process, the plain diffusers-style loop of `shared/reference/gpu_anchor.py`
("diffusers-default": fp32 weights, bf16 autocast, foreach AdamW, SDPA) doing the same work as the
fast path (gradient clipping and EMA as `train.grad_clip` / `train.ema.enabled` say; `work` in the
JSON), and prints the ratio, so a speed claim never depends on the machine's mood. Each result is
one JSON line on stdout (and in `--out`).

Timing: warm-up steps first (compilation happens there and is reported as first_step_s, with the
compile cache's state: cold or warm), then CUDA events around the timed steps on a GPU, perf_counter
on the CPU. Memory: peak torch.cuda.max_memory_allocated over the timed steps, and over warm-up plus
timed steps (peak statistics are reset before each measured path; the FLOP count runs on the meta
device, so it allocates nothing); on the CPU the process's max RSS (memory_kind says which).
`state_gib` adds up, by arithmetic, the bytes the step keeps between steps on the device
(weights, gradients, optimizer, EMA).
"""

from __future__ import annotations

import copy
import json
import resource
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from colodiffusion.bench_args import build_parser, checked_config
from colodiffusion.config import Config, ConfigError
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


def context_shape(preset: Preset) -> tuple[int, int]:
    return preset.text_encoder["max_position_embeddings"], preset.unet["cross_attention_dim"]


def synthetic_batch(preset: Preset, batch: int, resolution: Optional[int], device: torch.device, seed: int = 0):
    """Latents (B, C, H, W) and text context (B, L, D), as a latent cache would hand them over."""
    g = torch.Generator(device).manual_seed(seed)
    c, side = latent_shape(preset, resolution)
    x0 = torch.randn(batch, c, side, side, generator=g, device=device)
    context = torch.randn(batch, *context_shape(preset), generator=g, device=device)
    return x0, context


class SyntheticLatents(torch.utils.data.Dataset):
    """`n` random samples in the latent cache's format (data/latents.py: fp16 posterior mean and
    logvar, fp16 context, a caption), held in memory: the trainer's loader reads it as a cache."""

    name = "latents"

    def __init__(self, preset: Preset, n: int, resolution: Optional[int], seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        c, side = latent_shape(preset, resolution)
        self.mean = torch.randn(n, c, side, side, generator=g).half()
        self.logvar = (torch.randn(n, c, side, side, generator=g) - 6).half()
        self.context = torch.randn(n, *context_shape(preset), generator=g).half()
        self.empty_context = torch.randn(*context_shape(preset), generator=g).half()

    def __len__(self) -> int:
        return self.mean.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"latent_mean": self.mean[i], "latent_logvar": self.logvar[i], "context": self.context[i],
                "caption": "a red circle"}

    def batch_extras(self) -> dict[str, torch.Tensor]:
        return {"empty_context": self.empty_context}


def make_unet(preset: Preset, device: torch.device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds instead of a minute for sd15 on CPU
        return build_unet(preset)


class _AttentionAsOnGPU(TorchFunctionMode):
    """SDPA as the memory-efficient kernel's op, whose FLOP formula (FlopCounterMode) counts what a GPU
    kernel does, backward recomputation of the scores included; on the meta device SDPA would otherwise
    decompose into plain matmuls (one fewer in backward)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention and not (kwargs or {}).get("attn_mask") and len(args) == 3:
            q, k, v = args
            return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[0]
        return func(*args, **(kwargs or {}))


def count_train_flops(preset: Preset, resolution: Optional[int]) -> float:
    """FLOPs of one image's forward + backward, counted as the anchor does (its batch of 2, GPU attention
    kernels), on the meta device: no memory, no arithmetic (sd15: 2.4698e12, the anchor's figure)."""
    meta = torch.device("meta")
    unet = make_unet(preset, meta)
    c, side = latent_shape(preset, resolution)
    x0 = torch.empty(2, c, side, side, device=meta)
    context = torch.empty(2, *context_shape(preset), device=meta)
    t = torch.tensor([10, 500], device=meta)
    with FlopCounterMode(display=False) as counter, _AttentionAsOnGPU():
        out = unet(x0, t, context).sample
        F.mse_loss(out.float(), x0).backward()
    return counter.get_total_flops() / 2


# -- the two steps ------------------------------------------------------------------------------
def work_of(cfg: Config) -> dict:
    """What both loops do besides forward/backward/AdamW, so the ratio compares like with like."""
    return {"grad_clip": cfg.train.grad_clip, "ema": cfg.train.ema.enabled}


def baseline_step(preset: Preset, batch: int, resolution: Optional[int], device: torch.device,
                  work: Optional[dict] = None, keep: Optional[dict] = None) -> StepFn:
    """gpu_anchor.py's "diffusers-default": fp32 weights, bf16 autocast, foreach AdamW, SDPA; plus the
    trainer's gradient clipping and fp32 EMA when `work` asks for them (the anchor had neither)."""
    work = work or {"grad_clip": 0.0, "ema": False}
    unet = make_unet(preset, device)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    ema = [p.detach().clone() for p in params] if work["ema"] else None
    c, side = latent_shape(preset, resolution)
    seq, dim = context_shape(preset)
    if keep is not None:
        keep.update(model=unet, optimizer=opt, ema=ema)

    def step():
        lat = torch.randn(batch, c, side, side, device=device)
        emb = torch.randn(batch, seq, dim, device=device)
        tt = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(lat)
        with torch.autocast(device.type, torch.bfloat16):
            pred = unet(lat + noise, tt, emb).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        if work["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, work["grad_clip"], foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            torch._foreach_lerp_(ema, params, 1e-3)
        return loss.detach()

    return step


def bench_config(cfg: Config, batch: int, steps: int) -> Config:
    """The trainer config the bench runs: one rank, no accumulation, `batch` images per step."""
    cfg = copy.deepcopy(cfg)
    cfg.train.batch_size, cfg.train.grad_accum = batch, 1
    cfg.train.max_steps = max(cfg.train.max_steps, steps)  # the LR schedule must not end inside the bench
    return cfg


def trainer_step(cfg: Config, batch: int, resolution: Optional[int], device: torch.device, seed: int = 0,
                 steps: int = 16, keep: Optional[dict] = None) -> StepFn:
    """The trainer's own step (train.loop.Trainer.train_step) over a synthetic latent cache of `steps` batches
    (one epoch covers the run: no loader restart while timing)."""
    from colodiffusion.diffusion import alphas_cumprod, build_noise_scheduler, build_objective
    from colodiffusion.parallel import Backend
    from colodiffusion.train import loop
    from colodiffusion.train.perf import apply_perf

    preset = get_preset(cfg.model.preset)
    cfg = bench_config(cfg, batch, steps)
    cfg.train.seed = seed
    backend = Backend(cfg)
    backend.device = device
    unet = apply_perf(make_unet(preset, device, seed), cfg.perf, cfg.precision, device)
    comps = SimpleNamespace(unet=unet, text_encoder=None, scaling_factor=0.18215)
    state = loop.build_state(cfg, backend, comps, SyntheticLatents(preset, batch * steps, resolution, seed))
    prediction_type = cfg.model.prediction_type or preset.prediction_type
    schedule = build_noise_scheduler(cfg.diffusion, prediction_type)
    objective = build_objective(cfg.diffusion, alphas_cumprod(schedule), prediction_type)
    state.model.train()
    if keep is not None:
        keep.update(model=state.model, optimizer=state.optimizer, ema=state.ema.shadow if state.ema else None,
                    state=state)

    trainer = loop.Trainer(cfg, backend, comps, state, Path(cfg.run.dir), objective)

    def step():
        loss, _ = trainer.train_step()
        return loss

    return step


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: Optional[list],
                device: torch.device) -> dict:
    """Bytes kept between steps, by arithmetic over the live tensors: weights, one gradient per
    trainable weight (in its dtype), the optimizer's tensors and the EMA; `on_device` sums those on
    `device` (offloaded masters, states and EMA live on the CPU)."""
    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts if t.device.type == device.type)

    params = [p for p in model.parameters() if p.requires_grad]
    if hasattr(optimizer, "held_bytes"):
        held = optimizer.held_bytes()
        opt = sum(v for k, v in held.items() if k != "device") if held["device"].split(":")[0] == device.type else 0
    else:
        opt = nbytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    out = {"weights": nbytes(model.parameters()), "grads": nbytes(params), "optimizer": opt,
           "ema": nbytes(ema or [])}
    out["on_device"] = sum(out.values())
    return out


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


def now() -> float:
    """The host clock of CPU timings and first_step_s (a function, so tests can drive it)."""
    return time.perf_counter()


def time_step(step: StepFn, device: torch.device, warmup: int, steps: int) -> dict:
    if device.type == "cuda":  # this path's own peak: nothing measured before it counts
        torch.cuda.reset_peak_memory_stats(device)
    t0 = now()
    step()
    synchronize(device)
    first = now() - t0
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
        extra["peak_memory_incl_warmup_gib"] = max(
            extra["peak_memory_incl_warmup_gib"], round(torch.cuda.max_memory_allocated(device) / 2**30, 3))
        memory, kind = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    else:
        t0 = now()
        for _ in range(steps):
            step()
        seconds = now() - t0
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


def state_gib(keep: dict, device: torch.device) -> dict:
    b = state_bytes(keep["model"], keep["optimizer"], keep["ema"], device)
    return {k: round(v / 2**30, 3) for k, v in b.items()}


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compile_cache_state(cfg: Config) -> Optional[dict]:
    """The compile cache folder and whether it held anything before this process compiled (cold/warm)."""
    if cfg.perf.compile == "none":
        return None
    from colodiffusion.parallel.parallelize import compile_cache_dir

    folder = compile_cache_dir(cfg.perf.compile_cache)
    if folder is None:
        return {"dir": None, "state": "torch default folder"}
    warm = folder.is_dir() and any(f.is_file() for f in folder.rglob("*"))
    return {"dir": str(folder), "state": "warm" if warm else "cold"}


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


def run_losses(step: StepFn, steps: int, timing: Optional[dict] = None,
               device: Optional[torch.device] = None) -> torch.Tensor:
    """`steps` losses, as device tensors (one host sync at the end); `timing`, if given, gets the first
    step's seconds (its compile included) as first_step_s."""
    t0 = now()
    losses = [step()]
    if timing is not None:
        if device is not None:
            synchronize(device)
        timing["first_step_s"] = round(now() - t0, 2)
    losses += [step() for _ in range(steps - 1)]
    return torch.stack(losses).float().cpu()


def loss_match(cfg: Config, steps: int, batch: int, resolution: Optional[int], device: torch.device) -> dict:
    """The fast path's losses against the eager fp32-master path's; the fast path's first step, timed
    with the compile cache's state, is the warm-compile figure when a run before this one filled the cache."""
    cache = compile_cache_state(cfg)  # read before this process compiles anything
    timing: dict = {}
    fast = run_losses(trainer_step(cfg, batch, resolution, device, steps=steps), steps, timing, device)
    torch._dynamo.reset()  # compiled code keeps the fast path's model alive: free it before the reference
    free(device)
    ref = run_losses(trainer_step(reference_config(cfg), batch, resolution, device, steps=steps), steps)
    free(device)
    rel = (fast - ref).abs() / ref.abs().clamp_min(1e-8)
    ok = bool(rel.max() <= LOSS_MATCH_RTOL and rel.mean() <= LOSS_MATCH_RTOL / 5)
    return {"event": "loss_match", "steps": steps, "batch": batch, "max_rel_diff": round(float(rel.max()), 5),
            "mean_rel_diff": round(float(rel.mean()), 5), "rtol": LOSS_MATCH_RTOL, "ok": ok,
            "fast_first_last": [round(float(fast[0]), 5), round(float(fast[-1]), 5)],
            "reference_first_last": [round(float(ref[0]), 5), round(float(ref[-1]), 5)],
            "first_step_s": timing["first_step_s"], "compile_cache": cache}


def describe(cfg: Config, resolution: Optional[int], device: torch.device) -> dict:
    import dataclasses

    preset = get_preset(cfg.model.preset)
    return {"preset": cfg.model.preset, "resolution": resolution or preset.resolution,
            "precision": cfg.precision, "work": work_of(cfg), "optimizer_lr": cfg.train.lr,
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
    flops = count_train_flops(preset, res)
    peak = peak_tflops(device, args.peak_tflops)
    cache = compile_cache_state(cfg)  # read before this process compiles anything
    steps_run = args.warmup + args.steps + 1
    if args.memory:
        for batch in (1, 8):
            keep: dict = {}
            r = measure("memory", trainer_step(cfg, batch, res, device, steps=steps_run, keep=keep), batch, device,
                        args.warmup, args.steps, flops, peak)
            emit({**r, "state_gib": state_gib(keep, device), "work": work_of(cfg), "config": config})
            del keep
            free(device)
        return 0
    base = None
    if args.baseline:
        keep = {}
        base = measure("diffusers-default", baseline_step(preset, args.batch, res, device, work_of(cfg), keep=keep),
                       args.batch, device, args.warmup, args.steps, flops, peak)
        base.update(state_gib=state_gib(keep, device), work=work_of(cfg))
        emit(base)
        del keep
        free(device)
    keep = {}
    fast = measure("colodiffusion", trainer_step(cfg, args.batch, res, device, steps=steps_run, keep=keep),
                   args.batch, device, args.warmup, args.steps, flops, peak)
    emit({**fast, "state_gib": state_gib(keep, device), "work": work_of(cfg), "compile_cache": cache,
          "config": config})
    if base is not None:
        emit({"event": "ratio", "batch": args.batch, "work": work_of(cfg), "fast_img_per_s": fast["img_per_s"],
              "baseline_img_per_s": base["img_per_s"], "ratio": round(fast["img_per_s"] / base["img_per_s"], 3),
              "fast_peak_gib": fast["peak_memory_gib"], "baseline_peak_gib": base["peak_memory_gib"]})
    return 0


def main_args(args) -> int:
    return run_bench(checked_config(args), args)


def run_bench(cfg, args) -> int:
    """Run the benchmark of `checked_config(args)`, one JSON line per result."""
    def emit(record: dict) -> None:
        line = json.dumps({"tag": args.tag, **record} if args.tag else record)
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
