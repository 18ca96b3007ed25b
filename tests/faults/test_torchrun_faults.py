"""The kill/resume contract under `torchrun --nproc_per_node 2` (gloo, CPU) for ddp and fsdp:
SIGKILL of the whole job at 3 random moments, `train.resume=auto` each time, and the final
weights equal an uninterrupted torchrun run's bit for bit. Also: no worker outlives a killed
launcher (torchrun or `main.py`), and a frozen rank makes the others stop within
parallel.timeout_s with an error naming it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import procs
from faultkit import env, metrics, overrides, start_job, stop_job, wait_for_step, workers

STEPS = 12
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _cmd(run_dir, strategy, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "colodiffusion", "train", *overrides(run_dir, f"parallel.strategy={strategy}",
                                                         f"train.max_steps={STEPS}", "train.resume=auto", *extra)]


def _final(run_dir):
    return load_file(str(run_dir / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_sigkill_three_times_then_bitwise_equal(strategy, new_run, report):
    ref = new_run("reference")
    done = subprocess.run(_cmd(ref, strategy), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    run_dir = new_run("killed")
    rng = random.Random(3)
    for _ in range(3):
        proc, launch_id = start_job(_cmd(run_dir, strategy), run_dir.parent / "killed.log")
        try:
            wait_for_step(proc, run_dir, after=len(metrics(run_dir)))
            time.sleep(rng.uniform(0.0, 0.6))
            os.killpg(proc.pid, signal.SIGKILL)  # the agent; its workers (own sessions) follow it (lifeline.py)
            proc.wait(60)
            # The next run must not share the run folder with the last one's workers.
            left = procs.wait_gone(procs.LAUNCH, launch_id, timeout=30)
            assert not left, f"workers outlived the killed torchrun: {procs.describe(left)}"
        finally:
            stop_job(proc, launch_id)
        report["faults_injected"][f"sigkill_torchrun_{strategy}"] += 1
        report["kills_survived"] += 1
    done = subprocess.run(_cmd(run_dir, strategy), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = _final(run_dir), _final(ref)
    lost = [k for k in b if not torch.equal(a[k], b[k])]
    report["lost"] += [f"torchrun {strategy}: {k}" for k in lost]
    assert not lost, lost[:5]


@pytest.mark.parametrize("launcher", ["torchrun", "main.py"])
def test_workers_exit_when_their_launcher_is_sigkilled(launcher, new_run):
    """SIGKILL of the launcher alone (not its group, not the workers, which torchrun starts in sessions
    of their own): within 30 s no process of the job is left, where before they trained on for ever."""
    run_dir = new_run("orphans")
    extra = ("train.max_steps=100000", "train.checkpoint_every=0")
    cmd = (
        _cmd(run_dir, "ddp", *extra)
        if launcher == "torchrun"
        else [
            sys.executable,
            str(ROOT / "main.py"),
            "-t",
            *overrides(run_dir, "parallel.strategy=ddp", "trainer.devices=2", *extra),
        ]
    )
    proc, launch_id = start_job(cmd, run_dir.parent / "orphans.log")
    try:
        wait_for_step(proc, run_dir)
        assert sorted(workers(launch_id, proc)) == [0, 1]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
        left = procs.wait_gone(procs.LAUNCH, launch_id, timeout=30)
        assert not left, f"alive 30 s after their launcher was killed: {procs.describe(left)}"
    finally:
        stop_job(proc, launch_id)


def test_a_frozen_rank_is_named_and_the_others_stop(new_run):
    """Rank 1 frozen (SIGSTOP) mid-training: rank 0's collective gives up after parallel.timeout_s and
    it exits with one sentence naming rank 1, instead of waiting for ever."""
    run_dir = new_run("frozen")
    log = run_dir.parent / "frozen.log"
    cmd = _cmd(run_dir, "ddp", "train.max_steps=100000", "train.checkpoint_every=0", "parallel.timeout_s=5")
    proc, launch_id = start_job(cmd, log)
    try:
        wait_for_step(proc, run_dir)
        ranks = workers(launch_id, proc)
        os.kill(ranks[1], signal.SIGSTOP)
        end = time.monotonic() + 120  # timeout_s, the heartbeat check (2 beats), exit: well under this
        while procs.carries(ranks[0], procs.LAUNCH, launch_id) and time.monotonic() < end:
            time.sleep(0.2)
        out = log.read_text()
        assert not procs.carries(ranks[0], procs.LAUNCH, launch_id), "rank 0 still waits on its frozen peer"
        # The error that ended the run, not one from a shutdown that waited on the frozen rank again.
        assert "error (rank 0): CollectiveError: rank 1 stopped answering" in out, out[-3000:]
        assert "parallel.timeout_s=5 s" in out
    finally:
        stop_job(proc, launch_id)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_a_write_failure_on_one_rank_stops_every_rank_with_one_sentence(strategy, new_run, report):
    """Only rank 1 gets a 1 MB file-size limit (limited_rank.py): its shard write fails (EFBIG) while rank 0's
    succeeds. Every rank must say so in one sentence and exit 2; none may wait forever in a barrier."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    run_dir = new_run()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(os.path.dirname(__file__), "limited_rank.py"), "train",
           *overrides(run_dir, f"parallel.strategy={strategy}", "parallel.zero=2", "train.max_steps=4")]
    proc = subprocess.run(cmd, env=env(LIMIT_RANKS="1", LIMIT_BYTES="1000000"), capture_output=True, text=True,
                          timeout=400)
    report["faults_injected"]["write_limit"] += 1
    for rank in (0, 1):
        lines = [
            ln for ln in proc.stderr.splitlines() if f"error (rank {rank}): could not write checkpoint step 2" in ln
        ]
        assert len(lines) == 1, proc.stderr[-4000:]
    assert proc.returncode != 0
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(("step_", ".tmp-"))]
