"""Low-precision model parameters with fp32 master weights inside the optimizer.

The model keeps bf16 (or any dtype) parameters and gradients, so forward, backward and the
gradient buffers cost half of fp32. The optimizer keeps an fp32 copy of every parameter (the
master weights) and runs an ordinary inner optimizer (AdamW, 8-bit AdamW...) over those copies:
updates far below bf16's resolution (lr * update << |w| / 256) still accumulate in fp32 instead of
rounding away. After each step the masters are written back into the model parameters.

With `master_device="cpu"` the masters and the inner optimizer's states live in (pinned) CPU memory
and the step runs on the CPU (ZeRO-Offload's idea): the GPU holds only bf16 weights and gradients.
That step needs one device->host copy of the gradients and a host sync, by construction.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

InnerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


class MasterWeightOptimizer(torch.optim.Optimizer):
    """Wraps `make_inner(masters)`; shares its `param_groups`, so LR schedulers and clipping see one optimizer."""

    def __init__(self, params: Iterable[torch.nn.Parameter], make_inner: InnerFactory,
                 master_device: Optional[torch.device | str] = None, offload: Optional[bool] = None):
        """`offload` (default: whether master_device differs from the parameters') moves gradients and
        weights through model-dtype staging buffers; forcing it on the CPU exercises that path in tests."""
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("MasterWeightOptimizer got no trainable parameters")
        model_device = self.params[0].device
        self.master_device = torch.device(master_device) if master_device is not None else model_device
        self.offload = self.master_device != model_device if offload is None else offload
        # Pinned host memory makes the device<->host copies asynchronous DMA transfers.
        pin = self.offload and self.master_device.type == "cpu" and model_device.type == "cuda"
        self.masters = [self._buffer(p, torch.float32, pin, copy=True) for p in self.params]
        self._grads = [self._buffer(p, torch.float32, pin) for p in self.params]
        # Offload: model-dtype staging buffers, so each transfer moves 2 bytes per parameter, not 4.
        self._stage = [self._buffer(p, p.dtype, pin) for p in self.params] if self.offload else None
        self.inner = make_inner(self.masters)
        super().__init__(self.masters, self.inner.defaults)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        self._built = True

    def _buffer(self, p: torch.Tensor, dtype: torch.dtype, pin: bool, copy: bool = False) -> torch.Tensor:
        buf = torch.empty(p.shape, dtype=dtype, device=self.master_device, pin_memory=pin)
        if copy:
            buf.copy_(p.detach())
        return buf

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightOptimizer does not support closures")
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        for i, m in enumerate(self.masters):  # parameters without a gradient are skipped by the inner optimizer
            m.grad = None
        if not live:
            return None
        grads = [self.params[i].grad for i in live]
        if self.offload:
            stage = [self._stage[i] for i in live]
            for s, g in zip(stage, grads):
                s.copy_(g, non_blocking=True)
            if grads[0].is_cuda:  # the CPU step must see the finished copies
                torch.cuda.current_stream(grads[0].device).synchronize()
            torch._foreach_copy_([self._grads[i] for i in live], stage)
        else:
            torch._foreach_copy_([self._grads[i] for i in live], grads)
        for i in live:
            self.masters[i].grad = self._grads[i]
        self.inner.step()
        self._write_back(live)
        return None

    @torch.no_grad()
    def _write_back(self, indices: list[int]) -> None:
        params = [self.params[i] for i in indices]
        masters = [self.masters[i] for i in indices]
        if not self.offload:
            torch._foreach_copy_(params, masters)
            return
        stage = [self._stage[i] for i in indices]
        torch._foreach_copy_(stage, masters)  # fp32 -> model dtype on the host
        for p, s in zip(params, stage):
            p.copy_(s, non_blocking=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_built", False):
            raise NotImplementedError("MasterWeightOptimizer takes all its parameters at construction")
        super().add_param_group(param_group)

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "masters": [m.detach().clone() for m in self.masters]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        masters = state_dict["masters"]
        if len(masters) != len(self.masters):
            raise ValueError(f"checkpoint has {len(masters)} master weights, the model {len(self.masters)}")
        for m, src in zip(self.masters, masters):
            m.copy_(src)
        self.inner.load_state_dict(state_dict["inner"])
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        self._write_back(list(range(len(self.params))))
        if self.offload and self.params[0].is_cuda:
            torch.cuda.synchronize(self.params[0].device)

    def master_of(self) -> dict[int, torch.Tensor]:
        """id(model parameter) -> its fp32 master weight (for exporting full-precision weights)."""
        return {id(p): m for p, m in zip(self.params, self.masters)}
