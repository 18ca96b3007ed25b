"""DeepSpeed ZeRO-1/2/3 and Colossal-AI's torch_ddp plugin under `torchrun --nproc_per_node 2` (gloo,
CPU) reproduce the single-process loss trajectory at the same global batch (tests/dist/harness.py),
gather full weights and EMA for export, and resume from their own checkpoints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

DIST = Path(__file__).parents[1] / "dist"
sys.path.insert(0, str(DIST))
import harness  # noqa: E402
from launch import torchrun  # noqa: E402

pytestmark = pytest.mark.slow
deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install "
                                                    "'colodiffusion[deepspeed]')")


def colossalai_missing() -> str:
    try:
        import colossalai.booster  # noqa: F401
    except Exception as exc:  # ImportError, or an incompatible torch
        return f"Colossal-AI does not import here ({type(exc).__name__}: {exc}); see docs/engines.md"
    return ""


def launch(out: Path, cases: dict[str, str]) -> None:
    proc = torchrun(2, [str(DIST / "harness.py"), str(out), ",".join(f"{n}:{s}" for n, s in cases.items())])
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    user_json = out / "ds_user.json"  # ZeRO-1 with optimizer offload, batch sizes left to us
    user_json.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {
        "stage": 1, "offload_optimizer": {"device": "cpu"}}}))
    # One launch per phase (imports dominate on a small CPU box); Colossal-AI joins where it imports.
    first = {"ds_zero2": f"parallel.strategy=deepspeed:parallel.zero=2:save={harness.SAVE_AT}",
             "ds_zero3": f"parallel.strategy=deepspeed:parallel.zero=3:save={harness.SAVE_AT}",
             "ds_user": f"parallel.strategy=deepspeed:parallel.deepspeed.config={user_json}"}
    saved = {n: out / (n + "_ckpt") / f"step_{harness.SAVE_AT:08d}" for n in ("ds_zero2", "ds_zero3")}
    second = {
        f"{n}_resumed": f"parallel.strategy=deepspeed:parallel.zero={z}:load={saved[n]}"
        for n, z in (("ds_zero2", 2), ("ds_zero3", 3))
    }
    if not colossalai_missing():
        first["cai"] = f"parallel.strategy=colossalai:parallel.colossalai.plugin=torch_ddp:save={harness.SAVE_AT}"
        second["cai_resumed"] = f"parallel.strategy=colossalai:load={out / 'cai_ckpt' / f'step_{harness.SAVE_AT:08d}'}"
    launch(out, first)
    launch(out, second)
    harness.run_case(out, "single:parallel.strategy=single")
    return out


def losses(out: Path, name: str) -> list[float]:
    return json.loads((out / f"{name}.json").read_text())["losses"]


def max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["ds_zero2", "ds_zero3", "ds_user"])
def test_deepspeed_matches_single_process(runs, name):
    ref = losses(runs, "single")
    assert len(ref) == harness.STEPS and ref[-1] < ref[0]
    assert max_rel(losses(runs, name), ref) <= 1e-4
    assert json.loads((runs / f"{name}.json").read_text())["dp_size"] == 2


@pytest.mark.parametrize("name", ["ds_zero2", "ds_zero3"])
def test_deepspeed_gathers_full_weights_and_ema(runs, name):
    harness.assert_gathered_matches(torch.load(runs / "single.pt"), torch.load(runs / f"{name}.pt"))


@pytest.mark.parametrize("name", ["ds_zero2", "ds_zero3"])
def test_deepspeed_resumes_from_its_own_checkpoint(runs, name):
    folder = runs / f"{name}_ckpt" / f"step_{harness.SAVE_AT:08d}"
    assert (folder / "ds" / "state").is_dir() and (folder / "manifest.json").is_file()
    cont = losses(runs, f"{name}_resumed")
    assert len(cont) == harness.STEPS - harness.SAVE_AT
    assert max_rel(cont, losses(runs, name)[harness.SAVE_AT:]) <= 1e-5
    ref, got = torch.load(runs / f"{name}.pt"), torch.load(runs / f"{name}_resumed.pt")
    for part in ("model", "ema"):  # the EMA came back from the checkpoint too
        assert all((got[part][k] - v).abs().max() < 1e-5 for k, v in ref[part].items()), part


def test_colossalai_torch_ddp_trains_and_resumes(runs):
    why = colossalai_missing()
    if why:
        pytest.skip(why)
    ref, cai = losses(runs, "single"), losses(runs, "cai")
    assert max_rel(cai, ref) <= 1e-4
    assert (runs / "cai_ckpt" / f"step_{harness.SAVE_AT:08d}" / "colossalai" / "model.safetensors").is_file()
    assert max_rel(losses(runs, "cai_resumed"), cai[harness.SAVE_AT:]) <= 1e-5


def test_deepspeed_zero3_lora_run_exports_from_its_partitions(tmp_path):
    """`colodiffusion export` consolidates a 2-rank ZeRO-3 checkpoint (fp32 partitions, one EMA partition
    per rank) on one process: the LoRA adapter file and the merged diffusers model are bitwise what the
    run wrote itself at its end (RUN/lora, RUN/final)."""
    from safetensors.torch import load_file

    from launch import python

    run = tmp_path / "run"
    tiny = ["first_stage.steps=2", "first_stage.scale_samples=16", "train.batch_size=8", "data.num_samples=64",
            "train.sample_every=0", "train.log_every=1", "train.warmup_steps=2", "train.max_steps=2"]
    proc = torchrun(2, ["-m", "colodiffusion", "train", f"run.dir={run}", "parallel.strategy=deepspeed",
                        "parallel.zero=3", "train.lora.rank=4", *tiny])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = run / "checkpoints" / "step_00000002"
    assert (ckpt / "ema_rank_1.safetensors").exists() and not (ckpt / "unet.safetensors").exists()
    for fmt in ("lora", "diffusers"):
        done = python(["-m", "colodiffusion", "export", str(ckpt), "--format", fmt, "--ema", "--merge-lora",
                       "--out", str(tmp_path / fmt)])
        assert done.returncode == 0, done.stderr[-4000:]
    for ours, theirs in (
        ("lora/pytorch_lora_weights.safetensors", "lora/pytorch_lora_weights.safetensors"),
        ("final/unet/diffusion_pytorch_model.safetensors", "diffusers/unet/diffusion_pytorch_model.safetensors"),
    ):
        a, b = load_file(str(run / ours)), load_file(str(tmp_path / theirs))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), ours
