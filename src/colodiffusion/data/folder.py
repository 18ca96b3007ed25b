"""A folder of images with captions: same-name .txt files (a.jpg + a.txt), or a captions.jsonl /
captions.csv beside the images (fields: file name relative to that file's folder, and caption), or
diffusers' ImageFolder layout: a metadata.jsonl / metadata.csv with `file_name` and `text` (or the
column named by data.caption_column).

`FolderSubsets` reads several such folders as one dataset (data.subsets, or kohya's dataset TOML in
data.dataset_config), each with its own repeats, caption extension (data.caption_extension: .txt by
default, or .caption, ...), caption for images without one (class_tokens) and caption tag options.

kohya's folder convention is read too: images in a subfolder named `N_text` (e.g. `10_sks dog/`) are
repeated N times per epoch (`repeat_counts`, applied by data/views.py) and take `text` as their caption
when they have none of their own.

Images are found by extension (.jpg .jpeg .png .webp .bmp) but decoded by content; a file that
is empty, truncated, not an image, too large to read, or has no readable caption is a bad sample
(skipped, listed).

Nothing outside data.path is read because of what is inside it: an image or caption that is a link
leading out is a bad sample (`outside_folder`), a caption table that is one is refused, and a table
row naming a file outside the folder matches no image.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Optional

from colodiffusion.data.source import ImageSource
from colodiffusion.data.transforms import IMAGE_EXTS, MAX_TEXT_BYTES, BadSample, ImageTransform
from colodiffusion.storage.files import files_inside, inside, loads_json

CAPTION_FIELDS = ("caption", "text", "prompt")
FILE_FIELDS = ("file", "file_name", "image", "path")
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # "10_sks dog": 10 repeats, caption "sks dog"


def _pick(row: dict, names: tuple[str, ...]) -> Optional[str]:
    return next((row[n] for n in names if n in row and row[n] is not None), None)


def read_limited(path: Path, limit: int) -> bytes:
    """The file's bytes, or BadSample when it cannot be read or holds more than `limit` bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # never more than the limit in memory, even if the file grows
    except OSError as exc:
        raise BadSample("unreadable_file", str(exc)[:200]) from None
    if len(data) > limit:
        raise BadSample("too_large", f"'{path.name}' holds more than the {limit} bytes read into memory")
    return data


TABLES = ("captions.jsonl", "captions.csv", "metadata.jsonl", "metadata.csv")


def read_caption_table(table: Path, caption_column: str = "caption") -> dict[Path, str]:
    """{image path: caption} from a captions/metadata .jsonl or .csv (paths relative to its folder)."""
    rows: list[dict] = []
    if table.suffix == ".jsonl":
        for n, line in enumerate(table.read_text(encoding="utf-8", errors="replace").splitlines()):
            if line.strip():
                try:
                    rows.append(loads_json(line))
                except json.JSONDecodeError:
                    raise ValueError(f"line {n + 1} of '{table}' is not JSON") from None
                if not isinstance(rows[-1], dict):
                    raise ValueError(f"line {n + 1} of '{table}' is a JSON {type(rows[-1]).__name__}, not an object "
                                     f"with a file name and a caption ({{\"file_name\": ..., \"text\": ...}})")
    else:
        with open(table, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            try:
                rows = list(reader)
            except csv.Error as exc:  # e.g. a field over the csv module's 128 KiB limit
                raise ValueError(f"line {reader.line_num + 1} of '{table}' cannot be read as CSV ({exc}); captions "
                                 f"longer than {csv.field_size_limit() // 1024} KiB are not read") from None
    out = {}
    for row in rows:
        name, text = _pick(row, FILE_FIELDS), _pick(row, (caption_column, *CAPTION_FIELDS))
        if name is None:
            raise ValueError(f"'{table}' needs a file column ({', '.join(FILE_FIELDS)}) on every row")
        if text is not None:
            out[(table.parent / name).resolve()] = str(text)
    return out


class FolderDataset(ImageSource):
    name = "folder"

    def __init__(self, path: str, transform: ImageTransform, caption_column: str = "caption",
                 caption_extension: str = ".txt", class_tokens: Optional[str] = None):
        super().__init__(transform, str(path))
        self.caption_extension, self.class_tokens = caption_extension, class_tokens
        self.root = Path(path)
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not self.files:
            raise ValueError(f"data.path '{path}' holds no images ({', '.join(IMAGE_EXTS)})")
        self.table: dict[Path, str] = {}
        self.folder_info = [self._kohya(p) for p in self.files]  # (repeats, caption) per file, or None
        for name in TABLES:
            for table in files_inside(self.root, name):  # a table that links out is refused
                self.table.update(read_caption_table(table, caption_column))

    def __len__(self) -> int:
        return len(self.files)

    def _kohya(self, path: Path) -> Optional[tuple[int, str]]:
        parts = path.relative_to(self.root).parts
        match = KOHYA_FOLDER.match(parts[0]) if len(parts) > 1 else None
        return (int(match.group(1)), match.group(2).strip()) if match else None

    def repeat_counts(self) -> list[int]:
        """Passes per epoch of each image: N for images under a kohya `N_text/` subfolder, else 1."""
        return [info[0] if info else 1 for info in self.folder_info]

    def key(self, i: int) -> str:
        return str(self.files[i].relative_to(self.root))

    def _read(self, path: Path, limit: int) -> bytes:
        if not inside(path, self.root):  # a link out of the dataset: never read (a token file, /proc/...)
            raise BadSample("outside_folder", f"'{path.name}' is a link to a file outside data.path; links out "
                                              "of the dataset are not followed")
        return read_limited(path, limit)

    def raw(self, i: int):
        path = self.files[i]
        image = self._read(path, self.transform.max_image_bytes)
        caption = self.table.get(path.resolve())
        if caption is None:
            txt = path.with_suffix(self.caption_extension)
            caption = self._read(txt, MAX_TEXT_BYTES) if txt.is_file() else None
        if caption is None and self.folder_info[i]:
            caption = self.folder_info[i][1]
        if caption is None:
            caption = self.class_tokens
        return image, caption, None


class FolderSubsets(ImageSource):
    """Several folders as one source (data.subsets, or a kohya dataset TOML): each with its own
    repeats, caption file extension, caption for images without one, and caption tag options."""
    name = "folder"

    def __init__(self, subsets: list, transform: ImageTransform, caption_column: str = "caption"):
        super().__init__(transform, ", ".join(s.path for s in subsets))
        self.subsets = subsets
        self.folders = [FolderDataset(s.path, transform, caption_column, s.caption_extension, s.class_tokens)
                        for s in subsets]
        self.starts = [0]
        for folder in self.folders:
            self.starts.append(self.starts[-1] + len(folder))

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(subset number, index in that subset's folder)."""
        n = next(n for n in range(len(self.folders)) if i < self.starts[n + 1])
        return n, i - self.starts[n]

    def subset_of(self, i: int):
        return self.subsets[self.locate(i)[0]]

    def repeat_counts(self) -> list[int]:
        return [c * s.repeats for s, f in zip(self.subsets, self.folders) for c in f.repeat_counts()]

    def key(self, i: int) -> str:
        n, j = self.locate(i)
        return f"{Path(self.subsets[n].path).name}/{self.folders[n].key(j)}"

    def raw(self, i: int):
        n, j = self.locate(i)
        return self.folders[n].raw(j)
