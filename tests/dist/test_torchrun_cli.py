"""`torchrun --nproc_per_node 2 -m colodiffusion train` end to end (gloo, CPU): only rank 0 logs,
sharded checkpoints, full-weight export, export and sampling from the shards on one process, resume
on one process and the reverse (a single-process checkpoint under ddp/fsdp); failures name their rank."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from launch import python, torchrun  # noqa: E402

from common import run_cli  # noqa: E402  (in this process: no process group, as the docstrings below say)

pytestmark = pytest.mark.slow

TINY = ["first_stage.steps=2", "first_stage.scale_samples=16", "train.batch_size=8", "data.num_samples=64",
        "train.sample_every=0", "train.log_every=2", "train.checkpoint_every=2", "train.warmup_steps=2"]


def test_fsdp_run_under_torchrun_then_resume_on_one_process(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(2, ["-m", "colodiffusion", "train", f"run.dir={run}", "parallel.strategy=fsdp",
                        "train.max_steps=4", *TINY])
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert out.count("final model (EMA weights) written") == 1  # rank 0 only
    assert out.count("run folder:") == 1
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # one writer
    ckpt = run / "checkpoints" / "step_00000004"
    assert (ckpt / "dcp" / ".metadata").exists()
    assert (ckpt / "rank_0.pt").exists() and (ckpt / "rank_1.pt").exists()
    assert (run / "final" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    _exports_on_one_process(run, tmp_path)

    proc = run_cli("train", f"run.dir={run}", "parallel.strategy=single", "train.resume=auto", "train.max_steps=6",
                   *TINY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 6 and math.isfinite(last["loss"])


def _unet(folder: Path) -> dict:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def _exports_on_one_process(run: Path, tmp_path: Path) -> None:
    """`export` and `sample` read the DCP shards of the 2-rank checkpoint on one process (no process
    group): its EMA export is bitwise the final/ that the 2-rank run gathered itself."""
    from colodiffusion.models.loading import load_model

    ckpt = run / "checkpoints" / "step_00000004"
    for fmt, out in (("diffusers", tmp_path / "d"), ("single-file", tmp_path / "m.safetensors")):
        done = run_cli("export", ckpt, "--format", fmt, "--ema", "--out", out)
        assert done.returncode == 0, done.stderr[-4000:]
    final = _unet(run / "final")
    for got in (_unet(tmp_path / "d"), load_model(tmp_path / "m.safetensors").unet.state_dict()):
        assert final.keys() == got.keys() and all(torch.equal(final[k], got[k]) for k in final)
    done = run_cli("sample", ckpt, "--prompt", "a red circle", "--n-samples", "1", "--steps", "2",
                   "--out", tmp_path / "s")
    assert done.returncode == 0 and (tmp_path / "s" / "00000.png").exists(), done.stderr[-4000:]


def test_single_process_checkpoint_resumes_under_ddp_and_fsdp(tmp_path):
    """No export in between: ddp on one rank continues bit for bit as the single process would (same
    random streams), so weights and optimizer state crossed intact; fsdp on 2 ranks shards the same
    state and says, in one line, that its second rank starts fresh random streams."""
    base = tmp_path / "base"
    args = ["-m", "colodiffusion", "train", *TINY, "train.batch_size=4", "train.keep_checkpoints=3"]
    proc = python([*args, f"run.dir={base}", "train.max_steps=2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = {}
    for name in ("single", "ddp", "fsdp"):
        runs[name] = tmp_path / name
        shutil.copytree(base, runs[name])
    cont = ["train.max_steps=4", "train.resume=auto"]
    assert python([*args, f"run.dir={runs['single']}", *cont]).returncode == 0
    proc = torchrun(1, [*args, f"run.dir={runs['ddp']}", "parallel.strategy=ddp", *cont])
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-4000:]
    proc = torchrun(2, [*args, f"run.dir={runs['fsdp']}", "parallel.strategy=fsdp", *cont])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("was saved by 1 process(es), so ranks 1-1 start fresh random streams") == 1

    step4 = {n: r / "checkpoints" / "step_00000004" for n, r in runs.items()}
    ref = load_file(str(step4["single"] / "unet.safetensors"))
    from colodiffusion.storage import consolidated

    ddp = consolidated.read_model(step4["ddp"])
    assert ref.keys() == ddp.keys() and all(torch.equal(ref[k], ddp[k]) for k in ref)
    ddp_ema, ref_ema = consolidated.read_ema(step4["ddp"], {}), load_file(str(step4["single"] / "ema.safetensors"))
    assert all(torch.equal(ref_ema[k], ddp_ema[k]) for k in ref_ema)
    fsdp = consolidated.read_model(step4["fsdp"])
    assert fsdp.keys() == ref.keys() and all(torch.isfinite(v).all() for v in fsdp.values())


def test_every_rank_reports_its_failure(tmp_path):
    proc = torchrun(2, ["-m", "colodiffusion", "train", f"run.dir={tmp_path / 'bad'}", "parallel.strategy=fsdp",
                        "parallel.tp=3", "train.max_steps=1", *TINY], timeout=300)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"error (rank {rank}): dp_replicate (1) * tp (3) = 3 does not divide the world size (2)" in proc.stderr


def test_validation_loss_under_fsdp_matches_one_process(tmp_path):
    """Ranks split the held-out rows (padded so every rank runs the same forwards) and all-reduce: the same
    weights (the seeded init; a learning rate of 1e-12 leaves it) give the same number on 2 ranks as on 1."""
    val = ["data.val_fraction=0.1", "train.val_every=2", "train.max_steps=2", "train.checkpoint_every=0",
           "train.lr=1e-12"]
    import shutil

    runs = {}
    for name, launch in (("fsdp", lambda args: torchrun(2, args)), ("single", python)):
        run = tmp_path / name
        if name == "single":  # the same frozen parts (the tiny tokenizer's BPE training is not reproducible)
            shutil.copytree(tmp_path / "fsdp" / "components", run / "components")
        proc = launch(["-m", "colodiffusion", "train", f"run.dir={run}", f"parallel.strategy={name}", *TINY, *val])
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                      if "val_loss" in line]
    assert [r["step"] for r in runs["fsdp"]] == [2]  # one writer
    assert runs["fsdp"][0]["val_loss"] == pytest.approx(runs["single"][0]["val_loss"], rel=1e-5)
