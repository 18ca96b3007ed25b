"""Hugging Face Hub ids as model sources, the way diffusers' scripts take them.

`model.pretrained=stable-diffusion-v1-5/stable-diffusion-v1-5` (and `model.vae`, `model.tokenizer`,
`model.text_encoder`) is resolved by huggingface_hub's `snapshot_download` to a folder of its cache:
downloaded once when online, read from the cache alone with `HF_HUB_OFFLINE=1`, at `model.revision`.
Everything after that is the local-folder code path. Only safetensors weights, configs and tokenizer
files are fetched: no pickled .bin/.ckpt files, no weights of other variants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from colodiffusion.config import ConfigError, is_hub_id

# Configs, tokenizer files and safetensors weights of a diffusers repo or a transformers CLIP repo.
_META = ["*.json", "*.txt", "tokenizer/*", "tokenizer_2/*"]


PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def has_variant(folder: Path, variant: Optional[str]) -> bool:
    """Whether `folder` holds the variant's safetensors weights (name.fp16.safetensors or its shards)."""
    if not variant:
        return False
    return any(folder.glob(f"*.{variant}.safetensors")) or any(folder.glob(f"*.{variant}-*.safetensors"))


def weight_patterns(variant: Optional[str]) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns: the variant's safetensors, or the plain ones (name.safetensors, not
    name.fp16.safetensors)."""
    if variant:
        return _META + [
            f"*.{variant}.safetensors",
            f"*.{variant}-*.safetensors",
            f"*.safetensors.index.{variant}.json",
        ], []
    return _META + ["*.safetensors"], ["*.*.safetensors"]


def _inside_cache(root: Path, source: str, where: str) -> None:
    """The snapshot folder huggingface_hub returned must be one of the repository's own snapshots: offline
    it joins the cache's refs/<revision> file's text to snapshots/, so a crafted ref could point anywhere."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=source, repo_type="model") / "snapshots"
    if root.resolve().parent != snapshots.resolve():
        raise ConfigError(f"{where} resolves to '{root}', which is not a snapshot inside its Hugging Face cache folder "
                          f"'{snapshots.parent}' (a refs/ file there names a path, not a commit); it is not read: "
                          "delete that cache entry and download the model again.")


def resolve(
    source: Optional[str], key: str, revision: Optional[str] = None, variant: Optional[str] = None
) -> Optional[Path]:
    """A local path as it is; a Hub id as its snapshot folder in the Hub cache; None stays None."""
    if not source:
        return None
    if Path(source).exists() or not is_hub_id(source):
        return Path(source)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    allow, ignore = weight_patterns(variant)
    where = f"{key} '{source}'" + (f" at revision '{revision}'" if revision else "")
    try:
        root = Path(snapshot_download(source, revision=revision, allow_patterns=allow, ignore_patterns=ignore or None))
        _inside_cache(root, source, where)
        for part in PARTS if variant else ():  # a part without that variant loads its plain weights, as diffusers does
            if (root / part).is_dir() and not has_variant(root / part, variant):
                snapshot_download(source, revision=revision, allow_patterns=[f"{part}/*.safetensors"],
                                  ignore_patterns=["*.*.safetensors"])
        return root
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise ConfigError(
                f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                "HF_HUB_OFFLINE=1 "
                "forbids downloading it: run once online, or point the key at a local folder."
            ) from None
        raise ConfigError(
            f"{where} could not be downloaded (no connection to the Hub?) and is not in the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE})."
        ) from None
    except RevisionNotFoundError:
        raise ConfigError(
            f"{where}: the Hub has no such revision (model.revision is a branch, tag or commit)."
        ) from None
    except GatedRepoError:
        raise ConfigError(
            f"{where} is gated: accept its terms on the Hub and log in (hf auth login or HF_TOKEN)."
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{where} is neither a local path nor a model on the Hub (private models need HF_TOKEN)."
        ) from None
