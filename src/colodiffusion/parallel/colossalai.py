"""Colossal-AI's Booster behind the backend interface, with the original project's plugins:

- `torch_ddp`: PyTorch DDP through the Booster (CPU or GPU); precision by the Booster's torch AMP.
- `low_level_zero`: ZeRO-1/2 (`parallel.zero`), optimizer offload with `parallel.offload=cpu`.
- `gemini`: chunked ZeRO-3 with a placement policy: the original project's `cuda`, `cpu`, `auto`, or `static`
  fractions. Its optimizer must be Colossal-AI's own (GeminiOptimizer accepts only HybridAdam and
  its kin), so the trainer's AdamW settings are handed to HybridAdam, whose kernels Colossal-AI
  compiles on first use (nvcc and ninja needed).

The last two are Colossal-AI's CUDA-only code paths; asking for them without a GPU is one sentence.
Colossal-AI pins torch<=2.5.1, so it is installed without its dependencies (see docs/engines.md) and
imported only here. Checkpoints use the Booster's checkpoint I/O in `<checkpoint>/colossalai/`, plus
our `state.pt`, `rank_<r>.pt` and the EMA (full weights on every rank, except under gemini: there the
parameters live in chunks, so the EMA is refused with a sentence).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch

from colodiffusion.config import ColossalAIOptions, Config, ConfigError
from colodiffusion.parallel.distributed import DistributedBackend, clip_grad_norm
from colodiffusion.storage import checkpoint, safe_load

INSTALL = ("pip install 'colodiffusion[colossalai]' && pip install --no-deps colossalai==0.5.0 "
           "(without --no-deps its pins would downgrade torch to 2.5.1)")
# The original project's (pre-0.3 Gemini) placement policies as today's static fractions (GeminiPlugin's docstring).
PLACEMENTS = {"cuda": {"shard_param_frac": 1.0, "offload_optim_frac": 0.0, "offload_param_frac": 0.0},
              "cpu": {"shard_param_frac": 1.0, "offload_optim_frac": 1.0, "offload_param_frac": 1.0}}


def gemini_placement(p: ColossalAIOptions) -> dict:
    """GeminiPlugin's placement arguments for `parallel.colossalai.placement_policy` (and the static fractions)."""
    if p.placement_policy == "auto":
        return {"placement_policy": "auto"}
    fractions = PLACEMENTS.get(p.placement_policy) or {
        "shard_param_frac": p.shard_param_frac, "offload_optim_frac": p.offload_optim_frac,
        "offload_param_frac": p.offload_param_frac}
    return {"placement_policy": "static", **fractions}


def import_booster():
    try:
        from colossalai.booster import Booster
        from colossalai.booster import plugin
    except ImportError as exc:
        raise ConfigError(f"parallel.strategy=colossalai needs Colossal-AI, which is not installed or does not import "
                          f"({exc}): {INSTALL}.") from None
    return Booster, plugin


def hybrid_adam():
    """Colossal-AI's HybridAdam class, its kernels compiled (or loaded from Colossal-AI's cache) now."""
    from colossalai.kernel.kernel_loader import CPUAdamLoader, FusedOptimizerLoader
    from colossalai.nn.optimizer import HybridAdam

    try:
        CPUAdamLoader().load()
        FusedOptimizerLoader().load()
    except Exception as exc:  # a failed nvcc/ninja build raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("parallel.colossalai.plugin=gemini needs Colossal-AI's HybridAdam kernels, which did not "
                          f"build ({first}); they compile on first use with nvcc of torch's CUDA major version and "
                          "ninja (docs/engines.md), or use parallel.colossalai.plugin=low_level_zero.") from exc
    return HybridAdam


class ColossalAIBackend(DistributedBackend):
    name = "colossalai"

    # Config-only refusals are config/validation.py's; CUDA-only plugins: check_devices.
    def __init__(self, cfg: Config):
        self.Booster, self.plugins = import_booster()
        super().__init__(cfg)
        self.scaler = None  # the Booster (torch AMP) or the ZeRO plugin scales fp16 losses
        self.booster = self.Booster(**self.booster_kwargs())
        self.wrapped_optimizer = None

    def booster_kwargs(self) -> dict:
        p, prec, clip = self.cfg.parallel, self.cfg.precision, self.cfg.train.grad_clip
        if p.colossalai.plugin == "torch_ddp":
            return {"plugin": self.plugins.TorchDDPPlugin(),
                    "mixed_precision": None if prec == "fp32" else prec}
        if p.colossalai.plugin == "low_level_zero":
            return {"plugin": self.plugins.LowLevelZeroPlugin(stage=p.zero, precision=prec, max_norm=clip,
                                                               cpu_offload=p.offload == "cpu")}
        return {"plugin": self.plugins.GeminiPlugin(**gemini_placement(p.colossalai), precision=prec, max_norm=clip)}

    # -- model ----------------------------------------------------------------------------------
    def _wrap(self, model: torch.nn.Module, make_optimizer):
        params = [q for q in model.parameters() if q.requires_grad]
        if self.cfg.parallel.colossalai.plugin == "gemini":
            optimizer = make_optimizer(params, adamw=hybrid_adam())
        else:
            optimizer = make_optimizer(params)
        boosted, self.wrapped_optimizer, *_ = self.booster.boost(model, optimizer)
        # The loop's LR schedule and guard act on the optimizer inside the Booster's wrapper.
        return boosted, optimizer

    def unwrap(self, model):
        return model.unwrap() if hasattr(model, "unwrap") else model

    def autocast(self):
        return contextlib.nullcontext()  # the Booster (torch AMP) or the ZeRO plugin casts

    def backward(self, loss: torch.Tensor) -> None:
        self.booster.backward(loss, self.wrapped_optimizer)

    def step(self, model, optimizer, grad_clip: float) -> torch.Tensor:
        opt = self.wrapped_optimizer
        if self.cfg.parallel.colossalai.plugin == "torch_ddp":
            if self.precision == "fp16":  # torch AMP's scaler: clip the true gradients
                opt.unscale_grad()
            norm = clip_grad_norm(list(self.unwrap(model).parameters()), grad_clip)
        else:  # the ZeRO plugins clip inside their step (max_norm) and do not hand the norm out
            norm = torch.tensor(float("nan"), device=self.device)
        opt.step()
        opt.zero_grad()
        return norm

    # -- checkpoints ----------------------------------------------------------------------------
    reads = ("colossalai",)

    def _saved_by(self) -> dict:
        return {**super()._saved_by(), "plugin": self.cfg.parallel.colossalai.plugin}

    def _check_saved_by(self, saved_by: dict) -> None:
        if saved_by.get("plugin") != self.cfg.parallel.colossalai.plugin:
            raise ValueError(f"it was written by the {saved_by.get('plugin')} plugin; resume with "
                             f"parallel.colossalai.plugin={saved_by.get('plugin')}")

    def _save_weights(self, folder: Path, model, optimizer, ema: Optional[dict]):
        io = folder / "colossalai"
        if self.is_main:
            io.mkdir()
        self.barrier()
        self.booster.save_model(model, str(io / "model.safetensors"), shard=False, use_safetensors=True)
        self.booster.save_optimizer(
            self.wrapped_optimizer, str(io / self.optimizer_name()), shard=self.sharded_optimizer
        )
        if self.is_main and ema is not None:
            checkpoint.save_tensors(folder / "ema.safetensors", ema)
        return None, {}

    @property
    def sharded_optimizer(self) -> bool:
        # torch_ddp: every rank holds the whole AdamW state, so one file (Colossal-AI's sharded
        # loader also synchronizes a device, which its CPU accelerator refuses)
        return self.cfg.parallel.colossalai.plugin != "torch_ddp"

    def optimizer_name(self) -> str:
        return "optimizer" if self.sharded_optimizer else "optimizer.bin"

    def _load_weights(self, folder: Path, kind: str, shared: dict, model, optimizer, ema: Optional[dict]) -> bool:
        io = folder / "colossalai"
        try:  # every torch.load inside the Booster's checkpoint I/O runs with weights_only=True
            with safe_load.weights_only():
                self.booster.load_model(model, str(io / "model.safetensors"))
                self.booster.load_optimizer(self.wrapped_optimizer, str(io / self.optimizer_name()))
        except Exception as exc:
            raise safe_load.refused(io, exc) from None
        return self._restore_ema(folder / "ema.safetensors", model, ema)

    # -- export ---------------------------------------------------------------------------------
    def full_state_dict(self, model, optimizer=None) -> dict[str, torch.Tensor]:
        if self.cfg.parallel.colossalai.plugin == "gemini":  # gathers the chunks (collective)
            state = model.state_dict(only_rank_0=True)
        else:
            state = self.unwrap(model).state_dict()
        return {k: v.detach().float().cpu() for k, v in state.items()} if self.is_main else {}

    def full_ema_state_dict(self, ema: dict) -> dict[str, torch.Tensor]:
        return ema
