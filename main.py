"""The seed project's entry point, kept for its users:

    python main.py --logdir DIR -t --postfix NAME -b CONFIG [key=value ...]

trains exactly like `colodiffusion train -c CONFIG run.dir=DIR/<time>_<config name><postfix>`.
Started as one process with `trainer.devices: N` (N > 1) in the config, it starts N processes on
this node under torchrun, as the seed's Lightning Trainer did.
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
    # The deepspeed launcher appends --local_rank=N (LOCAL_RANK is in the environment too).
    overrides = [o for o in overrides if not o.startswith("--local_rank")]
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
    relaunch_under_torchrun(cli_args)
    cli_main(cli_args)


def relaunch_under_torchrun(cli_args: list[str]) -> None:
    """As the seed's Lightning Trainer did for `devices: N`: started as one process with
    trainer.devices > 1, start N processes on this node with torchrun (run.dir is already fixed,
    so every rank writes the same run folder). Under torchrun or the deepspeed launcher, do nothing."""
    import os

    from colodiffusion.config import ConfigError, load_config

    if "WORLD_SIZE" in os.environ:
        return
    try:
        cfg = load_config(cli_args[2] if cli_args[1:2] == ["-c"] else None,
                          cli_args[3:] if cli_args[1:2] == ["-c"] else cli_args[1:])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if cfg.trainer.devices <= 1:
        return
    src = str(Path(__file__).resolve().parent / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.trainer.devices),
           "-m", "colodiffusion", *cli_args]
    print("launching: " + " ".join(cmd[1:]), flush=True)
    os.execve(sys.executable, cmd, env)


if __name__ == "__main__":
    main()
