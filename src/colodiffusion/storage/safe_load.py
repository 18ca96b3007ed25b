"""Reading the pickles inside checkpoint folders without running code.

A checkpoint folder holds up to three kinds of pickle, and each is read by an unpickler that can only
build an allow-list of classes, so a crafted file is refused before any of its code could run:

- our own `state.pt` / `rank_<r>.pt`, Colossal-AI's optimizer files and the tensors and plain values
  inside torch DCP shards (`dcp/__<r>_0.distcp`): `torch.load(weights_only=True)`, tensors and plain
  data only;
- DeepSpeed's files (`ds/state/*.pt`): DeepSpeed itself calls `torch.load(weights_only=False)`; inside
  `weights_only()` every `torch.load` is forced to `weights_only=True` (torch's
  `TORCH_FORCE_WEIGHTS_ONLY_LOAD`), allowing only the four DeepSpeed classes its files hold
  (`deepspeed_globals`: two loss scalers, the ZeRO stage enum, a named tuple), which get their fields
  set from the file and run no code of the file's choosing;
- DCP's `dcp/.metadata`, which torch reads with a bare `pickle.load`: `SafeReader` reads it with a
  `pickle.Unpickler` whose `find_class` allows only DCP's metadata dataclasses, `torch.Size`, torch
  dtypes and layouts and `pathlib` paths, and checks that every shard it names is a file in the same
  folder, inside that file's length.

None of this depends on the manifest: `manifest.json` catches accidents (a truncated or garbled
file), but whoever can write a checkpoint can also rewrite its manifest.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from colodiffusion.config import ConfigError
from colodiffusion.storage.checkpoint import CheckpointError, root_cause

_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
}

DEEPSPEED_TAG = "state"  # the tag our DeepSpeed backend saves under, inside <checkpoint>/ds/


class UnsafePickle(pickle.UnpicklingError):
    """A pickle that names a class outside the allow-list."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_CLASSES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise UnsafePickle(f"GLOBAL {module}.{name}")


def refused(path: Path, exc: BaseException) -> ConfigError:
    """One sentence for a file that could not be read safely (`exc` may be DCP's wrapper)."""
    exc = root_cause(exc)
    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        return CheckpointError(f"'{path}' holds objects other than tensors and plain data{what}; it was refused "
                               "unread because loading it could run code")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return CheckpointError(f"'{path}' is not a readable checkpoint ({first})")


@contextlib.contextmanager
def weights_only(extra_globals: Iterable = ()) -> Iterator[None]:
    """Every `torch.load` inside runs with `weights_only=True`, also where a library passes False
    (DeepSpeed, DCP's planner); `extra_globals` are the only classes allowed beyond torch's own."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ[keys[0]] = "1"
    os.environ.pop(keys[1], None)
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def deepspeed_globals() -> list:
    """The classes DeepSpeed's checkpoint files hold besides tensors (ZeRO 1-3, fp32/bf16/fp16)."""
    import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # gloo on CPU, no compiled ops
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("this checkpoint was written by DeepSpeed, which is not installed: "
                          "pip install 'colodiffusion[deepspeed]' (or: DS_BUILD_OPS=0 pip install deepspeed)") from None
    return deepspeed


# -- torch DCP ------------------------------------------------------------------------------------
def read_dcp_metadata(folder: Path) -> Metadata:
    """`folder/.metadata` through the restricted unpickler, checked against the shard files beside it."""
    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except Exception as exc:  # UnsafePickle, truncated data, wrong types
        raise refused(path, exc) from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise refused(path, ValueError("it does not hold DCP metadata"))
    sizes: dict[str, int] = {}
    for info in md.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name != os.path.basename(name) or name in ("", ".", ".."):
            raise refused(path, ValueError(f"it names a shard outside its folder: {name!r}"))
        if name not in sizes:
            shard = Path(folder) / name
            sizes[name] = shard.stat().st_size if shard.is_file() else -1
        end = int(info.offset) + int(info.length)
        if sizes[name] < 0 or info.offset < 0 or info.length < 0 or end > sizes[name] or info.transform_descriptors:
            raise refused(path, ValueError(f"it points outside its shard file {name!r}"))
    md.storage_meta = md.storage_meta if isinstance(md.storage_meta, StorageMeta) else StorageMeta()
    md.shard_bytes = sum(max(s, 0) for s in sizes.values())  # bound for consolidated reads
    return md


class SafeReader(FileSystemReader):
    """torch DCP's file reader, with the metadata read by `read_dcp_metadata` (tensor shards were
    already read with `torch.load(weights_only=True)`)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:
            raise refused(Path(self.path), ValueError("per-rank DCP metadata is not written by this trainer"))
        md = read_dcp_metadata(Path(self.path))
        md.storage_meta.load_id = self.load_id
        return md


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner, but the non-tensor values (optimizer hyper-parameters) are read with
    `weights_only=True` instead of a full unpickle."""

    def load_bytes(self, read_item, value) -> None:
        with weights_only():
            super().load_bytes(read_item, value)


def dcp_tensor_shapes(md: Metadata, prefix: str) -> dict[str, TensorStorageMetadata]:
    """The tensors saved under `prefix` (e.g. 'model.'); refuses sizes the shard files cannot hold."""
    found = {k: m for k, m in md.state_dict_metadata.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    claimed = sum(m.size.numel() * m.properties.dtype.itemsize for m in found.values())
    if claimed > md.shard_bytes:
        raise CheckpointError(f"DCP metadata claims {claimed} bytes of '{prefix}' tensors but its shard files hold "
                          f"{md.shard_bytes}; the checkpoint is corrupt or crafted")
    return found
