"""`describe`: every key with its value, default, allowed values and docstring (`colodiffusion config --all`)."""

from __future__ import annotations

import ast
import dataclasses
import json
import textwrap
from pathlib import Path
from typing import Any

from colodiffusion.config import schema
from colodiffusion.config.schema import Config, _walk

def field_docs() -> dict[str, str]:
    """{key path: docstring} for every leaf key, read from the attribute docstrings in schema.py."""
    classes: dict[str, dict[str, str]] = {}
    for node in ast.parse(Path(schema.__file__).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef):
            pairs = zip(node.body, node.body[1:])
            classes[node.name] = {a.target.id: " ".join(b.value.value.split()) for a, b in pairs
                                  if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
                                  and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
                                  and isinstance(b.value.value, str)}
    docs: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                docs[prefix + f.name] = classes.get(type(node).__name__, {}).get(f.name, "")

    walk(Config(), "")
    return docs


def _show(value: Any) -> str:
    """A value as it would be written in a key=value override."""
    if isinstance(value, str) and value and value.strip() == value and value[0] not in "[{'\"":
        return value
    return json.dumps(value, default=dataclasses.asdict)  # (data.subsets holds SubsetConfig entries)


def describe(cfg: Config) -> str:
    """Every key with its value (and default, where they differ), its allowed values and its docstring."""
    docs = field_docs()
    defaults = {path: value for path, _, value in _walk(Config())}
    lines = []
    for path, f, value in _walk(cfg):
        line = f"{path} = {_show(value)}"
        if value != defaults[path]:
            line += f"  (default: {_show(defaults[path])})"
        allowed = [a for a in f.metadata.get("choices") or () if a is not None]
        if allowed:
            line += f"  [{' | '.join(allowed)}]"
        lines.append(line)
        lines.extend(textwrap.wrap(docs.get(path, ""), 100, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(lines)

