"""`colodiffusion train | sample | export | eval | config`: thin argument parsing over the modules.

A user mistake (bad config key, missing path) prints one sentence and exits with code 2; no
traceback. Anything else is a bug and keeps its traceback. The parser imports neither torch nor
diffusers, and each command checks its arguments and config before it imports what it needs, so
`--help` and a mistake answer at once (tests/test_entry_points.py checks which modules were loaded).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from colodiffusion import lifeline  # first: it records the launcher's pid before anything slow

# transformers warns at import about optional image processors we never use; bitsandbytes and torchao
# (imported by diffusers when installed) about optional kernel packages they cannot load.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("torchao").setLevel(logging.ERROR)

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

    cfg = load_config(args.config, args.overrides)  # before torch is imported: a bad key answers at once
    from colodiffusion.train.loop import train

    _threads()
    _quiet()
    run_dir = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"run folder: {run_dir}")
    return 0


def cmd_cache(args) -> int:
    from colodiffusion.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.shard_size < 1 or args.batch_size < 1:
        raise UsageError("--shard-size and --batch-size must be at least 1.")
    from colodiffusion.data.cache import build_cache
    from colodiffusion.train.first_stage import frozen_components

    _threads()
    _quiet()

    def components(dataset, device, show):  # the run's frozen parts (trained here for a preset without them)
        return frozen_components(cfg, dataset, Path(cfg.run.dir) / "components", device, show)

    out = build_cache(cfg, args.out, components, shard_size=args.shard_size, batch_size=args.batch_size)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"latent cache: {out} (train from it with data.source=latents data.path={out})")
    return 0


def sample_specs(args) -> list:
    """Each --prompt and each line of --prompt-file (with its own kohya-style options, if any)
    --n-samples times, the flags filling the rest."""
    from colodiffusion.config import check_prompt, multiples_of_8, parse_prompt, read_prompt_file

    if args.n_flag is not None:
        raise UsageError("--n is the negative prompt inside a --prompt string ('a dog --n blurry'); on the command "
                         "line, images per prompt are --n-samples N and a negative prompt for all is --negative-prompt "
                         "TEXT.")
    if args.n_samples < 1:
        raise UsageError(f"--n-samples must be at least 1, not {args.n_samples}.")
    prompts = list(args.prompt or []) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    if not prompts:
        raise UsageError("give --prompt TEXT (repeatable) or --prompt-file FILE (one prompt per line).")
    for flag in ("height", "width"):
        v = getattr(args, flag)
        if v is not None and (v < 8 or v % 8):
            raise UsageError(f"--{flag} {v} is not a multiple of 8; use {multiples_of_8(v)}.")
    specs = []
    flags = {"negative_prompt": args.negative_prompt, "steps": args.steps, "guidance": args.guidance,
             "sampler": args.sampler, "karras": args.karras, "width": args.width, "height": args.height,
             "init_image": args.init_image}
    for text in prompts:
        for j in range(args.n_samples):
            spec = parse_prompt(text)
            spec.seed = spec.seed + j if spec.seed is not None else args.seed + len(specs)  # --d: its n seeds
            for name, value in flags.items():
                if getattr(spec, name) is None:
                    setattr(spec, name, value)
            if spec.init_image and spec.strength is None:
                spec.strength = args.strength
            check_prompt(spec, f"prompt '{text}'")
            specs.append(spec)
    return specs


def model_name(model: str) -> str:
    """What a PNG's Model field says: the run or model folder's name (not 'final'), or the file's stem."""
    p = Path(model).resolve()
    return p.parent.name if p.name == "final" else p.stem if p.is_file() else p.name


def _exists(path: str, what: str) -> None:
    if not Path(path).exists():
        raise UsageError(f"{what} '{path}' does not exist.")


def model_path(path: str) -> Path:
    """The model a user names. The original project's `RUN/checkpoints/last.ckpt` (which a run here does not write)
    is that run folder: its final/, or its newest checkpoint while it trains."""
    p = Path(path)
    if not p.exists() and p.name == "last.ckpt" and p.parent.name == "checkpoints" and p.parent.parent.is_dir():
        run = p.parent.parent
        print(f"note: {p} is the original project's name for the last checkpoint; reading the run {run} (its final/, "
              "else its newest checkpoint)", file=sys.stderr)
        return run
    return p


def cmd_sample(args) -> int:
    specs = sample_specs(args)
    args.model = str(model_path(args.model))
    _exists(args.model, "the model")
    from colodiffusion.generate import render, save_grid, save_image

    _threads()
    pipe = _load(args.model)
    images = render(pipe, specs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = model_name(args.model)
    for i, (img, spec) in enumerate(zip(images, specs)):
        save_image(img, out / f"{i:05d}.png", spec, name)
    save_grid(images, specs, out / "grid.png", cols=args.n_samples, model=name)
    print(f"wrote {len(images)} images and grid.png to {out} (prompt and settings in each PNG's parameters)")
    return 0


def cmd_eval(args) -> int:
    if args.num_images < 2:
        raise UsageError("--num-images must be at least 2 (FID estimates a covariance).")
    _exists(args.model, "the model")
    for flag in ("data", "clip_model", "fid_model"):
        if getattr(args, flag):
            _exists(getattr(args, flag), "--" + flag.replace("_", "-"))
    from colodiffusion.evaluate import choose_scorer, evaluate_model, evaluate_own_data

    _threads()
    pipe = _load(args.model)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    plan = choose_scorer(args.model, args.data, native)
    print(plan.sentence, file=sys.stderr)
    # Guidance and sampler left unset take each scorer's own default.
    chosen = {k: v for k, v in (("guidance", args.guidance), ("sampler", args.sampler)) if v is not None}
    if plan.scorer == "shapes":
        result = {"scorer": "shapes", **evaluate_model(pipe, per_combo=args.per_combo, steps=args.steps,
                                                       out_dir=args.out, **chosen)}
    else:
        result = evaluate_own_data(pipe, plan.cfg, num_images=args.num_images, steps=args.steps, **chosen,
                                   clip_model=args.clip_model, fid_model=args.fid_model,
                                   out_dir=args.out)
        if "note" in result:
            print(result["note"] + ".", file=sys.stderr)
    if not args.json:
        for k, v in result.items():
            if k.endswith("_ci95"):
                continue
            ci = result.get(f"{k}_ci95")
            print(f"{k:>16}: {v:.3f}  (95% interval {ci[0]:.2f}-{ci[1]:.2f})" if ci else f"{k:>16}: {v}")
    print(json.dumps(result))
    return 0


def cmd_config(args) -> int:
    from colodiffusion.config import describe, load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    print(describe(cfg) if args.all else to_yaml(cfg).rstrip("\n"))
    return 0


def cmd_export(args) -> int:
    _exists(args.source, "the export source")
    for flag in ("original_config", "tokenizer"):
        if getattr(args, flag):
            _exists(getattr(args, flag), "--" + flag.replace("_", "-"))
    from colodiffusion.export import export

    _quiet()
    out = export(args.source, args.format, args.out, ema=args.ema, dtype=args.dtype, merge_lora=args.merge_lora,
                 original_config=args.original_config, tokenizer=args.tokenizer)
    print(f"wrote {args.format} model to {out}")
    return 0


def cmd_bench(args) -> int:
    from colodiffusion.bench_args import checked_config

    cfg = checked_config(args)  # flags and config first: torch only for a run that will happen
    from colodiffusion.bench import run_bench

    _threads()
    return run_bench(cfg, args)


def _quiet() -> None:
    """No "Loading pipeline components" / "Loading weights" / "Writing model shards" bars from the libraries
    (our own bars show the run's phases): noise on every command."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _load(model: str):
    from colodiffusion.generate import load_pipeline

    _quiet()
    try:
        return load_pipeline(model)
    except FileNotFoundError as exc:
        raise UsageError(f"{exc}.") from None


def build_parser() -> argparse.ArgumentParser:
    from colodiffusion.bench_args import DESCRIPTION as BENCH
    from colodiffusion.bench_args import build_parser as bench_parser
    from colodiffusion.config import SAMPLER_NAMES

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

    s = sub.add_parser("sample", help="generate images from a trained model (PNGs carry their settings)",
                       allow_abbrev=False)  # (so that --n is never read as an abbreviation of --n-samples)
    s.add_argument("model", help="diffusers folder, single file, run folder (its final/, else its newest "
                   "checkpoint) or checkpoints/step_N folder of any backend (its EMA when it has one)")
    s.add_argument("--prompt", action="append",
                   help="text prompt (repeatable); may end in options of its own: --n NEGATIVE --s STEPS --l GUIDANCE "
                        "--d SEED --w WIDTH --h HEIGHT --ss SAMPLER --karras --i INIT_IMAGE --strength S")
    s.add_argument("--prompt-file", help="a file of prompts, one per line, each with the options --prompt takes "
                                         "(kohya's prompt files; # starts a comment)")
    s.add_argument("--negative-prompt", default="", help="what guidance steers away from (every prompt)")
    s.add_argument("--n-samples", "--n_samples", type=int, default=4, help="images per prompt (txt2img's --n_samples)")
    s.add_argument("--n", dest="n_flag", help=argparse.SUPPRESS)  # refused: --n is a prompt's negative prompt
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=4.0)
    s.add_argument("--sampler", default="dpm++", choices=SAMPLER_NAMES)
    s.add_argument("--karras", action="store_true", help="Karras sigmas (with --sampler dpm++ or euler)")
    s.add_argument("--init-image", help="img2img: start from this image (resized to the output size)")
    s.add_argument("--strength", type=float, default=0.75,
                   help="img2img: how much noise covers the init image (0-1; 1 ignores it)")
    s.add_argument("--seed", type=int, default=0, help="seed of the first image; the next ones count up")
    s.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the model's)")
    s.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the model's)")
    s.add_argument("--out", default="samples")
    s.set_defaults(func=cmd_sample)

    g = sub.add_parser("config", help="print the effective config (--all: every key with its default and help)")
    g.add_argument("-c", "--config", help="YAML recipe (only the values that differ from the defaults)")
    g.add_argument(
        "--all", action="store_true", help="every key: value, default where it differs, allowed values, help"
    )
    g.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=200")
    g.set_defaults(func=cmd_config)

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
    e.add_argument("--per-combo", type=int, default=8, help="images per colour x shape combination (8: 96 images, each "
                                                            "held-out wording once per combination)")
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: 2 for the shapes judge, as measured in "
                        "bench/NOTES.md; 4 otherwise)")
    e.add_argument("--sampler", default=None, choices=SAMPLER_NAMES,
                   help="default: euler_a for the shapes judge (an ancestral sampler commits each shape to one "
                        "place, bench/NOTES.md); ddim otherwise")
    e.add_argument("--out", help="also save the generated images here")
    e.add_argument("--data", help="score on this folder of images + captions (default: the run's own data; "
                                  "the shapes judge only for shapes data)")
    e.add_argument("--clip-model", help="local transformers CLIP folder for the CLIP score (default: eval.clip_model)")
    e.add_argument("--fid-model", help="local transformers image-encoder folder for FID (default: eval.fid_model)")
    e.add_argument("--num-images", type=int, default=64, help="images generated for CLIP score / FID on own data")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help=BENCH + " (JSON lines)", description=BENCH)
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
        except KeyboardInterrupt:  # Ctrl-C is the user's choice, not a crash: one line, no traceback
            after = " (continue with train.resume=auto from its newest checkpoint)" if args.command == "train" else ""
            print(f"interrupted{_rank_tag()}{after}", file=sys.stderr)
            return 130

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
