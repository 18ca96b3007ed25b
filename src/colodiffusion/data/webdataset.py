"""Tar shards in the webdataset / img2dataset layout (000000.jpg + 000000.txt + 000000.json, ...).

`data.path` is a brace pattern (`shards/{00000..01023}.tar`, `shards/{a,b}.tar`), a comma-separated
list of those (commas inside braces belong to the pattern), or a folder;
local paths or fsspec URLs (`s3://...` with the optional extra `colodiffusion[s3]`). The tar headers
are scanned once into an index of (shard, sample, member offsets), cached as JSON under
RUN_DIR/data_index/ and reused while the shards' sizes are unchanged. With that index the shards
are read like any map-style dataset: the loader's seeded per-epoch permutation, rank x worker
sharding and exact mid-epoch resume work unchanged.

Shards that cannot be opened, corrupt tar headers (the members behind them are recovered) and
members cut off by a truncated shard are recorded as bad samples while indexing; a member larger
than the transform's byte limit is a bad sample, never read (its size is the tar header's claim).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from colodiffusion.data.source import ImageSource
from colodiffusion.data.transforms import MAX_TEXT_BYTES, BadSample, ImageTransform
from colodiffusion.storage.files import files_inside, loads_json

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "caption", "text")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's key/extension split
INDEX_VERSION = 1


def is_url(path: str) -> bool:
    return "://" in path


def split_top_level(pattern: str) -> list[str]:
    """Split on the commas outside braces: `a/{0,1}.tar,b.tar` -> [`a/{0,1}.tar`, `b.tar`]."""
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(pattern):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(pattern[start:k])
            start = k + 1
    parts.append(pattern[start:])
    return [p.strip() for p in parts if p.strip()]


def expand_urls(pattern: str) -> list[str]:
    """Brace patterns, comma lists and folders (all *.tar inside) -> shard list."""
    from braceexpand import UnbalancedBracesError, braceexpand

    urls: list[str] = []
    for part in split_top_level(pattern):
        if not is_url(part) and Path(part).is_dir():
            urls += [str(p) for p in files_inside(Path(part), "*.tar")]  # no link out of the folder
            continue
        try:
            urls += list(braceexpand(part))
        except UnbalancedBracesError:
            raise ValueError(f"data.path '{pattern}' has unbalanced braces in '{part}'") from None
    return urls


def _fs_open(url: str):
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with most installs
        raise BadSample("unreadable_shard", "reading URLs needs fsspec: pip install 'colodiffusion[s3]'") from None
    return fsspec.open(url, "rb").open()


def _size(url: str) -> int:
    if is_url(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return int(fs.info(path)["size"])
    return os.path.getsize(url)


def scan_shard(url: str) -> dict:
    """{url, size, samples: [[key, {ext: [offset, size]}]], bad: [records]} from the tar headers."""
    entry = {"url": url, "size": -1, "samples": [], "bad": []}
    try:
        entry["size"] = size = _size(url)
        f = _fs_open(url) if is_url(url) else open(url, "rb")
    except (OSError, BadSample, ValueError) as exc:
        entry["bad"].append(
            {"source": "webdataset", "key": url, "reason": "unreadable_shard", "detail": str(exc)[:200]}
        )
        return entry
    samples: dict[str, dict] = {}
    expected, pos = 0, 0  # expected: where the next header should start; a jump means skipped blocks
    with f:
        while pos is not None:
            try:
                f.seek(pos)
                for m in tarfile.open(fileobj=f, mode="r:", ignore_zeros=True):
                    if m.offset > expected:
                        entry["bad"].append(_corrupt(url, expected, "unreadable tar header(s) at bytes "
                                                                    f"{expected}-{m.offset}"))
                    expected = m.offset_data + (m.size + 511) // 512 * 512
                    match = _KEY_EXT.match(m.name)
                    if m.isfile() and match:
                        complete = m.offset_data + m.size <= size
                        samples.setdefault(match.group(1), {})[match.group(2).lower()] = [
                            m.offset_data,
                            m.size if complete else -1,
                        ]
                pos = None
            except (tarfile.TarError, OSError, EOFError) as exc:
                if pos == 0 and not samples and expected == 0:
                    entry["bad"].append({"source": "webdataset", "key": url, "reason": "unreadable_shard",
                                         "detail": str(exc)[:200]})
                    return entry
                entry["bad"].append(_corrupt(url, expected, str(exc)[:200]))
                pos = _next_header(f, max(expected, pos) + 512, size)  # resynchronise on the next good header
                expected = pos or size
    entry["samples"] = [[k, v] for k, v in samples.items()]
    return entry


def _corrupt(url: str, offset: int, detail: str) -> dict:
    return {"source": "webdataset", "key": f"{url}@{offset}", "reason": "corrupt_tar", "detail": detail}


def _next_header(f, pos: int, size: int) -> Optional[int]:
    """The offset of the next block that parses as a tar header (checksum included), or None."""
    while pos + 512 <= size:
        f.seek(pos)
        try:
            tarfile.TarInfo.frombuf(f.read(512), tarfile.ENCODING, "surrogateescape")
            return pos
        except tarfile.HeaderError:
            pos += 512
    return None


def build_index(urls: list[str], cache_file: Optional[Path], threads: int = 16) -> list[dict]:
    """Scan every shard (in threads: object storage is latency-bound), reusing a cached index whose
    shard sizes still match."""
    cached = {}
    if cache_file is not None and cache_file.is_file():
        try:
            data = loads_json(cache_file.read_text())
            if data.get("version") == INDEX_VERSION:
                cached = {e["url"]: e for e in data["shards"]}
        except (OSError, ValueError, KeyError):
            cached = {}

    def get(url: str) -> dict:
        old = cached.get(url)
        if old is not None and old["size"] >= 0:
            try:
                if _size(url) == old["size"]:
                    return old
            except OSError:
                pass
        return scan_shard(url)

    with ThreadPoolExecutor(max(1, min(threads, len(urls)))) as pool:
        shards = list(pool.map(get, urls))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": INDEX_VERSION, "shards": shards}))
        os.replace(tmp, cache_file)
    return shards


def index_file_for(index_dir: str, pattern: str) -> Path:
    digest = hashlib.sha1(pattern.encode()).hexdigest()[:12]
    return Path(index_dir) / f"webdataset-{digest}.json"


class WebDataset(ImageSource):
    name = "webdataset"

    def __init__(self, pattern: str, transform: ImageTransform, index_file: Optional[Path] = None):
        super().__init__(transform, pattern)
        self.urls = expand_urls(pattern)
        if not self.urls:
            raise ValueError(f"data.path '{pattern}' names no tar shards")
        self.shards = build_index(self.urls, index_file)
        self.index_bad = [b for s in self.shards for b in s["bad"]]
        counts = [len(s["samples"]) for s in self.shards]
        self.starts = [sum(counts[:k]) for k in range(len(counts))]
        self.n = sum(counts)
        if self.n == 0:
            raise ValueError(f"the shards of data.path '{pattern}' hold no readable samples")
        self._files: dict = {}
        self._pid = -1

    def __len__(self) -> int:
        return self.n

    def block_sizes(self) -> list[int]:
        """Samples per shard: the unit the block shuffle keeps together."""
        return [len(s["samples"]) for s in self.shards]

    def locate(self, i: int) -> tuple[dict, list]:
        k = bisect_right(self.starts, i) - 1
        return self.shards[k], self.shards[k]["samples"][i - self.starts[k]]

    def key(self, i: int) -> str:
        shard, (key, _) = self.locate(i)
        return f"{shard['url']}:{key}"

    def _read(self, url: str, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # a forked worker must not share file offsets with its parent
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(url)
        if f is None:
            if len(self._files) >= 64:
                self._files.pop(next(iter(self._files))).close()
            f = self._files[url] = _fs_open(url) if is_url(url) else open(url, "rb")
        if not is_url(url):
            data = os.pread(f.fileno(), size, offset)
        else:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise BadSample("corrupt_tar_member", f"short read at byte {offset}")
        return data

    def member(self, url: str, members: dict, names: tuple[str, ...], limit: int) -> Optional[bytes]:
        for ext in names:
            if ext in members:
                offset, size = members[ext]
                if size < 0:
                    raise BadSample("corrupt_tar_member", f"'{ext}' member is cut off by the end of the shard")
                if size > limit:  # the size is the tar header's claim: never allocate it unchecked
                    raise BadSample("too_large", f"'{ext}' member has {size} bytes, over the {limit} read into memory")
                try:
                    return self._read(url, offset, size)
                except OSError as exc:
                    raise BadSample("unreadable_shard", str(exc)[:200]) from None
        return None

    def raw(self, i: int):
        shard, (_, members) = self.locate(i)
        url = shard["url"]
        image = self.member(url, members, IMAGE_KEYS, self.transform.max_image_bytes)
        if image is None:
            raise BadSample("missing_image", f"no {'/'.join(IMAGE_KEYS)} member")
        caption = self.member(url, members, CAPTION_KEYS, MAX_TEXT_BYTES)
        meta = None
        if "json" in members:
            try:
                meta = loads_json(self.member(url, members, ("json",), MAX_TEXT_BYTES))
            except (ValueError, UnicodeDecodeError):
                meta = None  # metadata is optional; a broken json only disables the metadata filters
        return image, caption, meta

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, -1
        return state
