"""A Hugging Face `datasets` dataset saved with `save_to_disk`, or its .arrow files, read with pyarrow.

`data.path` is the saved folder (state.json lists its .arrow files), a DatasetDict's folder (its
`train` split is used), one .arrow file, or a folder of them. The files are Arrow IPC streams,
memory-mapped: nothing is copied and the `datasets` package is not needed. Columns are
`data.image_column` (datasets' Image feature, a {bytes, path} struct, or raw bytes) and
`data.caption_column`. An image stored only as a path (not embedded) is a bad sample: the dataset
may not make us read files outside it. File names in state.json must stay inside the folder.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from pathlib import Path

from colodiffusion.data.source import ImageSource
from colodiffusion.data.transforms import BadSample, ImageTransform
from colodiffusion.storage.files import files_inside, loads_json

STATE_LIMIT = 1 << 20  # bytes of state.json / dataset_dict.json read


def _read_json(path: Path) -> dict:
    with open(path, "rb") as f:
        text = f.read(STATE_LIMIT + 1)
    if len(text) > STATE_LIMIT:
        raise ValueError(f"'{path}' is larger than {STATE_LIMIT} bytes; it is not a datasets state file")
    try:
        data = loads_json(text)
    except json.JSONDecodeError:
        raise ValueError(f"'{path}' is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' is not a JSON object")
    return data


def arrow_files(path: str) -> list[Path]:
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ValueError(f"data.path '{path}' does not exist")
    if (root / "dataset_dict.json").is_file():
        splits = _read_json(root / "dataset_dict.json").get("splits") or []
        if "train" not in splits or not (root / "train").is_dir():
            raise ValueError(f"data.path '{path}' is a DatasetDict without a train split (it has {splits}); "
                             "point data.path at one split's folder")
        return arrow_files(str(root / "train"))
    if (root / "state.json").is_file():
        entries = _read_json(root / "state.json").get("_data_files") or []
        names = [e.get("filename") if isinstance(e, dict) else None for e in entries]
        files = [(root / n).resolve() for n in names if isinstance(n, str)]
        outside = [n for n, f in zip(names, files) if not f.is_relative_to(root.resolve())]
        if outside or len(files) != len(names):
            raise ValueError(f"'{root / 'state.json'}' names a data file outside its folder or no file name "
                             f"({outside[:1]})")
        return files
    files = files_inside(root, "*.arrow")  # no link out of the folder
    if not files:
        raise ValueError(f"data.path '{path}' holds no .arrow files and no datasets state.json")
    return files


def _open(path: Path):
    import pyarrow as pa

    source = pa.memory_map(str(path))  # the table's buffers point into the map, which they keep open
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:  # the random-access file format (pyarrow.ipc.new_file) also ends in .arrow
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


class ArrowDataset(ImageSource):
    name = "arrow"

    def __init__(
        self, path: str, transform: ImageTransform, image_column: str = "image", caption_column: str = "caption"
    ):
        super().__init__(transform, str(path))
        self.files = arrow_files(path)
        self.image_column, self.caption_column = image_column, caption_column
        self.starts, self.kept, n = [], [], 0
        for f in self.files:
            try:
                table = _open(f)
                table.validate()
            except ImportError:
                raise
            except Exception as exc:  # pyarrow raises several types for unreadable files
                self.index_bad.append({"source": "arrow", "key": str(f), "reason": "unreadable_shard",
                                       "detail": str(exc)[:200]})
                continue
            missing = [c for c in (image_column, caption_column) if c not in table.column_names]
            if missing:
                raise ValueError(f"arrow file '{f}' has no column {', '.join(repr(c) for c in missing)} "
                                 f"(it has {', '.join(table.column_names)}); set data.image_column / "
                                 "data.caption_column")
            self.kept.append(f)
            self.starts.append(n)
            n += table.num_rows
        self.n = n
        if n == 0:
            raise ValueError(f"data.path '{path}' holds no rows")
        self._tables: dict = {}

    def __len__(self) -> int:
        return self.n

    def locate(self, i: int) -> tuple[int, int]:
        f = bisect_right(self.starts, i) - 1
        return f, i - self.starts[f]

    def key(self, i: int) -> str:
        f, row = self.locate(i)
        return f"{self.kept[f].name}:{row}"

    def raw(self, i: int):
        f, row = self.locate(i)
        try:
            table = self._tables.get(f) or self._tables.setdefault(f, _open(self.kept[f]))
            image = table.column(self.image_column)[row].as_py()
            caption = table.column(self.caption_column)[row].as_py()
        except Exception as exc:  # a file changed or damaged after indexing
            raise BadSample("unreadable_shard", str(exc)[:200]) from None
        if isinstance(image, dict):  # datasets' Image feature: {"bytes", "path"}
            if image.get("bytes") is None and image.get("path"):
                raise BadSample("image_not_embedded", f"image stored as the path '{str(image['path'])[:100]}', "
                                "not as bytes (save the dataset with save_to_disk, which embeds them)")
            image = image.get("bytes")
        return image, caption, None

    def __getstate__(self):  # memory maps stay in the process that opened them
        state = dict(self.__dict__)
        state["_tables"] = {}
        return state
