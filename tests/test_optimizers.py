"""train.lr_schedule from diffusers' get_scheduler (with warmup) and train.optimizer lion / adafactor /
prodigy from the libraries that have them, each trained (and resumed) on the tiny model."""

import json
import math
import sys

import pytest
import torch

from colodiffusion.config import ConfigError, load_config
from colodiffusion.train import loop
from colodiffusion.train.optim import build_lr_scheduler, build_optimizer

from common import TINY


def lrs(*overrides, steps=10):
    cfg = load_config(None, ["train.lr=1.0", "train.max_steps=10", "train.warmup_steps=2", *overrides])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = build_lr_scheduler(opt, cfg.train)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_diffusers_schedules_warm_up_then_take_their_shape():
    linear = lrs("train.lr_schedule=linear")
    assert linear[:3] == [0.0, 0.5, 1.0] and linear[-1] == pytest.approx(1 / 8)  # to 0 at step 10
    assert lrs("train.lr_schedule=constant_with_warmup")[2:] == [1.0] * 8
    restarts = lrs("train.lr_schedule=cosine_with_restarts", "train.lr_num_cycles=2")
    assert restarts[2] == 1.0 and restarts[6] == pytest.approx(1.0)  # back at the peak halfway: a restart
    poly = lrs("train.lr_schedule=polynomial", "train.lr_power=2.0")
    assert poly[6] == pytest.approx((1 - 1e-7) * (1 - 4 / 8) ** 2 + 1e-7)
    ours = lrs("train.lr_schedule=cosine")  # our own cosine is unchanged: the first step already trains
    assert ours[0] == 0.5 and ours[1] == 1.0 and ours[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_a_missing_optimizer_package_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    cfg = load_config(None, ["train.optimizer=lion"])
    with pytest.raises(ConfigError, match=r"train.optimizer=lion needs the optional package 'lion-pytorch': "
                                          r"pip install 'colodiffusion\[optim\]'"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="does not combine with train.optimizer=lion"):
        load_config(None, ["train.optimizer=lion", "perf.optimizer=adamw8bit"])


# optimizer -> (package, learning rate, test that a saved param group is that optimizer's)
OPTIMIZERS = {
    "lion": ("lion_pytorch", "1e-4", lambda g: set(g) - {"params", "lr", "initial_lr"} == {"betas", "weight_decay"}),
    "adafactor": ("transformers", "1e-3", lambda g: "relative_step" in g),
    "prodigy": ("prodigyopt", "1.0", lambda g: "d0" in g),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_trains_and_resumes_the_tiny_model(run_dir, name):
    package, lr, is_it = OPTIMIZERS[name]
    pytest.importorskip(package)
    common = [*TINY, f"run.dir={run_dir}", f"train.optimizer={name}", f"train.lr={lr}", "train.checkpoint_every=1",
              "train.lr_schedule=linear"]
    loop.train(load_config(None, [*common, "train.max_steps=2"]))
    state = torch.load(run_dir / "checkpoints/step_00000002/state.pt", weights_only=True)
    assert is_it(state["optimizer"]["param_groups"][0])  # that library's optimizer ran (AdamW's has eps, amsgrad, ...)
    loop.train(load_config(None, [*common, "train.max_steps=3", "train.resume=auto"]))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(math.isfinite(m["loss"]) for m in metrics)


def test_adamw_keeps_its_own_kernel_when_a_checkpoint_of_another_loads():
    """A checkpoint's param groups name the kernel of the run that saved it (foreach from an FSDP run on
    the host); a fused AdamW that loads one stays fused, so the numerical guard's found_inf still works
    (it failed with "Expected grad_scale and found_inf to be None" before)."""
    from colodiffusion.train.optim import make_adamw

    cfg = load_config(None, [])
    weights = [torch.nn.Parameter(torch.ones(4))]
    saved = torch.optim.AdamW([torch.nn.Parameter(torch.ones(4))], foreach=True)
    saved.param_groups[0]["params"][0].grad = torch.ones(4)
    saved.step()
    fused = make_adamw(weights, cfg, torch.device("cpu"))
    assert fused.defaults["fused"]
    fused.load_state_dict(saved.state_dict())
    assert fused.param_groups[0]["fused"] and not fused.param_groups[0]["foreach"]
    weights[0].grad = torch.ones(4)
    before = weights[0].detach().clone()
    fused.found_inf = torch.ones(())  # what the guard hands a fused optimizer on a bad step
    fused.step()
    assert torch.equal(weights[0], before)  # skipped by the kernel
    del fused.found_inf
    fused.step()
    assert not torch.equal(weights[0], before)
