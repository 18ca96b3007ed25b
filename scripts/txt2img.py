"""The seed's sampling command, on top of colodiffusion's loading and `generate`:

    python scripts/txt2img.py --prompt "a red circle" --ckpt RUN_OR_MODEL --ddim_steps 50 --scale 7.5 \
        --n_samples 3 --n_iter 2 --H 512 --W 512 --seed 42 [--plms | --dpm_solver] --outdir outputs/txt2img-samples

`--ckpt` is a single-file checkpoint (.safetensors/.ckpt, LDM layout; `--config` its original YAML,
inferred when left out), a diffusers folder, a colodiffusion run folder, or one of its
`checkpoints/step_N` folders (any backend's; its EMA weights when it has them). Images go to
OUTDIR/samples/NNNNN.png and one grid per call to OUTDIR/grid-NNNN.png, numbered after what is there.
Each image has its own seed (seed, seed+1, ...), so an image does not depend on the batch size.
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
    p.add_argument("--config", default=None, help="original LDM YAML of a single-file --ckpt (default: inferred)")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder for a single file that carries none")
    p.add_argument("--ckpt", required=True, help="single-file checkpoint, diffusers folder, run folder or checkpoints/step_N folder")
    p.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from colodiffusion.config import ConfigError
    from colodiffusion.generate import generate, load_pipeline, make_grid

    opt = parse(argv)
    if opt.plms and opt.dpm_solver:
        print("error: choose one of --plms and --dpm_solver.", file=sys.stderr)
        return 2
    sampler = "pndm" if opt.plms else "dpm++" if opt.dpm_solver else "ddim"
    if opt.from_file:
        prompts = [line.strip() for line in Path(opt.from_file).read_text().splitlines() if line.strip()]
    else:
        prompts = [opt.prompt]
    try:
        pipe = load_pipeline(opt.ckpt, original_config=opt.config, tokenizer=opt.tokenizer)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sample_dir = Path(opt.outdir) / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    base = len(list(sample_dir.glob("*.png")))
    grid_count = len(list(Path(opt.outdir).glob("grid-*.png")))
    rows = []
    for it in range(opt.n_iter):
        for prompt in prompts:
            seeds = [opt.seed + len(rows) * opt.n_samples + i for i in range(opt.n_samples)]
            images = generate(pipe, [prompt] * opt.n_samples, seeds, steps=opt.ddim_steps, guidance=opt.scale,
                              sampler=sampler, height=opt.H, width=opt.W)
            rows.append(images)
            if not opt.skip_save:
                for img in images:
                    img.save(sample_dir / f"{base:05d}.png")
                    base += 1
    if not opt.skip_grid:
        flat = [img for row in rows for img in row]
        make_grid(flat, cols=opt.n_rows or opt.n_samples).save(Path(opt.outdir) / f"grid-{grid_count:04d}.png")
    print(f"Your samples are ready and waiting for you here: \n{opt.outdir} \n \nEnjoy.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
