"""Low-precision model parameters with fp32 master weights inside the optimizer.

The model keeps bf16 (or any dtype) parameters and gradients, so forward, backward and the
gradient buffers cost half of fp32. The optimizer keeps an fp32 copy of every parameter (the
master weights) and runs an ordinary inner optimizer (AdamW, 8-bit AdamW...) over those copies:
updates far below bf16's resolution (lr * update << |w| / 256) still accumulate in fp32 instead of
rounding away. After each step the masters are written back into the model parameters.

There is no permanent fp32 copy of the gradients: the step walks the parameters in chunks of at
most `chunk_numel` elements, converts one chunk's gradients into a reusable fp32 scratch buffer,
steps the inner optimizer over that chunk and writes its weights back. Bytes held per parameter:
4 (fp32 master) + the inner optimizer's states (8 for AdamW), plus one scratch of
`max(chunk_numel, largest parameter)` fp32 elements (sd15: 256 MiB, against 3.2 GiB for a full
fp32 gradient copy).

With `master_device="cpu"` the masters and the inner optimizer's states live in CPU memory and the
step runs on the CPU (ZeRO-Offload's idea): the GPU holds only bf16 weights and gradients. All
chunks' gradients are queued for device->host copy into pinned model-dtype staging buffers first;
each chunk then waits only for its own copy, so the transfers of later chunks and the host->device
write-back of earlier ones overlap the CPU's optimizer arithmetic. Waiting for those copies is a
host sync per chunk, by construction.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

InnerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
CHUNK_NUMEL = 1 << 26
"""Elements per optimizer chunk (256 MiB of fp32 scratch); sd15 (860M parameters) steps in 13 chunks."""


def plan_chunks(numels: list[int], chunk_numel: int) -> list[list[int]]:
    """Consecutive parameter indices grouped so that each group holds at most `chunk_numel`
    elements (a larger parameter is a group by itself)."""
    chunks: list[list[int]] = []
    size = chunk_numel + 1
    for i, n in enumerate(numels):
        if size + n > chunk_numel:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += n
    return chunks


class MasterWeightOptimizer(torch.optim.Optimizer):
    """Wraps `make_inner(masters)`; shares its `param_groups`, so LR schedulers and clipping see one optimizer.

    `found_inf` (a 0-dim tensor set on this object by the numerical guard or a GradScaler around
    `step()`, as for fused optimizers) is handed to the inner optimizer, so a fused inner AdamW
    skips a bad step on the device without a host sync."""

    def __init__(self, params: Iterable[torch.nn.Parameter], make_inner: InnerFactory,
                 master_device: Optional[torch.device | str] = None, offload: Optional[bool] = None,
                 chunk_numel: int = CHUNK_NUMEL):
        """`offload` (default: whether master_device differs from the parameters') moves gradients and
        weights through model-dtype staging buffers; forcing it on the CPU exercises that path in tests."""
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("MasterWeightOptimizer got no trainable parameters")
        model_device = self.params[0].device
        self.master_device = torch.device(master_device) if master_device is not None else model_device
        self.offload = self.master_device != model_device if offload is None else offload
        with torch.no_grad():
            self.masters = [p.detach().to(self.master_device, torch.float32, copy=True).contiguous()
                            for p in self.params]
        # Pinned host memory makes the device<->host copies asynchronous DMA transfers; the staging
        # buffers keep each parameter's layout (channels-last too), so a transfer is one plain copy.
        pin = self.offload and self.master_device.type == "cpu" and model_device.type == "cuda"
        self._stage = ([torch.empty_like(p, device=self.master_device, pin_memory=pin) for p in self.params]
                       if self.offload else None)
        self.chunks = plan_chunks([p.numel() for p in self.params], chunk_numel)
        self._scratch: Optional[torch.Tensor] = None  # allocated at the first step
        self._scratch_numel = max(sum(self.params[i].numel() for i in c) for c in self.chunks)
        self.inner = make_inner(self.masters)
        super().__init__(self.masters, self.inner.defaults)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        self._built = True

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightOptimizer does not support closures")
        live = [[i for i in chunk if self.params[i].grad is not None] for chunk in self.chunks]
        live = [idx for idx in live if idx]
        if not live:
            return None
        found_inf = getattr(self, "found_inf", None)
        if self.offload:
            self._step_offloaded(live, found_inf)
        else:
            for idx in live:
                grads = self._scratch_views(idx)
                torch._foreach_copy_(grads, [self.params[i].grad for i in idx])  # model dtype -> fp32
                self._inner_step(idx, grads, found_inf)
                torch._foreach_copy_([self.params[i] for i in idx], [self.masters[i] for i in idx])
        return None

    def _step_offloaded(self, live: list[list[int]], found_inf: Optional[torch.Tensor]) -> None:
        cuda = self.params[0].is_cuda
        if found_inf is not None:  # queued before the gradients, so the first chunk's wait covers it
            found_inf = found_inf.to(self.master_device, non_blocking=True)
        copied = []
        for idx in live:  # queue every chunk's device->host copy first
            for i in idx:
                self._stage[i].copy_(self.params[i].grad, non_blocking=True)
            event = torch.cuda.Event() if cuda else None
            if event is not None:
                event.record()
            copied.append(event)
        for idx, event in zip(live, copied):
            if event is not None:
                event.synchronize()  # only this chunk's transfer: later ones keep flowing
            grads = self._scratch_views(idx)
            torch._foreach_copy_(grads, [self._stage[i] for i in idx])
            self._inner_step(idx, grads, found_inf)
            self._write_back(idx)

    def _inner_step(self, idx: list[int], grads: list[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
        for i, g in zip(idx, grads):
            self.masters[i].grad = g
        if found_inf is not None:
            self.inner.found_inf = found_inf.to(self.master_device)
        try:
            self.inner.step()
        finally:
            for i in idx:
                self.masters[i].grad = None
            if found_inf is not None:
                del self.inner.found_inf

    def _scratch_views(self, idx: list[int]) -> list[torch.Tensor]:
        """fp32 views into the one reusable scratch buffer, shaped as the chunk's masters."""
        if self._scratch is None:
            self._scratch = torch.empty(self._scratch_numel, dtype=torch.float32, device=self.master_device)
        views, offset = [], 0
        for i in idx:
            n = self.masters[i].numel()
            views.append(self._scratch[offset:offset + n].view(self.masters[i].shape))
            offset += n
        return views

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

    # -- the optimizer interface ------------------------------------------------------------------
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

    # -- for the guard, the EMA, exports and memory accounting --------------------------------------
    def model_grads(self) -> list[torch.Tensor]:
        """The model parameters' gradients (what the numerical guard must check before `step`)."""
        return [p.grad for p in self.params if p.grad is not None]

    def master_of(self) -> dict[int, torch.Tensor]:
        """id(model parameter) -> its fp32 master weight (for exporting full-precision weights)."""
        return {id(p): m for p, m in zip(self.params, self.masters)}

    def held_bytes(self) -> dict[str, int]:
        """Bytes of every tensor this optimizer keeps between steps, by role, and where they live."""
        states = [t for s in self.inner.state.values() for t in s.values() if torch.is_tensor(t)]
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        return {"masters": size(self.masters), "states": size(states),
                "staging": size(self._stage or []),
                "scratch": self._scratch_numel * 4, "device": str(self.master_device)}
