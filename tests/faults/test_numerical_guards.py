"""Injected NaN steps are skipped exactly and counted; too many in a row stop the run in one sentence."""

from __future__ import annotations

import json
import re
import types

import pytest
import torch

from faultkit import differences, overrides, run_to_end

from colodiffusion.config import load_config
from colodiffusion.storage import checkpoint
from colodiffusion.train.guards import NumericalGuard, TrainingDiverged


def _backend():
    return types.SimpleNamespace(device=torch.device("cpu"), world_size=1, scaler=None)


def _master_adamw(params, offload: bool):
    from colodiffusion.train.master_weights import MasterWeightOptimizer

    return MasterWeightOptimizer(params, lambda masters: torch.optim.AdamW(masters, lr=1e-2, fused=True),
                                 offload=offload, chunk_numel=16)  # several chunks: each must skip


@pytest.mark.parametrize("path", ["foreach", "fused", "fp32_masters", "fp32_masters_offload"])
@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_non_finite_gradient_skips_the_update_exactly(path, poison, tmp_path):
    """Every path: the host-checked one (foreach AdamW), the sync-free one (fused AdamW + found_inf) and
    bf16 weights with fp32 masters (the flag reaches the fused inner AdamW; the guard checks the model's
    gradients, which the masters only get inside step()). A NaN loss, or a NaN gradient behind a finite loss."""
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    guard = NumericalGuard(cfg, _backend())
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    x = torch.randn(16, 8)
    if path.startswith("fp32_masters"):
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
        opt = _master_adamw(model.parameters(), offload=path.endswith("offload"))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=path == "fused" or None)

    def step(bad: bool):
        loss = model(x).float().square().mean() * (float("nan") if bad and poison == "loss" else 1.0)
        loss.backward()
        if bad and poison == "grad":
            model.bias.grad[0] = float("nan")
        with guard.checking(opt, loss):
            opt.step()
        opt.zero_grad()

    def snapshot():
        masters = list(getattr(opt, "masters", []))
        states = [v for s in opt.state.values() for v in s.values()]
        return [t.detach().clone() for t in [*model.parameters(), *masters, *states]]

    step(False)
    before = snapshot()
    step(True)
    step(True)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))  # weights, masters, moments, step counts
    assert guard.check(3)["bad_steps"] == 2
    step(False)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # good steps still update
    assert all(torch.isfinite(t).all() for t in snapshot())
    assert guard.check(4)["bad_steps"] == 2


def test_an_empty_gradient_shard_is_no_error_and_a_nan_beside_it_still_counts(tmp_path):
    """Under FSDP2 a rank's shard of a (1, d) parameter (the tiny preset's pooled-caption position) is
    empty: it has no infinity norm, and torch._foreach_norm refuses it."""
    guard = NumericalGuard(load_config(None, [f"run.dir={tmp_path}"]), _backend())
    empty, full = torch.zeros(0, 8), torch.ones(3)
    assert not bool(guard._flag([empty, full]))
    full[1] = float("nan")
    assert bool(guard._flag([empty, full]))


@pytest.mark.slow
def test_nan_steps_are_skipped_counted_and_logged(new_run, report):
    from colodiffusion.train.loop import train

    run_dir = new_run()
    train(load_config(None, overrides(run_dir, "train.max_steps=4", "train.keep_checkpoints=3",
                                      "train.debug_nan_steps=[3,4]")))
    report["faults_injected"]["nan_step"] += 2
    root = run_dir / "checkpoints"
    diff = differences(root / "step_00000002", root / "step_00000004")
    # Steps 3-4 were skipped: weights, EMA and optimizer state are those of step 2.
    assert not any(k.startswith(("unet.", "opt.")) for k in diff), diff
    assert {"step", "loader", "lr"} <= set(diff)  # the data position and schedule moved on
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["bad_steps"] for m in logged] == [0, 0, 1, 2]


@pytest.mark.slow
def test_too_many_bad_steps_stop_in_one_sentence_with_good_checkpoint(new_run, report):
    run_dir = new_run()
    done = run_to_end(run_dir, "train.max_steps=12", "train.max_bad_steps=3", "train.debug_nan_steps=[3,4,5,6]")
    report["faults_injected"]["nan_step"] += 3
    assert done.returncode == 2, done.stdout[-1000:] + done.stderr[-1000:]
    err = re.findall(r"error: [^\r\n]*", done.stderr)  # it may follow a progress bar on its line
    assert len(err) == 1 and "Traceback" not in done.stderr
    assert "3 consecutive steps had a non-finite loss or gradient" in err[0]
    assert err[0].count(". ") == 0  # one sentence
    root = run_dir / "checkpoints"
    last = checkpoint.find_latest(root, log=lambda m: None)
    assert last.name == "step_00000004" and str(last) in err[0]
    assert not any(k.startswith("unet.") for k in differences(root / "step_00000002", last))


def test_guard_check_raises_past_the_limit(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "train.max_bad_steps=2"])
    guard = NumericalGuard(cfg, _backend())
    for bad in (True, False, True):  # a good step resets the run
        guard._record(torch.tensor(bad))
    guard.check(3)
    guard._record(torch.tensor(True))
    with pytest.raises(TrainingDiverged, match="2 consecutive steps"):
        guard.check(4)
