"""The seed project's entry point, kept for its users, with the original latent-diffusion main.py's flags:

    python main.py --logdir /tmp -t --postfix test -b config/train_colossalai.yaml [key=value ...]

trains exactly like `colodiffusion train -c CONFIG run.dir=LOGDIR/<time>_<config name>_<postfix>`
(`config/X` is the shipped `configs/X`). Started as one process with `trainer.devices: N` (N > 1) in
the config, it starts N processes on this node under torchrun, as the seed's Lightning Trainer did.
README, "Coming from the seed project", maps every flag.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "src"))

BOOL_FLAGS = {"-t", "--train", "--no-test", "-d", "--debug", "--scale_lr"}
BOOL_WORDS = {"yes", "true", "t", "y", "1", "no", "false", "f", "n", "0"}


def str2bool(v: str) -> bool:
    if v.lower() not in BOOL_WORDS:
        raise argparse.ArgumentTypeError(f"'{v}' is not a boolean (true/false, yes/no, 1/0)")
    return v.lower() in ("yes", "true", "t", "y", "1")


def normalize(argv: list[str]) -> list[str]:
    """`-t` may be followed by a boolean word (`-t True`, as the original allows) but never eats the
    next argument otherwise (`-t train.max_steps=2` keeps the override)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in BOOL_FLAGS:
            word = argv[i + 1] if i + 1 < len(argv) else ""
            take = word.lower() in BOOL_WORDS
            out.append(f"{a}={word if take else 'true'}")
            i += 2 if take else 1
            continue
        out.append(a)
        i += 1
    return out


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--name", default="", help="run name (default: the first config file's name)")
    p.add_argument("-r", "--resume", default="",
                   help="run folder or checkpoint folder: resume it with its saved config.yaml (-b files and key=value "
                        "apply on top)")
    p.add_argument("-b", "--base", nargs="*", default=[], help="config files, merged left to right; then key=value "
                                                               "overrides")
    p.add_argument("-t", "--train", type=str2bool, nargs="?", const=True, default=False, help="train")
    p.add_argument("--no-test", type=str2bool, nargs="?", const=True, default=False,
                   help="skip the test after training (the held-out prompt evaluation; built-in shapes data only)")
    p.add_argument("-p", "--project", help="project name of the experiment trackers (log.project)")
    p.add_argument("-d", "--debug", type=str2bool, nargs="?", const=True, default=False,
                   help="post-mortem debugger on a crash (in a terminal); the run folder moves to LOGDIR/debug_runs/")
    p.add_argument("-s", "--seed", type=int, default=None, help="training seed (train.seed)")
    p.add_argument("-f", "--postfix", default="", help="appended to the run folder's name")
    p.add_argument("-l", "--logdir", default="logs", help="parent folder of the run folder")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=False,
                   help="train.lr is the base lr per image: use train.batch_size (grad_accum x GPUs x batch per GPU) x "
                        "train.lr")
    return p.parse_known_args(normalize(argv))


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def recipe_path(path: str) -> str:
    """A config path as given, else the shipped recipe it names (the seed wrote `config/`, ours is `configs/`)."""
    p = Path(path)
    if p.exists():
        return path
    parts = p.parts
    for candidate in (
        ROOT / p,
        ROOT / "configs" / Path(*parts[1:]) if len(parts) > 1 and parts[0] == "config" else None,
    ):
        if candidate is not None and candidate.is_file():
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"note: using {candidate} for {path}")
            return str(candidate)
    return path


def plan(args, overrides: list[str]) -> tuple[list[str], list[str], Path]:
    """(config files, extra key=value, run folder), as the original derives its logdir."""
    configs = [recipe_path(b) for b in args.base]
    pinned = [o.split("=", 1)[1] for o in overrides if o.startswith("run.dir=")]
    if args.resume:
        if args.name:
            fail("-n/--name and -r/--resume cannot be given together; to branch a run, start a new one with "
                 "-n NAME and train.resume=CHECKPOINT.")
        path = Path(args.resume)
        if (path / "config.yaml").is_file():
            run_dir, resume = path, "auto"
        elif path.is_dir() and path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
            run_dir, resume = path.parent.parent, str(path)
        else:
            fail(f"-r '{path}' is neither a run folder (with config.yaml) nor a checkpoint folder inside one "
                 "(RUN/checkpoints/step_N).")
        # As the original reloads the run's configs/*.yaml: the saved config first, -b files on top.
        return [str(run_dir / "config.yaml")] + configs, [f"run.dir={run_dir}", f"train.resume={resume}"], run_dir
    if pinned:  # an explicit run.dir (also how a relaunch under torchrun passes the folder on)
        return configs, [], Path(pinned[-1])
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    name = args.name or (Path(configs[0]).stem if configs else "tiny")
    postfix = f"_{args.postfix}" if args.postfix and not args.postfix.startswith("_") else args.postfix
    run_dir = Path(args.logdir) / (now + "_" + name + postfix)
    return configs, [f"run.dir={run_dir}"], run_dir


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse(argv)
    # The deepspeed launcher appends --local_rank=N (LOCAL_RANK is in the environment too).
    overrides = [o for o in overrides if not o.startswith("--local_rank")]
    # `-b` takes several words (as the seed's did); key=value words after it are overrides.
    overrides = [b for b in args.base if "=" in b] + overrides
    args.base = [b for b in args.base if "=" not in b]
    if not args.train:
        fail("pass -t to train (the seed's test-only mode is `colodiffusion eval RUN`).")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        fail(
            f"unknown argument '{bad[0]}' (flags: see --help; config changes are key=value, e.g. train.max_steps=200)."
        )
    configs, extra, run_dir = plan(args, overrides)
    if args.seed is not None:
        extra.append(f"train.seed={args.seed}")
    if args.project:
        extra.append(f"log.project={args.project}")
    cfg = load(configs, extra + overrides)
    if args.scale_lr:
        extra.append(scaled_lr(cfg, args.resume))
        cfg = load(configs, extra + overrides)
    relaunch_under_torchrun(cfg, argv, run_dir)
    run(args, cfg, ["train", *[a for c in configs for a in ("-c", c)], *extra, *overrides], run_dir)


def load(configs, overrides):
    from colodiffusion.config import ConfigError, load_config

    try:
        return load_config(configs, overrides)
    except ConfigError as exc:
        fail(str(exc))


def scaled_lr(cfg, resuming: str) -> str:
    """The original's --scale_lr: accumulate_grad_batches * ngpu * batch per GPU * base_lr."""
    t = cfg.train
    if resuming:
        print("--scale_lr: the run's saved config.yaml already holds its learning rate; not scaled again")
        return f"train.lr={t.lr!r}"
    lr = t.batch_size * t.lr
    print(f"Setting learning rate to {lr:.2e} = {t.batch_size} (train.batch_size: grad_accum x GPUs x batch per GPU) "
          f"* {t.lr:.2e} (base_lr)")
    return f"train.lr={lr!r}"


def run(args, cfg, cli_args: list[str], run_dir: Path) -> None:
    from colodiffusion.cli import main as cli_main

    main_rank = int(os.environ.get("RANK", 0)) == 0
    code = 0
    try:
        try:
            cli_main(cli_args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        if code == 0 and main_rank and not args.no_test:
            run_test(cfg, run_dir)
    except Exception:
        if args.debug and main_rank and sys.stdin.isatty():
            import pdb

            pdb.post_mortem()
        raise
    finally:
        if args.debug and not args.resume and main_rank:
            to_debug_runs(run_dir)
    sys.exit(code)


def run_test(cfg, run_dir: Path) -> None:
    """The original runs trainer.test after training unless --no-test; ours is the held-out prompt
    evaluation (`colodiffusion eval`), which exists for the built-in shapes data."""
    if not (run_dir / "final" / "model_index.json").is_file():
        return
    if cfg.data.source != "shapes":
        print("test: skipped (there is no test split; the held-out evaluation is for data.source=shapes)")
        return
    from colodiffusion.evaluate import evaluate_model
    from colodiffusion.generate import load_pipeline

    result = evaluate_model(load_pipeline(run_dir / "final"), per_combo=1, steps=cfg.sample.steps)
    (run_dir / "test.json").write_text(json.dumps(result) + "\n")
    print("test (held-out prompts): " + json.dumps(result))


def to_debug_runs(run_dir: Path) -> None:
    """As the original with -d: a new run's folder is moved to LOGDIR/debug_runs/NAME."""
    if not run_dir.is_dir():
        return
    dst = run_dir.parent / "debug_runs" / run_dir.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    run_dir.rename(dst)
    print(f"debug run moved to {dst}")


def relaunch_under_torchrun(cfg, argv: list[str], run_dir: Path) -> None:
    """As the seed's Lightning Trainer did for `devices: N`: started as one process with
    trainer.devices > 1, start N processes of this script on this node with torchrun, each given the
    same run folder. Under torchrun or the deepspeed launcher, do nothing."""
    if "WORLD_SIZE" in os.environ or cfg.trainer.devices <= 1:
        return
    from colodiffusion.config import ConfigError
    from colodiffusion.parallel import check_world

    try:  # what every rank would refuse (no GPU for gemini/fp16, a mesh that does not fit): said once, here
        check_world(cfg, cfg.trainer.devices)
    except ConfigError as exc:
        fail(str(exc))
    src = str(ROOT / "src")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)  # the workers'
    cmd = [
        "--standalone",
        "--nproc_per_node",
        str(cfg.trainer.devices),
        str(ROOT / "main.py"),
        *argv,
        f"run.dir={run_dir}",
    ]
    print("launching: -m torch.distributed.run " + " ".join(cmd), flush=True)
    sys.exit(torchrun(cmd))


# Worker exit codes that come with their own one-line reason: a user mistake (2), Ctrl-C (130).
SAID = (2, 130)


def torchrun(cmd: list[str]) -> int:
    """torchrun in this process. A worker that stopped with one sentence (exit code 2 or 130) has
    said why; torchrun's ChildFailedError traceback would only bury it, so it is left out. Any
    other failure is a crash and keeps the traceback."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(cmd)
    except ChildFailedError as exc:
        _, first = exc.get_first_failure()
        if first.exitcode not in SAID:
            raise
        return first.exitcode
    return 0


if __name__ == "__main__":
    main()
