"""Parquet files with encoded image bytes and captions (as written by img2dataset's parquet output,
Hugging Face `datasets` exports (image = {bytes, path}) or any pyarrow table).

`data.path` is a .parquet file, a folder of them, or a comma-separated list (fsspec URLs work);
the column names are `data.image_column` and `data.caption_column`. Rows are addressed as
(file, row group, row); a worker keeps its last few row groups decoded, so the block shuffle
(`data.shuffle=block`) keeps reads sequential within a row group.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from colodiffusion.data.source import ImageSource
from colodiffusion.data.transforms import BadSample, ImageTransform
from colodiffusion.data.webdataset import is_url
from colodiffusion.storage.files import files_inside

META_COLUMNS = ("punsafe", "pwatermark", "width", "height")


def expand_files(path: str) -> list[str]:
    files: list[str] = []
    for part in (p.strip() for p in path.split(",")):
        if not is_url(part) and Path(part).is_dir():
            files += [str(p) for p in files_inside(Path(part), "*.parquet")]  # no link out of the folder
        else:
            files.append(part)
    return files


def _open(path: str):
    import pyarrow.parquet as pq

    if is_url(path):
        import fsspec

        return pq.ParquetFile(fsspec.open(path, "rb").open())
    return pq.ParquetFile(path)


class ParquetDataset(ImageSource):
    name = "parquet"

    def __init__(self, path: str, transform: ImageTransform, image_column: str = "image",
                 caption_column: str = "caption", cache_row_groups: int = 4):
        super().__init__(transform, str(path))
        self.files = expand_files(path)
        self.image_column, self.caption_column = image_column, caption_column
        self.groups: list[tuple[int, int]] = []  # (file, row group)
        self.starts: list[int] = []
        self.columns: dict[int, list[str]] = {}
        n = 0
        for f, name in enumerate(self.files):
            try:
                pf = _open(name)
            except ImportError:  # pyarrow or fsspec missing: not this file's fault (build_dataset names the extra)
                raise
            except Exception as exc:  # pyarrow raises several types for unreadable files
                self.index_bad.append({"source": "parquet", "key": name, "reason": "unreadable_shard",
                                       "detail": str(exc)[:200]})
                continue
            names = pf.schema_arrow.names
            missing = [c for c in (image_column, caption_column) if c not in names]
            if missing:
                raise ValueError(f"parquet file '{name}' has no column {', '.join(repr(c) for c in missing)} "
                                 f"(it has {', '.join(names)}); set data.image_column / data.caption_column")
            self.columns[f] = [image_column, caption_column] + [c for c in META_COLUMNS if c in names]
            for rg in range(pf.num_row_groups):
                self.groups.append((f, rg))
                self.starts.append(n)
                n += pf.metadata.row_group(rg).num_rows
        self.n = n
        if n == 0:
            raise ValueError(f"data.path '{path}' holds no parquet rows")
        self.cache_row_groups = cache_row_groups
        self._cache: OrderedDict = OrderedDict()
        self._handles: dict = {}

    def __len__(self) -> int:
        return self.n

    def block_sizes(self) -> list[int]:
        """Rows per row group: the unit the block shuffle keeps together."""
        return [b - a for a, b in zip(self.starts, self.starts[1:] + [self.n])]

    def locate(self, i: int) -> tuple[int, int]:
        g = bisect_right(self.starts, i) - 1
        return g, i - self.starts[g]

    def key(self, i: int) -> str:
        g, row = self.locate(i)
        f, rg = self.groups[g]
        return f"{self.files[f]}:{rg}:{row}"

    def _table(self, g: int) -> dict:
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        f, rg = self.groups[g]
        try:
            pf = self._handles.get(f) or self._handles.setdefault(f, _open(self.files[f]))
            table = pf.read_row_group(rg, columns=self.columns[f]).to_pydict()
        except Exception as exc:  # a corrupt page or unreachable object: the rows of this group are bad
            raise BadSample("unreadable_shard", str(exc)[:200]) from None
        self._cache[g] = table
        if len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return table

    def raw(self, i: int):
        g, row = self.locate(i)
        table = self._table(g)
        image = table[self.image_column][row]
        if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
            image = image.get("bytes")
        meta: Optional[dict] = {c: table[c][row] for c in META_COLUMNS if c in table}
        return image, table[self.caption_column][row], meta

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_handles"] = OrderedDict(), {}
        return state
