"""Two nodes for real, on one machine (issue 25 item 8): two torchrun agents meet over a loopback c10d
rendezvous (2 nodes x 2 processes, gloo) and train with HSDP (parallel.dp_replicate=2) to the same
losses as the same four processes on one node. Then one node's agent is killed mid-run: the other
agent restarts its workers (--max-restarts), the node's agent is started again, and the job continues
from its last checkpoint (train.resume=auto) to final weights equal to the uninterrupted run's.

docs/scaling.md ("Several nodes") gives the same commands."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from launch import env  # noqa: E402

pytestmark = pytest.mark.slow

TRAIN = ["-m", "colodiffusion", "train", "parallel.strategy=fsdp", "parallel.dp_replicate=2", "train.resume=auto",
         "train.batch_size=4", "data.num_samples=16", "train.sample_every=0", "train.log_every=1",
         "train.checkpoint_every=2", "train.warmup_steps=1", "train.max_steps=4"]
TIMEOUT = 2400  # four processes on a shared 2-core machine: minutes (24 under a load of 15), not seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent(run: Path, port: int, host: bool, log: Path, extra_env: dict | None = None) -> subprocess.Popen:
    """One node: `torchrun --nnodes 2 --nproc_per_node 2` joining the c10d rendezvous on 127.0.0.1:port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
           "--rdzv_backend", "c10d", "--rdzv_id", "two-nodes", "--rdzv_endpoint", f"127.0.0.1:{port}",
           "--rdzv_conf", f"is_host={str(host).lower()}", "--local_addr", "127.0.0.1", "--max_restarts", "1",
           *TRAIN, f"run.dir={run}"]
    # A node that comes back starts a new agent, which waits for the rendezvous store's address in the new
    # round; agents sharing their store with the workers (torch's default) publish it only in the first.
    shared_store_off = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen(cmd, env={**env(), **shared_store_off, **(extra_env or {})}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def final_unet(run: Path) -> dict:
    return load_file(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def wait(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    for proc, log in zip(procs, logs):
        try:
            assert proc.wait(timeout=TIMEOUT) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()


def test_two_nodes_train_like_one_and_survive_losing_a_node(tmp_path, tiny_components):
    one, two = tmp_path / "one-node", tmp_path / "two-nodes"
    for run in (one, two):  # the frozen parts, already trained: the runs differ only in how they are launched
        shutil.copytree(tiny_components, run / "components")

    log = tmp_path / "one.log"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                             *TRAIN, f"run.dir={one}"], env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait([proc], [log])

    # Two agents; the main rank stops for a while right after publishing the step-2 checkpoint, so that
    # the kill lands mid-run at a known place (storage/faults.py).
    port, mark = free_port(), tmp_path / "checkpointed"
    pause = {"COLODIFFUSION_FAULT_POINT": "published@2", "COLODIFFUSION_FAULT_MARK": str(mark),
             "COLODIFFUSION_FAULT_SLEEP": "600"}
    logs = [tmp_path / "node0.log", tmp_path / "node1.log", tmp_path / "node1-again.log"]
    node0 = agent(two, port, True, logs[0], pause)
    node1 = agent(two, port, False, logs[1], pause)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not mark.exists():
            assert node0.poll() is None and node1.poll() is None and time.monotonic() < deadline, \
                (logs[0].read_text() + logs[1].read_text())[-4000:]
            time.sleep(0.5)
        node1.send_signal(signal.SIGKILL)  # the node goes away: its agent, and with it its workers (lifeline.py)
        node1.wait(timeout=60)
        node1 = agent(two, port, False, logs[2])  # the node comes back and rejoins the job
        wait([node0, node1], [logs[0], logs[2]])
    finally:
        for p in (node0, node1):
            if p.poll() is None:
                p.kill()

    said = "".join(p.read_text() for p in logs)
    assert "resumed from" in said and "step_00000002 at step 2" in said
    assert losses(two) == pytest.approx(losses(one), rel=0, abs=0) and sorted(losses(one)) == [1, 2, 3, 4]
    a, b = final_unet(one), final_unet(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
