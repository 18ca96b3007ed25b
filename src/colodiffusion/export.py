"""`colodiffusion export`: a run, checkpoint, diffusers folder or single file -> diffusers | single-file | lora.

A command over models, checkpoints and pipelines: the model is loaded by `models/loading.py`
(rebuilt exactly as training built it, for our checkpoints) and written by `models/single_file.py`,
`models/lora.py` or `generate.export_diffusers`. A single .safetensors file (model or LoRA) says how
it was made: kohya's `ss_*` training keys in its header (`train/metadata.py`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

from colodiffusion.config import ConfigError
from colodiffusion.generate import export_diffusers
from colodiffusion.models import lora
from colodiffusion.models.loading import load_model
from colodiffusion.models.single_file import DTYPES, save_single_file
from colodiffusion.storage.sealed import check_replaceable, write_file, write_sealed
from colodiffusion.train.metadata import kohya_metadata, write_model_card

FORMATS = ("diffusers", "single-file", "lora")


def export(source: str | Path, fmt: str, out: str | Path, ema: bool = False, dtype: str = "fp32",
           merge_lora: bool = False, original_config: Optional[str] = None, tokenizer: Optional[str] = None) -> Path:
    if fmt not in FORMATS:
        raise ConfigError(f"--format is '{fmt}'; allowed values are: {', '.join(FORMATS)}.")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype is '{dtype}'; allowed values are: {', '.join(DTYPES)}.")
    out = Path(out)
    if fmt == "single-file" and out.suffix not in (".safetensors", ".ckpt"):
        raise ConfigError(f"--out '{out}' must end in .safetensors or .ckpt for --format single-file.")
    if fmt != "single-file":  # a folder is replaced whole (written beside it, then swapped in): only ours
        check_replaceable(out, "--out")
    m = load_model(source, ema, original_config, tokenizer)
    if fmt == "lora":
        if not m.has_lora:
            raise ConfigError(
                f"'{source}' was not trained with LoRA (train.lora.rank=0): there is no adapter to write."
            )
        meta = kohya_metadata(source, out, m.unet, m.noise_scheduler.config.prediction_type, lora.lora_shape(m.unet))
        write_sealed(out, lambda folder: lora.save_lora(folder, m.unet, m.text_encoder, DTYPES[dtype], metadata=meta))
        return out / lora.WEIGHT_NAME
    if m.has_lora:
        if not merge_lora:
            raise ConfigError(
                f"'{source}' is a LoRA run: pass --merge-lora to fold the adapter into the base weights, "
                "or use --format lora to write the adapter file alone."
            )
        m.unet, m.text_encoder = lora.merged(m.unet), lora.merged(m.text_encoder)
    if fmt == "single-file" and m.is_sdxl:
        raise ConfigError(f"'{source}' is an SDXL model: --format single-file writes the SD 1.x/2.x layout only; "
                          "use --format diffusers (or --format lora for a LoRA run).")
    if fmt == "single-file":
        meta = kohya_metadata(source, out, m.unet, m.noise_scheduler.config.prediction_type)
        return write_file(out, lambda tmp: save_single_file(tmp, m.unet, m.vae, m.text_encoder, m.tokenizer,
                                                            m.noise_scheduler, dtype=dtype, metadata=meta))
    cast = DTYPES[dtype]
    unet, te, vae = (copy.deepcopy(x).to(cast) for x in (m.unet, m.text_encoder, m.vae))
    te_2 = copy.deepcopy(m.text_encoder_2).to(cast) if m.is_sdxl else None
    # Sealed like final/: written beside --out, then swapped in whole, so a failure half-way leaves the
    # folder that was there as it was (and `sample` refuses a folder that no longer matches its manifest).
    def write(folder: Path) -> None:
        export_diffusers(folder, m.tokenizer, te, vae, unet, m.noise_scheduler, m.tokenizer_2, te_2)
        meta = kohya_metadata(source, out, m.unet, m.noise_scheduler.config.prediction_type)
        write_model_card(folder, meta, out.name, out.name, m.is_sdxl)

    return write_sealed(out, write)
