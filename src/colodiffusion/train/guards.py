"""Numerical guards: a step with a non-finite loss or gradient changes nothing, is counted, and
too many in a row stop the run with one sentence.

How a bad step is skipped *exactly* (weights and optimizer moments/step counts bit-for-bit as
before) without a host sync per step:

- The train step calls the backend's step inside `with guard.checking(optimizer, loss):`, which
  puts a check in front of `optimizer.step()` for that call only. The backend's own step, a
  GradScaler or an engine (DeepSpeed, Colossal-AI) makes that call after its unscale, clip and
  reductions, so the check sees the gradients the update would apply. The check is the max-abs of
  every local gradient plus the loss, on the device; in distributed runs it is all-reduced through
  the backend so every rank skips the same steps (a NaN in one FSDP shard skips all ranks).
- Fused optimizers (AdamW `fused=True`, what CUDA runs use) take the flag as `found_inf`, the
  GradScaler's contract: the kernel leaves parameters and moments alone and undoes its step
  count increment. No host sync. The fp32-master optimizer (train/master_weights.py) hands the
  flag on to its fused inner AdamW; the flag is computed from the model's gradients, not from the
  masters' (which only get gradients inside its step).
- Other optimizers (the CPU foreach AdamW) read the flag on the host and do not call `step()`;
  on a CPU that sync costs nothing.

The learning-rate schedule, the data position and the EMA still advance on a skipped step (the
EMA averages the unchanged weights once more), as with PyTorch's GradScaler. Counters stay on
the device; they are read, and the `train.max_bad_steps` limit enforced, at the logging interval
and before each checkpoint (skipped steps do not change the weights, so a checkpoint written
during a short bad streak still holds good weights). They are saved in the checkpoint, so a
streak and the totals continue across a resume.

fp16: the GradScaler already skips overflowing steps and lowers its scale; those are counted as
`overflow_steps` but do not count toward the limit (overflow is how the scaler calibrates). A
non-finite *loss* does.
"""

from __future__ import annotations

import math
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from colodiffusion.config import ConfigError


class TrainingDiverged(ConfigError):
    """Too many consecutive non-finite steps: one sentence, exit code 2 in the CLI."""


def gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The gradients `optimizer.step()` is about to apply: the model's, also when the optimizer steps
    fp32 master copies (MasterWeightOptimizer.model_grads) whose own .grad is set only inside step()."""
    if hasattr(optimizer, "model_grads"):
        return optimizer.model_grads()
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2/TP DTensor grads: this rank's shard


class NumericalGuard:
    def __init__(self, cfg, backend):
        self.backend = backend
        self.max_bad_steps = cfg.train.max_bad_steps
        self.nan_steps = set(cfg.train.debug_nan_steps)
        self.fp16 = getattr(backend, "scaler", None) is not None
        self.checkpoints = Path(cfg.run.dir) / "checkpoints"
        zero = lambda: torch.zeros((), device=backend.device)  # noqa: E731
        self.bad_total, self.overflow_total, self.run, self.worst = zero(), zero(), zero(), zero()
        self._loss = None
        self._stepped = False

    # -- what the train step calls -----------------------------------------------------------------
    def inject(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Test hook (`train.debug_nan_steps`): the loss of step `step + 1` becomes NaN."""
        return loss * float("nan") if step + 1 in self.nan_steps else loss

    @contextmanager
    def checking(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> Iterator[None]:
        """Inside, `optimizer.step()` first checks `loss` and the gradients and skips the update if any
        is non-finite; the optimizer's own step is back in place on leaving."""
        self._loss, self._stepped = loss.detach(), False
        own = vars(optimizer).get("step")  # the LR scheduler's wrapper, if one is installed
        step = optimizer.step

        def guarded_step(_opt, *args, **kwargs):
            self._stepped = True
            bad = self._flag(gradients(optimizer))
            if optimizer.defaults.get("fused"):
                return self._fused_step(optimizer, step, bad, args, kwargs)
            self._record(bad)
            if bool(bad):  # host sync: only on the non-fused (CPU) path
                optimizer._opt_called = True  # (a skipped step still counts as one for the LR scheduler)
                return None
            return step(*args, **kwargs)

        optimizer.step = types.MethodType(guarded_step, optimizer)  # a bound method, as engines expect
        try:
            yield
        finally:
            if own is None:
                del optimizer.step
            else:
                optimizer.step = own
        if self.fp16 and not self._stepped:  # a GradScaler that found inf/NaN did not call the optimizer
            self.overflow_total += 1
            self._record(self._flag([]))  # only a non-finite loss counts toward the limit

    def _flag(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """True (a device bool) if the loss or any gradient is non-finite on any rank."""
        # An FSDP2 shard can be empty (a parameter whose first dimension is smaller than the rank count,
        # e.g. a (1, d) positional embedding): it has no infinity norm, and nothing to flag.
        grads = [t for t in map(_local, grads) if t.numel()]
        worst = torch.zeros((), device=self.backend.device)
        if grads and not self.fp16:  # fp16: the scaler judges the gradients
            worst = torch.stack([n.to(worst.device) for n in torch._foreach_norm(grads, math.inf)]).max()
        if self._loss is not None:
            worst = worst + self._loss.abs().to(worst.device)
        bad = (~torch.isfinite(worst)).float()
        if self.backend.world_size > 1:
            bad = self.backend.all_reduce_mean(bad)
        return bad > 0

    def _fused_step(self, optimizer, step, bad, args, kwargs):
        scaler_inf = getattr(optimizer, "found_inf", None)  # set by a GradScaler around this call
        skip = bad.float() if scaler_inf is None else torch.maximum(scaler_inf, bad.float())
        if scaler_inf is not None:
            self.overflow_total += (scaler_inf > 0).float() * (~bad).float()
        self._record(bad)
        optimizer.found_inf = skip
        try:
            return step(*args, **kwargs)
        finally:
            if scaler_inf is None:
                del optimizer.found_inf
            else:
                optimizer.found_inf = scaler_inf

    def _record(self, bad: torch.Tensor) -> None:
        b = bad.float()
        self.bad_total += b
        self.run = (self.run + 1) * b
        self.worst = torch.maximum(self.worst, self.run)

    # -- checkpoints: the counters continue across a resume -----------------------------------------
    def state_dict(self) -> dict:
        return {"bad_total": int(self.bad_total.item()), "overflow_total": int(self.overflow_total.item()),
                "run": int(self.run.item()), "worst": int(self.worst.item())}

    def load_state_dict(self, state: dict) -> None:
        for name in ("bad_total", "overflow_total", "run", "worst"):
            getattr(self, name).fill_(float(state.get(name, 0)))

    # -- read at the logging interval and before checkpoints --------------------------------------
    def check(self, step: int) -> dict:
        """Counters for the metrics; raises TrainingDiverged past `train.max_bad_steps` in a row."""
        worst = int(self.worst.item())
        if self.max_bad_steps and worst >= self.max_bad_steps:
            folders = sorted(p for p in self.checkpoints.glob("step_*") if p.is_dir())
            last = (f"the last checkpoint {folders[-1]} holds the last good weights" if folders
                    else "no checkpoint was written")
            raise TrainingDiverged(
                f"training stopped at step {step}: {worst} consecutive steps had a non-finite loss or gradient "
                f"(train.max_bad_steps={self.max_bad_steps}) and their updates were skipped, so {last}; "
                "lower train.lr, check the data, or use bf16 instead of fp16")
        self.worst = self.run.clone()
        out = {"bad_steps": int(self.bad_total.item())}
        if self.fp16:
            out["overflow_steps"] = int(self.overflow_total.item())
        return out
