"""The UNet's model conversions, applied from outside the model in one place.

`apply_perf(unet, cfg.perf, cfg.precision, device)` runs where the trainer builds the model, before the
LoRA adapters and the backend: fp8 linears, attention kernels, parameter dtype, memory format (the first step of
torchtitan's order). Tensor parallel, activation checkpointing, torch.compile and FSDP follow in the
backend's `prepare`, in that order (parallel/parallelize.py). The optimizer side (fp32 master weights,
CPU offload, 8-bit states) is in `train/optim.py` / `train/master_weights.py`. `docs/performance.md`
says what each lever buys.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from colodiffusion.config import ConfigError, PerfConfig, parse_sdpa_by_head_dim

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def apply_perf(unet: torch.nn.Module, p: PerfConfig, precision: str, device: torch.device | None = None
               ) -> torch.nn.Module:
    """Apply the `perf` levers to the UNet in place (and return it); `precision` sets CUDA's TF32 flags."""
    if device is not None and device.type == "cuda":
        cuda_kernel_flags(p.cudnn_benchmark, precision)
    if p.fp8:
        convert_fp8(unet, device)
    by_head_dim = parse_sdpa_by_head_dim(p.sdpa_by_head_dim)
    if p.fuse_qkv or p.sdpa_backend != "auto" or by_head_dim:
        unet.set_attn_processor(FastAttnProcessor(p.fuse_qkv, p.sdpa_backend, by_head_dim))
    if p.param_dtype == "bf16":
        unet.to(torch.bfloat16)
        if getattr(unet.config, "addition_embed_type", None) == "text":
            # The pooled-caption embedding (tiny preset) layer-norms the fp32 context itself, and a bf16
            # LayerNorm refuses fp32 input even under autocast: hand it the context in its own dtype.
            unet.add_embedding.register_forward_pre_hook(lambda _, args: tuple(a.to(torch.bfloat16) for a in args))
    if p.channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet


def cuda_kernel_flags(cudnn_benchmark: bool, precision: str) -> None:
    """Process-wide CUDA flags the trainer and the bench share (the bench's figures are the trainer's)."""
    torch.backends.cudnn.benchmark = cudnn_benchmark
    if precision != "fp32":  # only the fp32 leftovers of an autocast step; a pure fp32 run keeps full fp32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class FastAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA attention with a chosen SDPA kernel and, optionally, fused projections.

    The kernel is `sdpa_backend` for every call, or the entry of `by_head_dim` for the layer's head
    dimension (SD 1.x: 40, 80, 160), so each attention shape gets the kernel measured fastest for it
    (bench/sdpa_shapes.py). Fusion concatenates the q/k/v (or cross-attention k/v) weights on the fly
    into one matmul, so the parameters keep their names and shapes: checkpoints, EMA and exports are
    unchanged (diffusers' own `fuse_qkv_projections` adds new `to_qkv` parameters beside the old
    ones). Anything this fast path does not cover (masks, group/spatial norms, 4-D inputs, wrapped or
    fp8 linears) goes through diffusers' processor."""

    def __init__(self, fuse_qkv: bool = True, sdpa_backend: str = "auto", by_head_dim: dict[int, str] | None = None):
        super().__init__()
        for name in [sdpa_backend, *(by_head_dim or {}).values()]:
            if name != "auto" and name not in SDPA_BACKENDS:
                raise ConfigError(f"perf.sdpa_backend '{name}' is unknown; use auto or {', '.join(SDPA_BACKENDS)}.")
        self.fuse_qkv = fuse_qkv
        self.sdpa_backend = sdpa_backend
        self.by_head_dim = dict(by_head_dim or {})

    def kernel_for(self, head_dim: int) -> str:
        return self.by_head_dim.get(head_dim, self.sdpa_backend)

    def _kernel(self, attn: Attention):
        name = self.kernel_for(attn.inner_dim // attn.heads)
        if name == "auto":
            return contextlib.nullcontext()
        return sdpa_kernel([SDPA_BACKENDS[name]])

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        with self._kernel(attn):
            if self.fuse_qkv and _fusable(attn, hidden_states, attention_mask):
                return _fused_attention(attn, hidden_states, encoder_hidden_states)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def _fusable(attn: Attention, x, mask) -> bool:
    plain = all(type(getattr(attn, n)) is torch.nn.Linear for n in ("to_q", "to_k", "to_v"))
    extras = (attn.spatial_norm, attn.group_norm, attn.norm_q, attn.norm_k)
    return (plain and mask is None and x.ndim == 3 and not attn.norm_cross and not attn.residual_connection
            and all(e is None for e in extras))


def _cat_linear(x: torch.Tensor, layers: list[torch.nn.Linear]) -> list[torch.Tensor]:
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers]) if layers[0].bias is not None else None
    return F.linear(x, weight, bias).chunk(len(layers), dim=-1)


def _fused_attention(attn: Attention, x_BNC: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    B = x_BNC.shape[0]
    if context is None:
        q, k, v = _cat_linear(x_BNC, [attn.to_q, attn.to_k, attn.to_v])
    else:
        q = attn.to_q(x_BNC)
        k, v = _cat_linear(context, [attn.to_k, attn.to_v])
    head_dim = k.shape[-1] // attn.heads
    q, k, v = (t.reshape(B, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(B, -1, attn.heads * head_dim).to(q.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    return out / attn.rescale_output_factor


def convert_fp8(unet: torch.nn.Module, device: torch.device | None = None) -> int:
    """Swap the UNet's large nn.Linear layers for torchao Float8Linear (dynamic per-tensor scaling).

    Returns how many layers were converted. Needs torchao, and at run time a CUDA GPU with
    compute capability >= 8.9 (Ada, Hopper)."""
    if device is not None and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ConfigError(f"perf.fp8 needs a GPU with compute capability >= 8.9 (this one is {major}.{minor}).")
    elif device is not None:
        raise ConfigError(f"perf.fp8 needs a CUDA GPU (Ada or Hopper); the device here is {device.type}.")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise ConfigError("perf.fp8 needs torchao: pip install torchao (a version built for your torch).") from None

    def wanted(module: torch.nn.Module, fqn: str) -> bool:
        # fp8 matmuls need both dims divisible by 16; tiny layers (time embedding) gain nothing.
        return (isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0
                and module.out_features % 16 == 0 and module.in_features * module.out_features >= 2**16)

    before = sum(type(m) is torch.nn.Linear for m in unet.modules())
    convert_to_float8_training(unet, module_filter_fn=wanted)
    return before - sum(type(m) is torch.nn.Linear for m in unet.modules())
