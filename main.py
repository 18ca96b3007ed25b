"""The seed project's entry point, kept for its users:

    python main.py --logdir DIR -t --postfix NAME -b CONFIG [key=value ...]

trains exactly like `colodiffusion train -c CONFIG run.dir=DIR/<time>_<config name><postfix>`.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-t", "--train", action="store_true", help="train (the seed's only mode we run)")
    p.add_argument("-b", "--base", nargs="*", default=[], help="config file(s); later ones override earlier")
    p.add_argument("-l", "--logdir", default="logs", help="parent folder of the run folder")
    p.add_argument("-p", "--postfix", default="", help="appended to the run folder's name")
    p.add_argument("-n", "--name", default="", help="run name (default: the config file's name)")
    p.add_argument("-r", "--resume", default="", help="run folder or checkpoint to resume from")
    p.add_argument("-s", "--seed", type=int, default=None, help="training seed")
    return p.parse_known_args(argv)


def main(argv=None) -> None:
    from colodiffusion.cli import main as cli_main

    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    # `-b` takes several words (as the seed's did); key=value words after it are overrides.
    overrides = [b for b in args.base if "=" in b] + overrides
    args.base = [b for b in args.base if "=" not in b]
    if not args.train:
        print("error: pass -t to train (the seed's test-only mode is `colodiffusion eval`).", file=sys.stderr)
        sys.exit(2)
    if len(args.base) > 1:
        print("error: give one config file with -b; put further changes as key=value arguments.", file=sys.stderr)
        sys.exit(2)
    name = args.name or (Path(args.base[0]).stem if args.base else "tiny")
    if args.resume:
        resume = Path(args.resume)
        run_dir = resume if (resume / "checkpoints").is_dir() else resume.parent.parent
        extra = [f"run.dir={run_dir}", "train.resume=auto" if resume == run_dir else f"train.resume={resume}"]
    else:
        now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
        postfix = f"_{args.postfix}" if args.postfix and not args.postfix.startswith("_") else args.postfix
        extra = [f"run.dir={Path(args.logdir) / (now + '_' + name + postfix)}"]
    if args.seed is not None:
        extra.append(f"train.seed={args.seed}")
    cli_args = ["train"] + (["-c", args.base[0]] if args.base else []) + extra + overrides
    cli_main(cli_args)


if __name__ == "__main__":
    main()
