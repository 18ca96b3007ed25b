"""DDP, FSDP2 (ZeRO-2/3) and tensor parallelism under `torchrun --nproc_per_node 2` (gloo, CPU)
reproduce the single-process loss trajectory at the same global batch; a sharded checkpoint written
by 2 ranks resumes on 1 rank and continues the same trajectory.

All parallel cases run in ONE torchrun launch (imports dominate on a small CPU box); see
`harness.py` for why the batches and noise are fed identically rather than drawn by the loop.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402
from launch import torchrun  # noqa: E402

pytestmark = pytest.mark.slow

CASES = {
    "ddp": "parallel.strategy=ddp",
    "fsdp_zero2": "parallel.strategy=fsdp:parallel.zero=2",
    # also writes a synchronous sharded checkpoint halfway
    "fsdp_zero3": f"parallel.strategy=fsdp:parallel.zero=3:save={harness.SAVE_AT}",
    # TP only (dp size 1: both ranks take the whole batch); an asynchronous checkpoint halfway
    "tp2": f"parallel.strategy=fsdp:parallel.tp=2:parallel.async_checkpoint=true:save={harness.SAVE_AT}",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    specs = ",".join(f"{name}:{spec}" for name, spec in CASES.items())
    proc = torchrun(2, [str(HERE / "harness.py"), str(out), specs])
    assert proc.returncode == 0, proc.stderr[-4000:]
    harness.run_case(out, "single:parallel.strategy=single")
    return out


def losses(out: Path, name: str) -> list[float]:
    return json.loads((out / f"{name}.json").read_text())["losses"]


def max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


@pytest.mark.parametrize("name, tol", [("ddp", 1e-5), ("fsdp_zero2", 1e-5), ("fsdp_zero3", 1e-5), ("tp2", 1e-4)])
def test_parallel_matches_single_process(runs, name, tol):
    ref = losses(runs, "single")
    assert len(ref) == harness.STEPS
    assert ref[-1] < ref[0]  # it trains at all
    assert max_rel(losses(runs, name), ref) <= tol
    dp = json.loads((runs / f"{name}.json").read_text())["dp_size"]
    assert dp == (1 if name == "tp2" else 2)


@pytest.mark.parametrize("name", ["ddp", "fsdp_zero3", "tp2"])
def test_full_weights_and_ema_gather_on_rank0(runs, name):
    """Export gathers full (unsharded) model and EMA weights; they match the single-process run's."""
    harness.assert_gathered_matches(torch.load(runs / "single.pt"), torch.load(runs / f"{name}.pt"))


def resume_on_one_rank(runs: Path, ckpt: str, strategy: str) -> list[float]:
    folder = runs / ckpt / f"step_{harness.SAVE_AT:08d}"
    assert (folder / "dcp" / ".metadata").exists() and (folder / "rank_1.pt").exists()
    run = harness.Run(harness.make_cfg([f"parallel.strategy={strategy}"]))
    try:
        run.load(folder)
        assert run.step == harness.SAVE_AT
        return run.train(harness.STEPS)
    finally:
        run.backend.shutdown()


def test_fsdp_checkpoint_from_two_ranks_resumes_single_process(runs):
    cont = resume_on_one_rank(runs, "fsdp_zero3_ckpt", "single")
    assert max_rel(cont, losses(runs, "fsdp_zero3")[harness.SAVE_AT:]) <= 1e-5
    assert max_rel(cont, losses(runs, "single")[harness.SAVE_AT:]) <= 1e-5


def test_async_tp_checkpoint_resumes_on_ddp_with_one_rank(runs):
    cont = resume_on_one_rank(runs, "tp2_ckpt", "ddp")
    assert max_rel(cont, losses(runs, "tp2")[harness.SAVE_AT:]) <= 1e-4
    assert max_rel(cont, losses(runs, "single")[harness.SAVE_AT:]) <= 1e-4
