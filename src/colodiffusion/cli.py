"""`colodiffusion train | sample | export | eval`: thin argument parsing over the modules.

A user mistake (bad config key, missing path) prints one sentence and exits with code 2; no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from colodiffusion import lifeline  # first: it records the launcher's pid before anything slow

# transformers warns at import about optional image processors we never use.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from colodiffusion.config import ConfigError  # noqa: E402


class UsageError(ConfigError):
    """A bad command-line argument (exit code 2)."""


def _threads():
    # Small CPU runs are dominated by thread overhead past the physical cores.
    import torch

    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))


def cmd_train(args) -> int:
    from colodiffusion.config import load_config
    from colodiffusion.train.loop import train

    cfg = load_config(args.config, args.overrides)
    _threads()
    run_dir = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"run folder: {run_dir}")
    return 0


def cmd_cache(args) -> int:
    from colodiffusion.config import load_config
    from colodiffusion.data.cache import build_cache
    from colodiffusion.train.first_stage import frozen_components

    cfg = load_config(args.config, args.overrides)
    if args.shard_size < 1 or args.batch_size < 1:
        raise UsageError("--shard-size and --batch-size must be at least 1.")
    _threads()

    def components(dataset, device, show):  # the run's frozen parts (trained here for a preset without them)
        return frozen_components(cfg, dataset, Path(cfg.run.dir) / "components", device, show)

    out = build_cache(cfg, args.out, components, shard_size=args.shard_size, batch_size=args.batch_size)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"latent cache: {out} (train from it with data.source=latents data.path={out})")
    return 0


def cmd_sample(args) -> int:
    from colodiffusion.generate import generate, make_grid

    _threads()
    pipe = _load(args.model)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    seeds = [args.seed + i for i in range(len(prompts))]
    images = generate(pipe, prompts, seeds, steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                      height=args.height, width=args.width)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        img.save(out / f"{i:05d}.png")
    make_grid(images, cols=args.n).save(out / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out}")
    return 0


def cmd_eval(args) -> int:
    from colodiffusion.evaluate import choose_scorer, evaluate_model, evaluate_own_data

    if args.num_images < 2:
        raise UsageError("--num-images must be at least 2 (FID estimates a covariance).")
    _threads()
    pipe = _load(args.model)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    plan = choose_scorer(args.model, args.data, native)
    print(plan.sentence, file=sys.stderr)
    if plan.scorer == "shapes":
        result = {"scorer": "shapes", **evaluate_model(pipe, per_combo=args.per_combo, steps=args.steps,
                                                       guidance=args.guidance, sampler=args.sampler, out_dir=args.out)}
    else:
        result = evaluate_own_data(pipe, plan.cfg, num_images=args.num_images, steps=args.steps, guidance=args.guidance,
                                   sampler=args.sampler, clip_model=args.clip_model, fid_model=args.fid_model,
                                   out_dir=args.out)
        if "note" in result:
            print(result["note"] + ".", file=sys.stderr)
    if not args.json:
        for k, v in result.items():
            print(f"{k:>16}: {v}")
    print(json.dumps(result))
    return 0


def cmd_export(args) -> int:
    from colodiffusion.export import export

    out = export(args.source, args.format, args.out, ema=args.ema, dtype=args.dtype, merge_lora=args.merge_lora,
                 original_config=args.original_config, tokenizer=args.tokenizer)
    print(f"wrote {args.format} model to {out}")
    return 0
def cmd_bench(args) -> int:
    from colodiffusion.bench import main_args

    _threads()
    return main_args(args)


def _load(model: str):
    from colodiffusion.generate import load_pipeline

    try:
        return load_pipeline(model)
    except FileNotFoundError as exc:
        raise UsageError(f"{exc}.") from None


def build_parser() -> argparse.ArgumentParser:
    from colodiffusion.diffusion.samplers import SAMPLERS

    p = argparse.ArgumentParser(prog="colodiffusion", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a latent diffusion model (default: tiny model on shapes)")
    t.add_argument("-c", "--config", action="append",
                   help="YAML recipe (only the values that differ from the defaults); repeat to merge left to right")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=200")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("cache", help="precompute VAE latents and text embeddings (parallel under torchrun, resumable)")
    c.add_argument("-c", "--config", action="append", help="YAML recipe(s): the data.* and model.* of the training run")
    c.add_argument("--out", required=True, help="cache folder (train with data.source=latents data.path=OUT)")
    c.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    c.add_argument("--batch-size", type=int, default=32, help="images per VAE/text-encoder forward")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.source=webdataset")
    c.set_defaults(func=cmd_cache)

    s = sub.add_parser("sample", help="generate images from a trained model")
    s.add_argument("model", help="diffusers folder, single file, run folder (its final/, else its newest "
                   "checkpoint) or checkpoints/step_N folder of any backend (its EMA when it has one)")
    s.add_argument("--prompt", action="append", required=True, help="text prompt (repeatable)")
    s.add_argument("--n", type=int, default=4, help="images per prompt")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=4.0)
    s.add_argument("--sampler", default="dpm++", choices=sorted(SAMPLERS))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--height", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--out", default="samples")
    s.set_defaults(func=cmd_sample)

    x = sub.add_parser("export", help="write a run, checkpoint or model as diffusers / single-file / LoRA")
    x.add_argument("source", help="run folder, checkpoint folder, diffusers folder or single-file checkpoint")
    x.add_argument("--format", required=True, choices=["diffusers", "single-file", "lora"],
                   help="diffusers folder, one LDM-layout .safetensors/.ckpt file, or the LoRA adapter file")
    x.add_argument("--out", required=True, help="output folder (diffusers, lora) or file (single-file)")
    x.add_argument("--ema", action="store_true", help="write the EMA weights instead of the raw ones")
    x.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    x.add_argument("--merge-lora", action="store_true", help="fold a LoRA run's adapter into the base weights")
    x.add_argument("--original-config", help="original LDM YAML of a single-file source (default: inferred)")
    x.add_argument("--tokenizer", help="CLIP tokenizer folder for a single-file source that carries none")
    x.set_defaults(func=cmd_export)

    e = sub.add_parser("eval", help="score a model: held-out shape prompts (shapes data), or validation loss, "
                                    "CLIP score and FID on its own data")
    e.add_argument("model", help="diffusers folder, single file, run folder (its final/, else its newest "
                   "checkpoint) or checkpoints/step_N folder of any backend (its EMA when it has one)")
    e.add_argument("--json", action="store_true", help="print only the JSON result line")
    e.add_argument("--per-combo", type=int, default=4, help="images per colour x shape combination")
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--guidance", type=float, default=4.0)
    e.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    e.add_argument("--out", help="also save the generated images here")
    e.add_argument("--data", help="score on this folder of images + captions (default: the run's own data; "
                                  "the shapes judge only for shapes data)")
    e.add_argument("--clip-model", help="local transformers CLIP folder for the CLIP score (default: eval.clip_model)")
    e.add_argument("--fid-model", help="local transformers image-encoder folder for FID (default: eval.fid_model)")
    e.add_argument("--num-images", type=int, default=64, help="images generated for CLIP score / FID on own data")
    e.set_defaults(func=cmd_eval)

    from colodiffusion.bench import build_parser as bench_parser

    b = sub.add_parser("bench", help="time the UNet training step on synthetic latents (JSON lines)")
    bench_parser(b).set_defaults(func=cmd_bench)
    return p


def _rank_tag() -> str:
    """' (rank N)' under torchrun with several processes, so every rank's failure names its rank."""
    return f" (rank {os.environ.get('RANK', 0)})" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""


def main(argv: list[str] | None = None) -> None:
    if lifeline.launched():  # a torchrun/deepspeed worker exits with its launcher (lifeline.py)
        lifeline.bind()
    args = build_parser().parse_args(argv)

    def run(args) -> int:
        try:
            return args.func(args)
        except ConfigError as exc:
            print(f"error{_rank_tag()}: {exc}", file=sys.stderr)
            return 2

    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun: a crash also lands in its per-rank error file
        from torch.distributed.elastic.multiprocessing.errors import record

        run = record(run)
    try:
        code = run(args)
    except Exception as exc:
        if _rank_tag():
            print(f"error{_rank_tag()}: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise
    sys.exit(code)


if __name__ == "__main__":
    main()
