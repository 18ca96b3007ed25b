"""Key mapping between diffusers modules and the original LDM single-file layout.

LDM -> diffusers uses diffusers' own converters (`diffusers.loaders.single_file_utils`), fed with
configs we build offline (from the original YAML, or inferred from the keys). diffusers has no
library function for the other direction, so `to_ldm` writes it: a rename per key, generic over
the number of levels and res-blocks (so the tiny preset maps as well as SD's 4-level UNet).
Every imported key must come back out of `to_ldm`, which makes the two directions check each other.

Layout: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
`cond_stage_model.transformer.text_model.*` (OpenAI CLIP, SD 1.x) or `cond_stage_model.model.*`
(OpenCLIP, SD 2.x), and optionally `model_ema.<flattened name>` (EMA copy of the UNet).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import torch
from diffusers.loaders import single_file_utils as sfu

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
OPENCLIP = "cond_stage_model.model."
EMA = "model_ema."
# The tiny preset's pooled-caption embedding (diffusers' addition_embed_type="text") has no LDM name; ours.
TEXT_POOL = "text_pool."

# Non-weight buffers LDM checkpoints carry (the noise schedule, EMA bookkeeping, CLIP's id table,
# the OpenCLIP parts SD never runs): read and ignored.
_IGNORED = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|logvar|lvlb_weights"
    r"|model_ema\.(decay|num_updates)|cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids"
    r"|cond_stage_model\.model\.(text_projection|logit_scale|attn_mask|visual\..*))$"
)


def ema_key(unet_key: str) -> str:
    """LDM's EMA names drop the dots after `model.`:
    model.diffusion_model.out.0.weight -> model_ema.diffusion_modelout0weight."""
    return EMA + unet_key[len("model."):].replace(".", "")


# -- diffusers -> LDM ---------------------------------------------------------------------------

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename a UNet2DConditionModel state dict to `model.diffusion_model.*` keys."""
    L = config["layers_per_block"]
    if not isinstance(L, int):
        raise ValueError("single-file export needs the same layers_per_block on every level")
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    flat = dict(sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    out = {}
    for key, value in sd.items():
        if key in flat:
            new = flat[key]
        elif key.startswith("add_embedding.") and config.get("addition_embed_type") == "text":
            new = TEXT_POOL + key[len("add_embedding."):]
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            base = 1 + b * (L + 1)
            if kind == "resnets":
                new = f"input_blocks.{base + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{base + j}.1.{rest}"
            else:
                new = f"input_blocks.{base + L}.0.op.{rest.removeprefix('conv.')}"
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
            kind, j, rest = m[1], int(m[2]), m[3]
            new = f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            base = b * (L + 1)
            if kind == "resnets":
                new = f"output_blocks.{base + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{base + j}.1.{rest}"
            else:
                new = f"output_blocks.{base + L}.{2 if up_attn[b] else 1}.{rest}"
        else:
            raise KeyError(f"UNet key '{key}' has no place in the LDM layout")
        out[UNET + new] = value
    return out


def _vae_block(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def _vae_attn(rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        if rest.startswith(new + "."):
            rest = old + rest[len(new):]
            break
    if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
        value = value[:, :, None, None]
    return rest, value


def vae_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename an AutoencoderKL state dict to `first_stage_model.*` keys."""
    n = len(config["up_block_types"])
    flat = dict(sfu.DIFFUSERS_TO_LDM_MAPPING["vae"])
    out = {}
    for key, value in sd.items():
        if key in flat:
            new = flat[key]
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.*)", key):
            new = (f"encoder.down.{m[1]}.block.{m[3]}.{_vae_block(m[4])}" if m[3] is not None
                   else f"encoder.down.{m[1]}.downsample.{m[4]}")
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", key):
            level = n - 1 - int(m[1])
            new = (f"decoder.up.{level}.block.{m[3]}.{_vae_block(m[4])}" if m[3] is not None
                   else f"decoder.up.{level}.upsample.{m[4]}")
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_block(m[3])}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            rest, value = _vae_attn(m[2], value)
            new = f"{m[1]}.mid.attn_1.{rest}"
        else:
            raise KeyError(f"VAE key '{key}' has no place in the LDM layout")
        out[VAE + new] = value
    return out


def is_openclip(text_config: dict) -> bool:
    """SD 2.x's OpenCLIP tower uses exact GELU; OpenAI CLIP (SD 1.x, and the tiny preset) quick_gelu."""
    return text_config.get("hidden_act") == "gelu"


_OPENCLIP_LAYER = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]


def text_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights to `cond_stage_model.*` keys (OpenAI CLIP or OpenCLIP naming)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    if not is_openclip(config):
        return {CLIP + k: v for k, v in sd.items()}
    out, qkv = {}, {}
    for key, value in sd.items():
        if m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
            continue
        if m := re.match(r"encoder\.layers\.(\d+)\.(.*)", key):
            rest = m[2]
            for new, old in _OPENCLIP_LAYER:
                rest = rest.replace(new, old)
            new_key = f"transformer.resblocks.{m[1]}.{rest}"
        else:
            new_key = {"embeddings.token_embedding.weight": "token_embedding.weight",
                       "embeddings.position_embedding.weight": "positional_embedding",
                       "final_layer_norm.weight": "ln_final.weight",
                       "final_layer_norm.bias": "ln_final.bias"}[key]
        out[OPENCLIP + new_key] = value
    for (i, kind), parts in qkv.items():
        out[f"{OPENCLIP}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def to_ldm(unet: dict, vae: dict, text: dict, unet_config: dict, vae_config: dict, text_config: dict,
           ema: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """The full single-file state dict; `ema` (UNet weights) is written as `model_ema.*` keys."""
    out = {**unet_to_ldm(unet, unet_config), **vae_to_ldm(vae, vae_config), **text_to_ldm(text, text_config)}
    if ema is not None:
        out.update({ema_key(k): v for k, v in unet_to_ldm(ema, unet_config).items()})
    return out


# -- LDM -> diffusers ---------------------------------------------------------------------------

@dataclass
class Converted:
    unet: dict
    vae: dict
    text: dict
    unet_config: dict
    vae_config: dict
    text_config: dict
    prediction_type: Optional[str] = None
    has_ema: bool = False
    ignored: list = field(default_factory=list)
    unused: list = field(default_factory=list)


def _levels(sd: dict, pattern: str) -> int:
    return len({int(m[1]) for k in sd if (m := re.match(pattern, k))})


def infer_original_config(sd: dict) -> dict:
    """The parts of an LDM YAML that the converters read, rebuilt from the weights' shapes.

    Head counts are not visible in the weights: this assumes SD's (8 heads for 1.x-style
    convolutional projections, 64 channels per head for 2.x-style linear ones)."""
    u, v = UNET, VAE
    ch = sd[u + "input_blocks.0.0.weight"].shape[0]
    n_in = _levels(sd, re.escape(u) + r"input_blocks\.(\d+)\.")
    down = sorted({int(m[1]) for k in sd if (m := re.match(re.escape(u) + r"input_blocks\.(\d+)\.0\.op\.", k))})
    n_levels = len(down) + 1
    L = (n_in - 1 - len(down)) // n_levels
    mult, attn_res, depth = [], [], 1
    for level in range(n_levels):
        first = 1 + level * (L + 1)
        mult.append(sd[f"{u}input_blocks.{first}.0.out_layers.3.weight"].shape[0] // ch)
        if any(k.startswith(f"{u}input_blocks.{first}.1.") for k in sd):
            attn_res.append(2 ** level)
            depth = _levels(sd, re.escape(f"{u}input_blocks.{first}.1.transformer_blocks.") + r"(\d+)\.")
    ctx_key = next(k for k in sd if k.startswith(u) and k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in sd if k.startswith(u) and k.endswith("proj_in.weight"))
    linear = sd[proj_in].ndim == 2
    heads = dict(num_head_channels=64) if linear else dict(num_heads=8)
    unet = dict(in_channels=sd[u + "input_blocks.0.0.weight"].shape[1], out_channels=sd[u + "out.2.weight"].shape[0],
                model_channels=ch, channel_mult=mult, num_res_blocks=L, attention_resolutions=attn_res,
                transformer_depth=depth, context_dim=sd[ctx_key].shape[1], use_linear_in_transformer=linear, **heads)
    vch = sd[v + "encoder.conv_in.weight"].shape[0]
    v_levels = _levels(sd, re.escape(v) + r"encoder\.down\.(\d+)\.")
    vmult = [sd[f"{v}encoder.down.{i}.block.0.conv2.weight"].shape[0] // vch for i in range(v_levels)]
    ddconfig = dict(
        ch=vch,
        ch_mult=vmult,
        in_channels=sd[v + "encoder.conv_in.weight"].shape[1],
        out_ch=sd[v + "decoder.conv_out.weight"].shape[0],
        z_channels=sd[v + "decoder.conv_in.weight"].shape[1],
        num_res_blocks=_levels(sd, re.escape(v) + r"encoder\.down\.0\.block\.(\d+)\."),
    )
    return {"model": {"params": {"unet_config": {"params": unet},
                                 "first_stage_config": {"params": {"ddconfig": ddconfig}}}}}


def infer_text_config(sd: dict, openclip: bool, drop_last: bool) -> dict:
    """CLIPTextConfig fields from the weights (64 channels per head, as in every CLIP/OpenCLIP tower)."""
    if openclip:
        p = OPENCLIP
        tok, pos = sd[p + "token_embedding.weight"], sd[p + "positional_embedding"]
        layers = _levels(sd, re.escape(p) + r"transformer\.resblocks\.(\d+)\.")
        inter = sd[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        layers -= int(drop_last)
    else:
        p = _clip_prefix(sd)
        tok, pos = sd[p + "embeddings.token_embedding.weight"], sd[p + "embeddings.position_embedding.weight"]
        layers = _levels(sd, re.escape(p) + r"encoder\.layers\.(\d+)\.")
        inter = sd[p + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    hidden = tok.shape[1]
    return dict(vocab_size=tok.shape[0], hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=max(1, hidden // 64), max_position_embeddings=pos.shape[0],
                hidden_act="gelu" if openclip else "quick_gelu", projection_dim=hidden,
                bos_token_id=0 if tok.shape[0] != 49408 else 49406, eos_token_id=49407 if tok.shape[0] == 49408 else 1)


def _clip_prefix(sd: dict) -> str:
    # Files saved with older transformers lack the `text_model.` level.
    return CLIP if any(k.startswith(CLIP) for k in sd) else "cond_stage_model.transformer."


def diffusers_configs_from_original(original: dict, sd: dict) -> tuple[dict, dict, Optional[str]]:
    """UNet and VAE diffusers configs (diffusers' own functions) and the prediction type from an LDM YAML."""
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, sd)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, sd)
    params = original["model"]["params"]
    prediction = {"v": "v_prediction", "eps": "epsilon"}.get(params.get("parameterization", ""))
    return unet_config, vae_config, prediction


def from_ldm(sd: dict, original: Optional[dict] = None, configs: Optional[dict] = None,
             use_ema: bool = False) -> Converted:
    """Split and convert a single-file state dict into diffusers state dicts plus their configs.

    `configs` (our own exports carry them) wins over `original` (the LDM YAML), which wins over
    configs inferred from the keys."""
    openclip = any(k.startswith(OPENCLIP) for k in sd)
    has_ema = any(k.startswith(EMA) and not _IGNORED.match(k) for k in sd)
    if use_ema and not has_ema:
        raise ValueError("it holds no EMA weights (model_ema.* keys)")
    prediction = None
    if configs is not None:
        unet_config, vae_config, text_config = configs["unet"], configs["vae"], configs["text_encoder"]
        prediction = configs.get("scheduler", {}).get("prediction_type")
    else:
        unet_config, vae_config, prediction = diffusers_configs_from_original(original or infer_original_config(sd), sd)
        text_config = infer_text_config(sd, openclip, drop_last=True)
    source = dict(sd)
    if use_ema:
        for k in sd:
            if k.startswith(UNET):
                source[k] = sd[ema_key(k)]
    unet = sfu.convert_ldm_unet_checkpoint(source, unet_config)
    pool = UNET + TEXT_POOL
    unet.update({"add_embedding." + k[len(pool):]: v for k, v in source.items() if k.startswith(pool)})
    vae = sfu.convert_ldm_vae_checkpoint(source, vae_config)
    text = _text_from_ldm(source, text_config, openclip)
    out = Converted(unet, vae, text, unet_config, vae_config, text_config, prediction, has_ema)
    _account(out, sd, use_ema)
    return out


def _text_from_ldm(sd: dict, config: dict, openclip: bool) -> dict:
    if openclip:
        model = SimpleNamespace(config=SimpleNamespace(hidden_size=config["hidden_size"]))
        text = sfu.convert_open_clip_checkpoint(model, sd, prefix=OPENCLIP)
        text.pop("text_projection.weight", None)
    else:
        prefix = _clip_prefix(sd)
        text = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    text = {k.removeprefix("text_model."): v for k, v in text.items() if not k.endswith("position_ids")}
    n = config["num_hidden_layers"]  # SD 2.x runs OpenCLIP's penultimate layer: later blocks are unused
    return {k: v for k, v in text.items() if not ((m := re.match(r"encoder\.layers\.(\d+)\.", k)) and int(m[1]) >= n)}


def _account(out: Converted, sd: dict, use_ema: bool) -> None:
    """Every key of the file is either converted (it comes back out of `to_ldm`), a known buffer, or unused."""
    expected = set(to_ldm(out.unet, out.vae, out.text, out.unet_config, out.vae_config, out.text_config))
    if not any(k.startswith(CLIP) for k in sd) and not is_openclip(out.text_config):
        expected = {k.replace(CLIP, "cond_stage_model.transformer.") for k in expected}
    ema_names = {ema_key(k) for k in expected if k.startswith(UNET)} if out.has_ema else set()
    n = out.text_config["num_hidden_layers"]
    for k in sd:
        if k in expected or k in ema_names:
            continue
        m = re.match(re.escape(OPENCLIP) + r"transformer\.resblocks\.(\d+)\.", k)
        if _IGNORED.match(k) or (m and int(m[1]) >= n):
            out.ignored.append(k)
        else:
            out.unused.append(k)
