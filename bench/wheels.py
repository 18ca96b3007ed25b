"""The wheels each GPU script carries to the device machine, fetched here and installed there.

The GPU image (torch 2.11, transformers, peft, triton, accelerate, einops, ...; no network) lacks
diffusers and omegaconf, and for the engines Colossal-AI, DeepSpeed and what they import. Each
script gets its own folder, carried alone (`carry=[".whl/gpu_check"]` or `[".whl/engines"]`): a
device call carries at most 64 MiB with the working tree, so a folder may hold at most 60 MiB.

    python3 bench/wheels.py plan engines                  # the folder, each wheel and its size, the total
    python3 bench/wheels.py prepare gpu_check engines     # fetch/build here (bench/prepare_wheels.sh)
    python3 bench/wheels.py prepare engines --python 3.11 --dir /tmp/whl311   # for a CPU rehearsal on Python 3.11
    python3 bench/wheels.py install engines deepspeed --dir .whl/engines --site /tmp/site   # there

A script installs its wheels by *need* (a group: `core`, `colossalai`, ...), each into its own
folder under --site, then imports the need's modules once in a fresh interpreter. `install` prints
the folder to put on PYTHONPATH (nothing when the need already imports without wheels, as on a
development machine), or one sentence and exit code 1: the script then stops (core) or skips the
steps that need it. Standard library only: it runs on the GPU image's python3 before anything else.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 60 * 2**20
"""The most a wheel folder may hold: the device call carries 64 MiB with the working tree (~1 MiB)."""
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
PYTHON = "3.12"  # the GPU image's python3


@dataclass(frozen=True)
class Wheel:
    requirement: str  # name==version
    bytes: int  # as fetched or built on 2026-12-04 (built ones vary by a few bytes)
    build: bool = False  # sdist only on PyPI: `pip wheel` here (pure Python)

    @property
    def name(self) -> str:
        return self.requirement.split("==")[0]

    @property
    def stem(self) -> str:
        """The wheel file name's first part (PEP 427: runs of -_. become _)."""
        return re.sub(r"[-_.]+", "_", self.name).lower()


@dataclass(frozen=True)
class Need:
    wheels: tuple[Wheel, ...]
    modules: tuple[str, ...]  # imported once after the install: the need is there only if they import


CORE = Need((Wheel("diffusers==0.42.1", 6_355_908), Wheel("omegaconf==2.3.0", 79_500),
             Wheel("antlr4-python3-runtime==4.9.3", 144_590, build=True)), ("diffusers", "omegaconf"))
TARGETS: dict[str, dict[str, Need]] = {
    "gpu_check": {
        "core": CORE,
        # the fp8 lever only (EXTRA=2); its wheel also holds a top-level `test` package (pruned at install)
        "torchao": Need((Wheel("torchao==0.17.0", 3_206_172),), ("torchao.float8",)),
    },
    "engines": {
        "core": CORE,
        # colossalai.booster imports colossalai.nn.optimizer, which imports galore_torch, which imports bitsandbytes
        "colossalai": Need(
            (
                Wheel("colossalai==0.5.0", 1_625_191, build=True),
                Wheel("galore-torch==1.0", 13_309),
                Wheel("bitsandbytes==0.50.2", 43_139_553),
            ),
            ("colossalai.booster", "colossalai.nn.optimizer"),
        ),
        "deepspeed": Need(
            (
                Wheel("deepspeed==0.19.8", 2_168_857, build=True),
                Wheel("hjson==3.1.0", 54_018),
                Wheel("pydantic==2.13.4", 472_262),
                Wheel("pydantic_core==2.46.4", 2_094_516),
                Wheel("annotated-types==0.7.0", 13_643),
                Wheel("typing-inspection==0.4.2", 14_611),
                Wheel("typing_extensions==4.16.0", 45_571),
            ),
            ("deepspeed",),
        ),
    },
}


def folder(target: str) -> Path:
    """Where a target's wheels live, relative to the repository root; siblings, never nested."""
    return Path(".whl") / target


def wheels_of(target: str) -> list[Wheel]:
    seen: dict[str, Wheel] = {}
    for need in TARGETS[target].values():
        for w in need.wheels:
            seen.setdefault(w.stem, w)
    return list(seen.values())


def planned_bytes(target: str) -> int:
    return sum(w.bytes for w in wheels_of(target))


def files_for(directory: Path, wheels) -> tuple[list[Path], list[str]]:
    """(the wheel files of `wheels` in `directory`, the requirements with no file or with several)."""
    found, missing = [], []
    for w in wheels:
        version = w.requirement.split("==")[1]
        hits = sorted(directory.glob(f"{w.stem}-{version}-*.whl"))
        if len(hits) == 1:
            found.append(hits[0])
        else:
            missing.append(w.requirement + (" (several files)" if hits else ""))
    return found, missing


def folder_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def check_folder(directory: Path, target: str) -> list[str]:
    """What is wrong with a prepared folder: missing wheels, strays (two versions stop the install), size."""
    problems = []
    found, missing = files_for(directory, wheels_of(target))
    if missing:
        problems.append(f"{directory} lacks {', '.join(missing)}")
    strays = sorted(set(directory.glob("*.whl")) - set(found))
    if strays:
        problems.append(f"{directory} holds wheels not in the plan: {', '.join(p.name for p in strays)}")
    size = folder_bytes(directory)
    if size > LIMIT_BYTES:
        problems.append(f"{directory} holds {size:,} bytes, over the {LIMIT_BYTES:,} a device call can carry beside "
                        "the tree")
    return problems


# -- commands -------------------------------------------------------------------------------------
def cmd_plan(args) -> int:
    total = 0
    for target in args.targets:
        print(f"{target}: carry [\"{folder(target)}\"]")
        for need_name, need in TARGETS[target].items():
            for w in need.wheels:
                print(f"  {need_name:<11} {w.requirement:<34} {w.bytes:>11,}{'  (built here)' if w.build else ''}")
        total = planned_bytes(target)
        print(f"  total {total:,} bytes of {LIMIT_BYTES:,}")
        if total > LIMIT_BYTES:
            print(f"error: {target}'s wheels exceed what a device call can carry", file=sys.stderr)
            return 1
    return 0


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def cmd_prepare(args) -> int:
    for target in args.targets:
        out = Path(args.dir) / target if args.dir else ROOT / folder(target)
        out.mkdir(parents=True, exist_ok=True)
        wheels = wheels_of(target)
        _, missing = files_for(out, wheels)
        todo = [w for w in wheels if w.requirement in missing]
        fetch = [w.requirement for w in todo if not w.build]
        if fetch:
            platforms = [a for p in PLATFORMS for a in ("--platform", p)]
            pip(
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                args.python,
                "--implementation",
                "cp",
                *platforms,
                "-d",
                str(out),
                *fetch,
            )
        for w in (w for w in todo if w.build):
            # pure-Python wheels from the sdist; the builds use this machine's torch only to read its version
            pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), w.requirement)
        problems = check_folder(out, target)
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        if problems:
            return 1
        print(f"{out}: {len(wheels)} wheels for Python {args.python}, {folder_bytes(out):,} bytes; "
              f"carry=[\"{folder(target)}\"]")
    return 0


def prune_stdlib_shadows(site: Path) -> list[str]:
    """Remove top-level packages or modules a wheel put beside its own that are named like a standard
    library module (torchao ships `test/`): on PYTHONPATH they would hide the standard library's
    (its `test` package)."""
    # sys.stdlib_module_names leaves out the standard library's own `test` package; `tests` is never a library
    shadowing = set(sys.stdlib_module_names) | {"test", "tests"}
    removed = []
    for entry in sorted(site.iterdir()):
        name = entry.name.split(".")[0]
        if entry.name.endswith((".dist-info", ".data")) or name not in shadowing:
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        removed.append(entry.name)
    return removed


def import_error(modules, pythonpath: str) -> str:
    """'' if `modules` import in a fresh interpreter with this PYTHONPATH, else the error's last line."""
    env = {**os.environ, "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        [sys.executable, "-c", "import " + ", ".join(modules)], env=env, capture_output=True, text=True
    )
    if proc.returncode == 0:
        return ""
    sys.stderr.write(proc.stderr)
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return last[-1].strip() if last else f"exit code {proc.returncode}"


def cmd_install(args) -> int:
    need = TARGETS[args.target][args.need]
    directory = Path(args.dir)
    here = os.environ.get("PYTHONPATH", "")
    found, missing = files_for(directory, need.wheels)
    if missing:  # no wheels: fine where the need already imports (a machine with the packages installed)
        err = import_error(need.modules, here)
        if err:
            print(f"no wheels for {', '.join(missing)} in {directory}, and {' '.join(need.modules)} does not import "
                  f"here ({err}): run `bash bench/prepare_wheels.sh {args.target}` and carry {folder(args.target)}")
            return 1
        return 0
    site = Path(args.site) / args.need
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)],
                          capture_output=True, text=True)
    sys.stderr.write(proc.stdout + proc.stderr)  # pip's own words: the script's log
    if proc.returncode:
        print(f"pip could not install the {args.need} wheels from {directory} (exit code {proc.returncode}; see the "
              "log)")
        return 1
    for name in prune_stdlib_shadows(site):
        print(f"removed {site / name}: it would shadow the standard library's {name.split('.')[0]}", file=sys.stderr)
    err = import_error(need.modules, os.pathsep.join(p for p in (here, str(site)) if p))
    if err:
        print(f"the {args.need} wheels installed but {' '.join(need.modules)} does not import: {err}")
        return 1
    print(site)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("plan", help="each target's folder, wheels and sizes; exit 1 over the limit")
    s.add_argument("targets", nargs="+", choices=list(TARGETS))
    s = sub.add_parser("prepare", help="fetch or build the wheels into .whl/TARGET, then check the folder")
    s.add_argument("targets", nargs="+", choices=list(TARGETS))
    s.add_argument("--python", default=PYTHON, help=f"the Python the wheels are for (default {PYTHON}: the GPU "
                                                    "image's; "
                   "a CPU rehearsal on another Python needs its own folder)")
    s.add_argument("--dir", help="write DIR/TARGET instead of .whl/TARGET (e.g. a rehearsal's folder)")
    s = sub.add_parser("install", help="install one need's wheels under --site, then import it")
    s.add_argument("target", choices=list(TARGETS))
    s.add_argument("need")
    s.add_argument("--dir", required=True, help="the wheel folder (carried)")
    s.add_argument("--site", required=True, help="a folder to install into, one subfolder per need")
    args = p.parse_args(argv)
    if args.cmd == "install" and args.need not in TARGETS[args.target]:
        p.error(f"{args.target} has no need '{args.need}'; it has {', '.join(TARGETS[args.target])}")
    return {"plan": cmd_plan, "prepare": cmd_prepare, "install": cmd_install}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
