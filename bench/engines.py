"""The engines on one GPU: Colossal-AI's plugins, our fsdp and DeepSpeed against the diffusers-default
loop, and each engine's loss against our single-process path. `bench/engines_gpu.sh` runs the set.

    python bench/engines.py speed --engine diffusers-default                 # plain process
    torchrun --nproc_per_node 1 bench/engines.py speed --engine gemini-cuda  # the engines
    torchrun --nproc_per_node 1 bench/engines.py loss-match --engine llz-2 gemini-cuda --steps 50
    python bench/engines.py kernels            # build Colossal-AI's HybridAdam kernels, timed
    python bench/engines.py fixture --out DIR  # a random-weight sd15 diffusers folder (no download)
    python bench/engines.py check-run RUN_DIR --steps 30 --resumed-from 20
    python bench/engines_summary.py results.jsonl --steps-file steps.jsonl     # the Markdown table
    python bench/engines.py speed --engine torch-ddp --preset tiny --batches 2 4   # CPU smoke run

One engine per process (a crashed or refused engine costs only its own line). The model is the
preset's UNet with random weights, the inputs synthetic latents and text context (no VAE, text
encoder or data); the step is the trainer's (backend, optimizer, objective, clipping), as in
`colodiffusion bench`. Each result is one JSON line on stdout and, at once, in `--out`.
Memory is torch.cuda.max_memory_allocated over the timed steps (the CPU: the process's max RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from colodiffusion.bench import (  # noqa: E402
    LOSS_MATCH_RTOL,
    baseline_step,
    device_name,
    free,
    make_unet,
    run_losses,
    synthetic_batch,
    time_step,
    work_of,
)
from colodiffusion.config import Config, ConfigError, load_config  # noqa: E402
from colodiffusion.models.presets import get_preset  # noqa: E402

COLOSSALAI = ["parallel.strategy=colossalai"]
ENGINES: dict[str, list[str]] = {
    # name: config overrides (on top of --precision and the preset); diffusers-default is gpu_anchor.py's
    # loop, doing the engines' work (engine_config: clipping, no EMA)
    "diffusers-default": [],
    "single": ["parallel.strategy=single"],
    "gemini-cuda": COLOSSALAI + ["parallel.colossalai.plugin=gemini", "parallel.colossalai.placement_policy=cuda"],
    "gemini-cpu": COLOSSALAI + ["parallel.colossalai.plugin=gemini", "parallel.colossalai.placement_policy=cpu"],
    "gemini-auto": COLOSSALAI + ["parallel.colossalai.plugin=gemini", "parallel.colossalai.placement_policy=auto"],
    "gemini-cpu-ckpt": COLOSSALAI + ["parallel.colossalai.plugin=gemini", "parallel.colossalai.placement_policy=cpu",
                                     "perf.activation_checkpointing=full"],
    "llz-1": COLOSSALAI + ["parallel.colossalai.plugin=low_level_zero", "parallel.zero=1"],
    "llz-2": COLOSSALAI + ["parallel.colossalai.plugin=low_level_zero", "parallel.zero=2"],
    "llz-2-offload": COLOSSALAI + ["parallel.colossalai.plugin=low_level_zero", "parallel.zero=2",
                                   "parallel.offload=cpu"],
    "torch-ddp": COLOSSALAI + ["parallel.colossalai.plugin=torch_ddp"],
    "fsdp": ["parallel.strategy=fsdp", "parallel.zero=3"],
    "ds-zero2-offload": ["parallel.strategy=deepspeed", "parallel.zero=2", "parallel.offload=cpu"],
    "ds-zero3-offload": ["parallel.strategy=deepspeed", "parallel.zero=3", "parallel.offload=cpu",
                         "parallel.deepspeed.offload_params=true"],
}


def engine_config(engine: str, preset: str, precision: str, batch: int, extra: list[str]) -> Config:
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine '{engine}'; known: {', '.join(ENGINES)}.")
    # train.batch_size only sizes DeepSpeed's JSON; the steps feed each measured batch themselves. No EMA
    # anywhere: Gemini's chunks cannot keep one, so no engine (nor the baseline) does that work.
    return load_config(None, [f"model.preset={preset}", f"precision={precision}", f"train.batch_size={batch}",
                              "train.warmup_steps=0", "train.ema.enabled=false", *ENGINES[engine], *extra])


class Engine:
    """The trainer's step on one backend: built once, then stepped at any batch size."""

    def __init__(self, cfg: Config, seed: int = 0):
        from colodiffusion.diffusion import alphas_cumprod, build_noise_scheduler, build_objective
        from colodiffusion.parallel import build_backend
        from colodiffusion.train.optim import build_optimizer
        from colodiffusion.train.perf import apply_perf

        self.cfg, self.seed = cfg, seed
        self.preset = get_preset(cfg.model.preset)
        self.backend = build_backend(cfg)
        device = self.device = self.backend.device
        unet = apply_perf(make_unet(self.preset, device, seed), cfg.perf, cfg.precision, device)
        self.model, self.opt = self.backend.prepare(
            unet, lambda params, **kw: build_optimizer(params, cfg, device, **kw))
        prediction_type = cfg.model.prediction_type or self.preset.prediction_type
        acp = alphas_cumprod(build_noise_scheduler(cfg.diffusion, prediction_type)).to(device)
        self.objective = build_objective(cfg.diffusion, acp, prediction_type)

    def step_fn(self, batch: int, resolution: Optional[int]) -> Callable[[], torch.Tensor]:
        b, model, cfg = self.backend, self.model, self.cfg
        x0, context = synthetic_batch(self.preset, batch, resolution, self.device, self.seed)
        if cfg.perf.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        noise_gen = torch.Generator(self.device).manual_seed(self.seed + 1)

        def step():
            with b.autocast():
                loss = self.objective.loss(lambda x_t, t, c: model(x_t, t, c).sample, x0, context, noise_gen)
            b.backward(loss)
            b.step(model, self.opt, cfg.train.grad_clip)
            return loss.detach()

        return step

    def close(self) -> None:
        self.backend.shutdown()


def error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def is_main() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


class Emitter:
    def __init__(self, out: Optional[str], common: dict):
        self.out, self.common = out, common

    def __call__(self, record: dict) -> None:
        if not is_main():
            return
        line = json.dumps({**record, **self.common})
        print(line, flush=True)
        if self.out:
            with open(self.out, "a") as f:  # one short line per append: readable even if we die next
                f.write(line + "\n")


# -- modes ----------------------------------------------------------------------------------------
def cmd_speed(args, emit: Emitter) -> int:
    """img/s and peak memory of one engine at each batch size (smallest first)."""
    ok = True
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        cfg = engine_config(args.engine, args.preset, args.precision, max(args.batches), args.overrides)
        work = work_of(cfg)  # what the step does besides forward/backward/AdamW: the same for every engine
        if args.engine == "diffusers-default":
            engine, preset = None, get_preset(args.preset)
        else:
            engine = Engine(cfg)
            device, preset = engine.device, engine.preset
    except Exception as exc:  # a refused or failing engine: one line per batch, then the next engine
        for batch in args.batches:
            emit({"event": "speed", "engine": args.engine, "batch": batch, "error": error_line(exc)})
        traceback.print_exc()
        return 1
    setup_s = round(time.perf_counter() - t0, 2)
    for batch in args.batches:
        step = None
        try:
            step = (baseline_step(preset, batch, args.resolution, device, work) if engine is None
                    else engine.step_fn(batch, args.resolution))
            timing = time_step(step, device, args.warmup, args.steps)
            emit({"event": "speed", "engine": args.engine, "batch": batch,
                  "img_per_s": round(batch / timing["step_s"], 2), **timing, "step_s": round(timing["step_s"], 5),
                  "setup_s": setup_s, "work": work})
        except Exception as exc:  # e.g. out of memory at the largest batch: the smaller ones still count
            ok = False
            emit({"event": "speed", "engine": args.engine, "batch": batch, "error": error_line(exc)})
            traceback.print_exc()
        del step
        free(device)
    if engine is not None:
        engine.close()
    return 0 if ok else 1


def cmd_loss_match(args, emit: Emitter) -> int:
    """N steps of each engine against the single-process path (run once, last): same weights, batch,
    noise and timesteps; bounds of `colodiffusion bench --loss-match`."""
    batch, ok, losses = args.batch, True, {}
    for name in args.engine + ["single"]:
        try:
            eng = Engine(engine_config(name, args.preset, args.precision, batch, args.overrides))
            losses[name] = run_losses(eng.step_fn(batch, args.resolution), args.steps)
            device = eng.device
            del eng  # free this engine's model and optimizer before the next one is built
            free(device)
        except Exception as exc:
            ok = False
            emit({"event": "loss_match", "engine": name, "steps": args.steps, "batch": batch, "ok": False,
                  "error": error_line(exc)})
            traceback.print_exc()
    ref = losses.get("single")
    for name in args.engine:
        if name not in losses or ref is None:
            continue
        got = losses[name]
        rel = (got - ref).abs() / ref.abs().clamp_min(1e-8)
        match = bool(torch.isfinite(rel).all() and rel.max() <= LOSS_MATCH_RTOL and rel.mean() <= LOSS_MATCH_RTOL / 5)
        ok = ok and match
        emit(
            {
                "event": "loss_match",
                "engine": name,
                "reference": "single",
                "steps": args.steps,
                "batch": batch,
                "max_rel_diff": round(float(rel.max()), 6),
                "mean_rel_diff": round(float(rel.mean()), 6),
                "rtol": LOSS_MATCH_RTOL,
                "ok": match,
                "engine_first_last": [round(float(got[0]), 5), round(float(got[-1]), 5)],
                "reference_first_last": [round(float(ref[0]), 5), round(float(ref[-1]), 5)],
            }
        )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if ok else 1


def cmd_kernels(args, emit: Emitter) -> int:
    """Build (or load from Colossal-AI's cache) the kernels HybridAdam needs; gemini steps with it."""
    record: dict = {"event": "kernels"}
    ok = True
    for name in ("CPUAdamLoader", "FusedOptimizerLoader"):
        t0 = time.perf_counter()
        try:
            from colossalai.kernel import kernel_loader

            getattr(kernel_loader, name)().load()
            record[name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1)}
        except Exception as exc:
            ok = False
            record[name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 1), "error": error_line(exc)}
            traceback.print_exc()
    emit({**record, "ok": ok})
    return 0 if ok else 1


def cmd_fixture(args, emit: Emitter) -> int:
    """A diffusers folder with the preset's architecture and random weights, and a CLIP tokenizer trained
    on the shapes captions: what `model.pretrained` points to, made without a download."""
    from colodiffusion.config import load_config as load
    from colodiffusion.data import build_dataset, caption_corpus
    from colodiffusion.models.presets import build_text_encoder, build_unet, build_vae
    from colodiffusion.models.tokenizer import train_clip_tokenizer

    t0 = time.perf_counter()
    preset = get_preset(args.preset)
    out = Path(args.out)
    cfg = load(None, ["data.num_samples=256"])
    tok = train_clip_tokenizer(caption_corpus(cfg.data, build_dataset(cfg.data, cfg.train.seed)),
                               max_length=preset.text_encoder["max_position_embeddings"])
    tok.save_pretrained(out / "tokenizer")
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = None if preset.needs_pretrained_tokenizer else len(tok)  # tiny: the encoder's vocabulary is the tokenizer's
    builders = (
        ("text_encoder", lambda p: build_text_encoder(p, vocab_size=vocab)),
        ("vae", build_vae),
        ("unet", build_unet),
    )
    for name, build in builders:
        with torch.device(device):
            module = build(preset)
        module.save_pretrained(out / name)
        del module
    emit({"event": "fixture", "preset": args.preset, "path": str(out), "seconds": round(time.perf_counter() - t0, 1)})
    return 0


def cmd_check_run(args, emit: Emitter) -> int:
    """A run folder after the seed's command and its resume: steps logged up to --steps, continuing
    after --resumed-from, finite losses, the last checkpoint and final/ written."""
    run = Path(args.run_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    steps = [r["step"] for r in rows]
    losses = [r.get("loss") for r in rows if r.get("loss") is not None]
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    after = [s for s in steps if s > args.resumed_from]
    # a second run that started over instead of resuming would log its first steps again
    continued = steps == sorted(set(steps)) and bool(after) and f"step_{args.resumed_from:08d}" in ckpts
    ok = bool(steps and steps[-1] == args.steps and continued and all(v == v and abs(v) < 1e30 for v in losses)
              and (run / "final" / "unet").is_dir() and ckpts and ckpts[-1] == f"step_{args.steps:08d}")
    emit(
        {
            "event": "check_run",
            "name": args.name,
            "run_dir": str(run),
            "ok": ok,
            "last_step": steps[-1] if steps else None,
            "logged_steps": len(steps),
            "checkpoints": ckpts,
            "loss_first_last": [losses[0], losses[-1]] if losses else None,
        }
    )
    return 0 if ok else 1


# -- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engines", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)

    def common(s, several=False):
        s.add_argument("--engine", required=True, choices=list(ENGINES), nargs="+" if several else None)
        s.add_argument("--preset", default="sd15", help="model preset (tiny for a CPU smoke run)")
        s.add_argument("--resolution", type=int, help="pixels (default: the preset's; latents are 1/8)")
        s.add_argument("--precision", default="bf16", help="bf16 (default; what the baseline's autocast uses), fp16, "
                                                           "fp32")
        s.add_argument("--out", help="append the JSON lines to this file")
        s.add_argument("overrides", nargs="*", help="more config key=value overrides")

    s = sub.add_parser("speed", help="img/s and peak memory of one engine")
    common(s)
    s.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    s.add_argument("--warmup", type=int, default=1, help="untimed steps per batch (plus one that counts host syncs)")
    s.add_argument("--steps", type=int, default=3, help="timed steps per batch")
    s = sub.add_parser("loss-match", help="engines' losses against the single-process path")
    common(s, several=True)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--batch", type=int, default=8)
    s = sub.add_parser("kernels", help="build Colossal-AI's HybridAdam kernels (timed)")
    s.add_argument("--out")
    s = sub.add_parser("fixture", help="random-weight diffusers folder of a preset (model.pretrained for the seed "
                                       "command)")
    s.add_argument("--out", required=True)
    s.add_argument("--preset", default="sd15")
    s.add_argument("--results", help="append the JSON line to this file")
    s = sub.add_parser("check-run", help="check a run folder after training and resume")
    s.add_argument("run_dir")
    s.add_argument("--steps", type=int, required=True, help="the last step the run must reach")
    s.add_argument("--resumed-from", type=int, default=0, help="the step the second run resumed at")
    s.add_argument("--name", default="run")
    s.add_argument("--out")
    s = sub.add_parser("check-args", help="parse each line of FILE as an engines.py command line (engines_gpu.sh "
                                          "--dry-run)")
    s.add_argument("file")
    return p


def cmd_check_args(args, emit: Emitter) -> int:
    import shlex

    lines = [line for line in Path(args.file).read_text().splitlines() if line.strip()]
    for line in lines:
        argv = shlex.split(line)
        try:
            parsed = build_parser().parse_args(argv)
        except SystemExit:
            print(f"error: bad engines.py command line: {line}", file=sys.stderr)
            return 2
        if parsed.mode == "check-args":
            return 2
    print(f"{len(lines)} engines.py command lines parse")
    return 0


MODES = {"speed": cmd_speed, "loss-match": cmd_loss_match, "kernels": cmd_kernels, "fixture": cmd_fixture,
         "check-run": cmd_check_run, "check-args": cmd_check_args}


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batches", "steps", "warmup", "batch"):
        value = getattr(args, name, None)
        if value is not None and min(value if isinstance(value, list) else [value]) < 1:
            print(f"error: --{name} must be whole numbers >= 1.", file=sys.stderr)
            return 2
    common = {}
    if args.mode in ("speed", "loss-match"):
        common = {"precision": args.precision, "preset": args.preset, "device": device_name(
            torch.device("cuda" if torch.cuda.is_available() else "cpu")), "torch": torch.__version__}
        if os.environ.get(
            "STEP_BESIDE"
        ):  # bench/steps.sh: a background job (the kernel build) ran when this step began
            common["note"] = f"{os.environ['STEP_BESIDE']} running in the background when this step started"
    out = args.results if args.mode == "fixture" else getattr(args, "out", None)
    try:
        return MODES[args.mode](args, Emitter(out, common))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
