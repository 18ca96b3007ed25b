"""Train the tiny UNet through a backend on the same global batches, for equivalence tests.

Why a harness and not the full loop: the loop draws caption dropout, VAE posterior samples, noise
and timesteps from per-data-parallel-rank generators (seeded with `dp_rank`, as it should), so one
process with batch 8 and two ranks with batch 4 each see different noise by design. To compare
the *parallel engines*, every step here builds one global batch (latents, text context, timesteps,
noise) from a seed that depends only on the step; each data-parallel rank takes its slice
`[dp_rank * B/dp : (dp_rank + 1) * B/dp]`, TP ranks take the same one. Everything else is the real
code: config, `build_backend`, `backend.prepare/autocast/backward/step`, the optimizer, the LR
schedule, the EMA, the objective's noising and the backend's checkpoints and full-weight gathering.

Usable in-process (single) or as a script under torchrun:
    torchrun --nproc_per_node 2 tests/dist/harness.py OUT_DIR case[,case...]
A case is `name:key=value:key=value` (config overrides); `save=K` writes a checkpoint after
step K to OUT_DIR/<name>_ckpt (and goes on); `load=FOLDER` starts from that checkpoint. Results: OUT_DIR/<name>.json (losses) and .pt (full
model and EMA weights gathered on rank 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from colodiffusion.config import load_config
from colodiffusion.diffusion import Objective, alphas_cumprod, build_noise_scheduler
from colodiffusion.models.presets import build_unet, get_preset
from colodiffusion.parallel import build_backend
from colodiffusion.storage import checkpoint
from colodiffusion.train.optim import EMA, build_lr_scheduler, build_optimizer

GLOBAL_BATCH = 8
STEPS = 12  # long enough to train visibly and for Adam to amplify a wrong shard; each step costs 2 processes
SAVE_AT = STEPS // 2  # where the checkpointing cases save, and resumed cases start


def make_cfg(overrides=()):
    return load_config(None, [f"train.batch_size={GLOBAL_BATCH}", "train.lr=2e-3", "train.warmup_steps=3",
                              f"train.max_steps={STEPS}", "train.grad_clip=1.0", "train.ema.decay=0.9", *overrides])


def global_batch(step: int):
    g = torch.Generator().manual_seed(10_000 + step)
    x0 = torch.randn(GLOBAL_BATCH, 4, 16, 16, generator=g)
    context = torch.randn(GLOBAL_BATCH, 24, 128, generator=g)
    t = torch.randint(0, 1000, (GLOBAL_BATCH,), generator=g)
    noise = torch.randn(GLOBAL_BATCH, 4, 16, 16, generator=g)
    return x0, context, t, noise


class Run:
    def __init__(self, cfg):
        self.cfg = cfg
        self.backend = b = build_backend(cfg)
        torch.manual_seed(0)
        unet = build_unet(get_preset("tiny"))
        self.model, self.opt = b.prepare(unet, lambda p: build_optimizer(p, cfg, b.device))
        self.sched = build_lr_scheduler(self.opt, cfg.train)
        self.ema = EMA(b.unwrap(self.model).named_parameters(), cfg.train.ema.decay, cfg.train.ema.warmup)
        self.objective = Objective(alphas_cumprod(build_noise_scheduler(cfg.diffusion, "epsilon")), "epsilon")
        self.step = 0

    def train(self, until: int) -> list[float]:
        b = self.backend
        per = GLOBAL_BATCH // b.dp_size
        rows = slice(b.dp_rank * per, (b.dp_rank + 1) * per)
        losses = []
        while self.step < until:
            x0, context, t, noise = (v[rows].to(b.device) for v in global_batch(self.step))
            x_t, target = self.objective.noisy(x0, t, noise)
            with b.autocast():
                pred = self.model(x_t, t, context).sample
            loss = F.mse_loss(pred.float(), target)
            b.backward(loss)
            b.step(self.model, self.opt, self.cfg.train.grad_clip)
            self.sched.step()
            self.step += 1
            self.ema.update(b.unwrap(self.model).parameters(), self.step)
            losses.append(b.all_reduce_mean(loss.detach()))
        return [float(v) for v in losses]

    def save(self, root: Path) -> Path:
        b = self.backend
        shared = {"step": self.step, "lr_scheduler": self.sched.state_dict()}
        return checkpoint.save(root, self.step, lambda folder: b.save(folder, self.model, self.opt, self.ema.state_dict(),
                                                                      shared, {"rank": b.rank}),
                               keep=2, is_main=b.is_main, barrier=b.barrier)

    def load(self, folder: Path) -> None:
        shared, _ = self.backend.load(folder, self.model, self.opt, self.ema.state_dict())
        self.step = int(shared["step"])
        self.sched.load_state_dict(shared["lr_scheduler"])

    def full_weights(self) -> tuple[dict, dict]:
        """(model, EMA) full weights on the main rank (collective)."""
        b = self.backend
        return b.full_state_dict(self.model), b.full_ema_state_dict(self.ema.state_dict())


def run_case(out: Path, spec: str) -> None:
    name, *pairs = spec.split(":")
    save_at = next((int(p.split("=")[1]) for p in pairs if p.startswith("save=")), None)
    load = next((p.split("=", 1)[1] for p in pairs if p.startswith("load=")), None)
    overrides = [p for p in pairs if not p.startswith(("save=", "load="))]
    run = Run(make_cfg(overrides))
    b = run.backend
    if load is not None:  # continue from a checkpoint folder (same world size), to step STEPS
        run.load(Path(load))
    losses = run.train(save_at or STEPS)
    if save_at is not None:
        run.save(out / f"{name}_ckpt")
        losses += run.train(STEPS)
    model_sd, ema_sd = run.full_weights()
    if b.is_main:
        (out / f"{name}.json").write_text(json.dumps({"losses": losses, "dp_size": b.dp_size, "world": b.world_size}))
        torch.save({"model": {k: v.cpu() for k, v in model_sd.items()}, "ema": ema_sd}, out / f"{name}.pt")
    b.barrier()
    return b


if __name__ == "__main__":
    from colodiffusion import lifeline

    if lifeline.launched():  # as the CLI does: a killed torchrun (e.g. a test timeout) takes us along
        lifeline.bind()
    out = Path(sys.argv[1])
    backend = None
    for spec in sys.argv[2].split(","):
        backend = run_case(out, spec)
    backend.shutdown()


def assert_gathered_matches(ref: dict, got: dict) -> None:
    """Full model and EMA weights gathered on rank 0 (`got`) match the single-process run's (`ref`),
    and the EMA is not the live weights. Adam turns 1e-7 gradient differences into ~1e-4 weight
    differences over the run; a wrongly gathered shard would be off by O(0.1)."""
    for part in ("model", "ema"):
        assert set(got[part]) == set(ref[part]) and got[part]
        for k, v in ref[part].items():
            assert got[part][k].shape == v.shape, k
            assert (got[part][k] - v).abs().max() < 2e-3, (part, k)
    assert any((got["ema"][k] - got["model"][k]).abs().max() > 1e-4 for k in got["ema"])
