"""The original project's sampling command, on top of colodiffusion's loading and `generate`:

    python scripts/txt2img.py --prompt "a red circle" --ckpt RUN_OR_MODEL --ddim_steps 50 --scale 7.5 \
        --n_samples 3 --n_iter 2 --H 512 --W 512 --seed 42 [--plms | --dpm_solver [--karras]] \
        [--negative_prompt TEXT] [--init-img IMAGE --strength 0.75] \
        [--fixed_code --ddim_eta 0.0 --precision full|autocast]
        --outdir outputs/txt2img-samples

`--ckpt` is a single-file checkpoint (.safetensors/.ckpt, LDM layout; `--config` its original YAML,
inferred when left out), a diffusers folder, a colodiffusion run folder, or one of its
`checkpoints/step_N` folders (any backend's; its EMA weights when it has them); the original project's
`LOGDIR/RUN/checkpoints/last.ckpt` is read as that run. Images go to
OUTDIR/samples/NNNNN.png and one labelled grid per call to OUTDIR/grid-NNNN.png, numbered after what
is there; each PNG carries its prompt and settings (the `parameters` text chunk UIs read).
Each image has its own seed (seed, seed+1, ...), so an image does not depend on the batch size.
A prompt (or a --from-file line) may end in its own options, as in kohya's prompt files:
"a dog --n blurry --s 30 --l 7 --d 5 --w 512 --h 512".
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", default="a painting of a virus monster playing guitar", help="the prompt to render")
    p.add_argument("--from-file", help="read prompts from this file, one per line (instead of --prompt)")
    p.add_argument("--outdir", default="outputs/txt2img-samples", help="dir to write results to")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling (diffusers' PNDM)")
    p.add_argument("--dpm_solver", action="store_true", help="use DPM-Solver(++) sampling")
    p.add_argument("--n_iter", type=int, default=2, help="sample this often")
    p.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--W", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--n_samples", type=int, default=3, help="how many samples to produce for each prompt (batch size)")
    p.add_argument("--n_rows", type=int, default=0, help="columns in the grid (default: n_samples)")
    p.add_argument("--scale", type=float, default=7.5, help="unconditional guidance scale")
    p.add_argument("--negative_prompt", default="", help="what guidance steers away from")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (with --dpm_solver)")
    p.add_argument("--init-img", dest="init_img", help="img2img: start from this image (resized to H x W)")
    p.add_argument("--strength", type=float, default=0.75,
                   help="img2img: strength for noising/unnoising; 1.0 destroys the information in the init image")
    p.add_argument("--config", default=None, help="original LDM YAML of a single-file --ckpt (default: inferred)")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder for a single file that carries none")
    p.add_argument("--ckpt", required=True, help="single-file checkpoint, diffusers folder, run folder or "
                                                 "checkpoints/step_N folder")
    p.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    p.add_argument("--fixed_code", action="store_true", help="the same starting noise for every --n_iter round")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0.0: deterministic sampling; DDIM only)")
    p.add_argument("--precision", choices=["full", "autocast"], default="autocast",
                   help="full: fp32 weights; autocast: fp16 on a GPU (fp32 on a CPU)")
    p.add_argument("--C", type=int, help="latent channels (checked against the model's)")
    p.add_argument("--f", type=int, help="downsampling factor (checked against the model's)")
    p.add_argument("--laion400m", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def flag_problem(opt):
    """One sentence for flags that cannot work together (None if they can)."""
    if opt.plms and opt.dpm_solver:
        return "choose one of --plms and --dpm_solver."
    if opt.ddim_eta and (opt.plms or opt.dpm_solver):
        return ("--ddim_eta is DDIM's; leave it at 0 with --plms or --dpm_solver "
                "(the original project refuses it with PLMS too).")
    if opt.laion400m:
        return ("--laion400m picked the original project's LAION-400M model files; give that model (or any other) "
                "with --ckpt instead (a single file, a diffusers folder or a run folder).")
    return None


def check_shape(opt, pipe) -> None:
    """The original project's --C / --f describe the model; here they come from it, so a different value is a
    mistake."""
    from colodiffusion.config import ConfigError

    for flag, given, actual in (("--C", opt.C, pipe.unet.config.in_channels), ("--f", opt.f, pipe.vae_scale_factor)):
        if given is not None and given != actual:
            raise ConfigError(f"{flag} {given} does not match the model, which has {actual}; leave {flag} out "
                              "(it is read from the model).")


def specs_for(opt, prompt: str, first_seed: int):
    """`n_samples` specs for one prompt line: its own options first, then the flags."""
    from colodiffusion.config import check_prompt, parse_prompt

    sampler = "pndm" if opt.plms else "dpm++" if opt.dpm_solver else "ddim"
    out = []
    for i in range(opt.n_samples):
        spec = parse_prompt(prompt)
        flags = {"negative_prompt": opt.negative_prompt, "steps": opt.ddim_steps, "guidance": opt.scale,
                 "sampler": sampler, "karras": opt.karras or None, "width": opt.W, "height": opt.H,
                 "init_image": opt.init_img}
        for name, value in flags.items():
            if getattr(spec, name) is None:
                setattr(spec, name, value)
        spec.seed = (spec.seed if spec.seed is not None else first_seed) + i
        if spec.init_image and spec.strength is None:
            spec.strength = opt.strength
        check_prompt(spec, f"prompt '{prompt}'")
        out.append(spec)
    return out


def main(argv=None) -> int:
    from colodiffusion.cli import model_path
    from colodiffusion.config import ConfigError, read_prompt_file

    opt = parse(argv)
    problem = flag_problem(opt)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        opt.ckpt = str(model_path(opt.ckpt))
        if opt.config and not Path(opt.ckpt).is_file():
            print(f"note: --config is read for a single-file --ckpt only; '{opt.ckpt}' is a folder that carries its "
                  "own configs, so --config is not used")
        if not Path(opt.ckpt).exists():
            raise ConfigError(f"--ckpt '{opt.ckpt}' does not exist.")
        prompts = read_prompt_file(opt.from_file) if opt.from_file else [opt.prompt]
        rounds = 1 if opt.fixed_code else opt.n_iter  # --fixed_code: every round starts from the same noise
        batches = [specs_for(opt, p, opt.seed + ((it % rounds) * len(prompts) + k) * opt.n_samples)
                   for it in range(opt.n_iter) for k, p in enumerate(prompts)]
        return run(opt, batches)  # (flags, prompts and paths checked before torch and diffusers are imported)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(opt, batches) -> int:
    from colodiffusion.generate import load_pipeline, render, save_grid, save_image

    import torch

    dtype = torch.float32 if opt.precision == "full" else None
    pipe = load_pipeline(opt.ckpt, dtype=dtype, original_config=opt.config, tokenizer=opt.tokenizer)
    check_shape(opt, pipe)
    model = Path(opt.ckpt).stem if Path(opt.ckpt).is_file() else Path(opt.ckpt).resolve().name
    sample_dir = Path(opt.outdir) / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    base = len(list(sample_dir.glob("*.png")))
    grid_count = len(list(Path(opt.outdir).glob("grid-*.png")))
    images, specs = [], []
    for batch in batches:
        out = render(pipe, batch, eta=opt.ddim_eta)
        images.extend(out)
        specs.extend(batch)
        if not opt.skip_save:
            for img, spec in zip(out, batch):
                save_image(img, sample_dir / f"{base:05d}.png", spec, model)
                base += 1
    if not opt.skip_grid:
        save_grid(images, specs, Path(opt.outdir) / f"grid-{grid_count:04d}.png", cols=opt.n_rows or opt.n_samples,
                  model=model)
    print(f"Your samples are ready and waiting for you here: \n{opt.outdir} \n \nEnjoy.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
