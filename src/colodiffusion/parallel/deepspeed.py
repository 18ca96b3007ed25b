"""DeepSpeed ZeRO (stage 1/2/3, optimizer/parameter offload, fp16/bf16) behind the backend interface.

The engine is built from our config (`ds_config`), or from a user's DeepSpeed JSON
(`parallel.deepspeed.config`) checked against it. The trainer's AdamW (torch's, no compiled op) and
LR schedule are handed to the engine; accumulation, clipping and loss scaling are DeepSpeed's:
`backward` calls `engine.backward` then `engine.step` on every micro-batch but the last, so the
engine reduces gradients only at the accumulation boundary. Checkpoints are DeepSpeed's own
`save_checkpoint` in `<checkpoint>/ds/` plus our `state.pt` (step, schedule, data position),
`rank_<r>.pt` (RNG streams) and the EMA. DeepSpeed reads its files with
`torch.load(weights_only=False)`; we run its loader with every `torch.load` forced to weights_only
and only the few DeepSpeed classes its files hold allowed (`storage/safe_load.py`).

EMA: with ZeRO-1/2 every rank holds the full weights, so the EMA is the full model's (saved once);
with ZeRO-3 each rank keeps the EMA of its own fp32 partition (saved per rank) and export gathers it.
DeepSpeed is imported only here (`pip install colodiffusion[deepspeed]`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from colodiffusion.config import Config, ConfigError
from colodiffusion.parallel.distributed import DistributedBackend
from colodiffusion.storage import checkpoint, safe_load
from colodiffusion.storage.files import loads_json

INSTALL = "pip install 'colodiffusion[deepspeed]' (or: DS_BUILD_OPS=0 pip install deepspeed)"
TAG = safe_load.DEEPSPEED_TAG  # DeepSpeed's checkpoint tag inside <checkpoint>/ds/


def import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # gloo on CPU, no compiled ops
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(f"parallel.strategy=deepspeed needs DeepSpeed, which is not installed: {INSTALL}.") from None
    return deepspeed


def ds_config(cfg: Config, dp_size: int, on_cuda: bool) -> dict:
    """The DeepSpeed JSON equivalent of our config (batch sizes, ZeRO, offload, precision, clipping)."""
    t, p = cfg.train, cfg.parallel
    zero: dict = {"stage": p.zero}
    if p.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if p.deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    return {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // dp_size // t.grad_accum,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        # torch's AdamW on offloaded partitions instead of DeepSpeedCPUAdam (a compiled op)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def user_ds_config(cfg: Config, ours: dict) -> dict:
    """A user's DeepSpeed JSON over ours: its sections win, but batch sizes must agree with train.*
    (our loader and LR schedule depend on them) and its precision with `precision`."""
    path = Path(cfg.parallel.deepspeed.config)
    try:
        theirs = loads_json(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"parallel.deepspeed.config '{path}' is not a readable JSON file ({exc}).") from None
    if not isinstance(theirs, dict):
        raise ConfigError(f"parallel.deepspeed.config '{path}' must hold a JSON object.")
    for key in ("optimizer", "scheduler"):
        if key in theirs:
            raise ConfigError(f"parallel.deepspeed.config '{path}' has an '{key}' section; remove it: the trainer "
                              "builds AdamW and its LR schedule from train.* (lr, adam_beta*, weight_decay, "
                              "warmup_steps).")
    for key in _BATCH_KEYS:
        if key in theirs and theirs[key] != "auto" and theirs[key] != ours[key]:
            raise ConfigError(
                f"parallel.deepspeed.config '{path}' sets {key}={theirs[key]}, but train.batch_size / grad_accum and "
                f"the number of processes give {ours[key]}; change the JSON, set it to \"auto\", or change train.*.")
    for mode in ("fp16", "bf16"):
        enabled = bool(theirs.get(mode, {}).get("enabled", False)) if isinstance(theirs.get(mode), dict) else False
        if mode in theirs and enabled != (cfg.precision == mode):
            raise ConfigError(f"parallel.deepspeed.config '{path}' has {mode}.enabled={str(enabled).lower()} but "
                              f"precision={cfg.precision}; make them agree.")
    merged = {**ours, **{k: v for k, v in theirs.items() if v != "auto"}}
    if "zero_optimization" in theirs:
        merged["zero_optimization"] = {**ours["zero_optimization"], **theirs["zero_optimization"]}
    return merged


class _Partitions:
    """ZeRO-3 view for the EMA: each trainable parameter's local fp32 partition, by name."""

    def __init__(self, module: torch.nn.Module, local_fp32):
        self.module, self.local_fp32 = module, local_fp32

    def named_parameters(self):
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                yield name, self.local_fp32(p)

    def parameters(self):
        return (t for _, t in self.named_parameters())


@contextlib.contextmanager
def _write_errors_after(engine):
    """Collect the errors of DeepSpeed's file writes (a full disk) instead of raising them inside
    `save_checkpoint`: a rank raising there would skip DeepSpeed's barriers while the other ranks wait
    in them forever. Raised after it returns, they reach `storage.checkpoint.save`, which stops every
    rank with one sentence."""
    errors: list[Exception] = []

    def deferred(write):
        def call(*args, **kwargs):
            try:
                return write(*args, **kwargs)
            except Exception as exc:  # OSError, torch.save's RuntimeError
                errors.append(exc)
        return call

    io, script = engine.checkpoint_engine, engine._copy_recovery_script  # all its writes go through these
    io.save, engine._copy_recovery_script = deferred(io.save), deferred(script)
    try:
        yield errors
    finally:
        del io.save, engine._copy_recovery_script  # the class's methods again


class DeepSpeedBackend(DistributedBackend):
    name = "deepspeed"

    def __init__(self, cfg: Config):  # (its config-only refusals are config/validation.py's, at load)
        self.ds = import_deepspeed()
        super().__init__(cfg)
        for key, value in (("LOCAL_RANK", 0), ("RANK", 0), ("WORLD_SIZE", 1)):
            os.environ.setdefault(key, str(value))  # a plain one-process run: DeepSpeed reads them
        self.scaler = None  # DeepSpeed scales fp16 losses itself
        self.ds.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        self.engine = None

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage()

    # -- model ----------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        ours = ds_config(self.cfg, self.dp_size, self.device.type == "cuda")
        return user_ds_config(self.cfg, ours) if self.cfg.parallel.deepspeed.config else ours

    def _wrap(self, model: torch.nn.Module, make_optimizer):
        optimizer = make_optimizer([q for q in model.parameters() if q.requires_grad])
        config = self.config_dict()
        if self.is_main and self.cfg.parallel.deepspeed.config:
            print(f"deepspeed: using {self.cfg.parallel.deepspeed.config} over the built config "
                  f"(ZeRO stage {config['zero_optimization'].get('stage')})")
        self.engine, _, _, _ = self.ds.initialize(model=model, optimizer=optimizer, config=config,
                                                  dist_init_required=False)
        # The loop's LR schedule and guard act on the torch AdamW that the ZeRO optimizer drives.
        return self.engine, optimizer

    def unwrap(self, model):
        module = model.module if model is self.engine else model
        if self.engine is not None and self.zero_stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param

            return _Partitions(module, safe_get_local_fp32_param)
        return module

    def autocast(self):
        # fp16/bf16: DeepSpeed casts the weights; autocast casts the fp32 inputs and keeps norms in fp32.
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return super(DistributedBackend, self).autocast()

    def backward(self, loss: torch.Tensor) -> None:
        e = self.engine
        boundary = e.is_gradient_accumulation_boundary()
        e.backward(loss, scale_wrt_gas=False)  # the loop already divides by train.grad_accum
        if not boundary:
            e.step()  # counts the micro-batch; no optimizer step, no reduction yet

    def step(self, model, optimizer, grad_clip: float) -> torch.Tensor:
        self.engine.step()  # clip (gradient_clipping), unscale/skip on fp16 overflow, AdamW, zero grads
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).to(self.device)

    # -- checkpoints ----------------------------------------------------------------------------
    reads = ("deepspeed",)

    def _saved_by(self) -> dict:
        return {**super()._saved_by(), "zero": self.zero_stage}

    def _check_saved_by(self, saved_by: dict) -> None:
        if saved_by.get("world_size") != self.world_size or saved_by.get("zero") != self.zero_stage:
            raise ValueError(f"it was written by {saved_by.get('world_size')} process(es) with ZeRO stage "
                             f"{saved_by.get('zero')}; resume with the same (this run: {self.world_size}, stage "
                             f"{self.zero_stage})")

    def _ema_file(self, folder: Path) -> Path:
        return folder / (f"ema_rank_{self.rank}.safetensors" if self.zero_stage == 3 else "ema.safetensors")

    def _save_weights(self, folder: Path, model, optimizer, ema: Optional[dict]):
        with _write_errors_after(self.engine) as errors:
            self.engine.save_checkpoint(str(folder / "ds"), tag=TAG, save_latest=False)
        if errors:
            raise errors[0]
        if ema is not None and (self.zero_stage == 3 or self.is_main):
            checkpoint.save_tensors(self._ema_file(folder), ema)
        return None, {}

    def _load_weights(self, folder: Path, kind: str, shared: dict, model, optimizer, ema: Optional[dict]) -> bool:
        try:  # DeepSpeed's own torch.load(weights_only=False), forced to weights_only (storage/safe_load.py)
            with safe_load.weights_only(safe_load.deepspeed_globals()):
                path, _ = self.engine.load_checkpoint(str(folder / "ds"), tag=TAG, load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
        except Exception as exc:
            raise safe_load.refused(folder / "ds" / TAG, exc) from None
        if path is None:
            raise ValueError(f"DeepSpeed found no checkpoint in {folder / 'ds'}")
        return self._restore_ema(self._ema_file(folder), model, ema)

    # -- export ---------------------------------------------------------------------------------
    def full_state_dict(self, model, optimizer=None) -> dict[str, torch.Tensor]:
        """fp32 weights from the ZeRO masters (gathered; collective), buffers as they are."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        out = {}
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:  # frozen (e.g. LoRA base weights): gather the module's copy
                with self.ds.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.detach().float().clone()
            out[name] = full.detach().cpu()
        out.update({n: b.detach().cpu() for n, b in module.named_buffers()})
        return out if self.is_main else {}

    def full_ema_state_dict(self, ema: dict) -> dict[str, torch.Tensor]:
        if self.zero_stage != 3:
            return ema
        params = dict(self.engine.module.named_parameters())
        out = {}
        for name, part in ema.items():
            out[name] = self._gather_partition(part, params[name])
        return out if self.is_main else {}

    def _gather_partition(self, part: torch.Tensor, param) -> torch.Tensor:
        """Full tensor from every rank's ZeRO-3 partition of `param` (equal sizes, the last one padded)."""
        pieces = [torch.empty_like(part) for _ in range(self.world_size)]
        dist.all_gather(pieces, part.contiguous())
        return torch.cat(pieces)[: param.ds_numel].view(param.ds_shape).cpu()

    def shutdown(self, clean: bool = True) -> None:
        if self.engine is not None:
            self.engine.destroy()
        super().shutdown(clean)
