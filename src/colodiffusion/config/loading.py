"""Loading a `Config`: the schema's defaults, then YAML file(s), then `key=value` overrides; validated.

`load_config` fails with one `ConfigError` sentence that names the key.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from colodiffusion.config.compat import (MOVED_KEYS, SEED_KEYS, SEED_OVERRIDES, _flat_keys, _refuse_seed_layout,
                                         moved_to_engine)
from colodiffusion.config.errors import ConfigError
from colodiffusion.config.schema import Config, _walk
from colodiffusion.config.validation import validate

def _allowed_keys(node: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else ""


def _node_at(path: str) -> Any:
    node: Any = Config()
    for part in path.split(".")[:-1]:
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            return None
        node = getattr(node, part)
    return node


def _friendly(exc: OmegaConfBaseException, where: str, given: str = "?") -> ConfigError:
    key = getattr(exc, "full_key", None) or given
    msg = str(exc).splitlines()[0]
    section = _node_at(key + ".x")
    if dataclasses.is_dataclass(section):  # a section (train.ema, parallel.deepspeed) given a value
        return _section_error(key, where, section)
    if "is not a ListConfig" in msg:
        return ConfigError(f"config key '{key}' in {where} must be a list (a YAML list, or {key}='[a, b]' on "
                           "the command line).")
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        ours = SEED_OVERRIDES.get(key) or SEED_KEYS.get(key)
        if ours:  # a key of the seed's (or latent-diffusion's) configs: name ours
            return ConfigError(f"config key '{key}' in {where} is the seed's; use {ours} here.")
        parent = _node_at(key)
        allowed = _allowed_keys(parent) if parent is not None else _allowed_keys(Config())
        return ConfigError(f"unknown config key '{key}' in {where}; allowed keys here are: {allowed}.")
    if "Value '" in msg or "could not be converted" in msg or "Invalid type" in msg:
        return ConfigError(f"config key '{key}' in {where} has the wrong type ({msg}).")
    return ConfigError(f"config key '{key}' in {where} is invalid: {msg}")



def _section_error(key: str, where: str, section: Any) -> ConfigError:
    return ConfigError(f"config key '{key}' in {where} is a section, not a value; its keys are: "
                       f"{_allowed_keys(section)}.")


def _checked_sections(raw: Any, where: str, node: Any = None, prefix: str = "") -> Any:
    """A YAML file's `raw` dict with its empty sections (`train:` with every key commented out) dropped; a
    section given a value (`parallel: {deepspeed: 3}`) is one sentence naming its keys (OmegaConf's merge
    error does not say which key)."""
    node = Config() if node is None else node
    if not isinstance(raw, dict):
        return raw
    out = {}
    for key, value in raw.items():
        child = getattr(node, key, None) if isinstance(key, str) else None
        if dataclasses.is_dataclass(child) and value is None:
            continue  # an empty section: its defaults
        if dataclasses.is_dataclass(child) and not isinstance(value, dict):
            raise _section_error(prefix + key, where, child)
        out[key] = _checked_sections(value, where, child, f"{prefix}{key}.") if dataclasses.is_dataclass(child) \
            else value
    return out


def _text_not_mapping(data: Any, path: Path) -> bool:
    """Whether a file YAML read as a mapping is text: its keys are not names (a line of words), or it is one
    bare word (`{word: None}`, which a file without any ':' is; read again only in that case)."""
    if any(not isinstance(k, str) or len(k) > 64 or not k.strip() or any(c.isspace() for c in k) for k in data):
        return True
    bare = len(data) == 1 and next(iter(data.values())) is None
    return bare and ":" not in path.read_text(encoding="utf-8", errors="replace")


def _yaml_where(exc: Exception, path: Path) -> str:
    """' at line L, column C: what was wrong' from a YAML error (1-based, as editors count)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None:
        return f": {(str(exc).splitlines() or [''])[0]}"
    where = f" at line {mark.line + 1}, column {mark.column + 1}: {problem or 'syntax error'}"
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None:
        where += f" ({context} that starts at line {start.line + 1}, column {start.column + 1})"
    try:
        line = path.read_text(errors="replace").splitlines()[mark.line]
    except (OSError, IndexError):
        line = ""
    if "\t" in line[:mark.column + 1]:
        where += "; YAML cannot indent with tabs, use spaces"
    return where + "."


def refuse_interpolations(node: Any, where: str, prefix: str = "") -> None:
    """ConfigError for any `${...}` in a config's raw values: values are taken as written and never
    resolved, so an environment variable (a token) cannot be copied into config.yaml, sample prompts,
    tracker names or an exported model's metadata."""
    if isinstance(node, dict):
        for key, value in node.items():
            refuse_interpolations(value, where, f"{prefix}{key}.")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            refuse_interpolations(value, where, f"{prefix}{i}.")
    elif isinstance(node, str) and "${" in node:
        raise ConfigError(f"config key '{prefix.rstrip('.')}' in {where} is an interpolation ({node[:80]!r}); "
                          "values are taken as written and ${...} is never resolved, so that no environment "
                          "variable or secret lands in config.yaml, prompts or tracker names: write the value itself.")


def load_config(path: Optional[str | os.PathLike | list] = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file(s) at `path` (a list is merged left to right, as the seed's `-b a b`),
    then `key=value` overrides; validated."""
    schema = OmegaConf.structured(Config)
    merged = schema
    paths = [] if path is None else list(path) if isinstance(path, (list, tuple)) else [path]
    required: set[str] = set()  # keys a recipe marks '???' (and no later file sets): the user must give them
    for p in map(Path, paths):
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist.")
        try:
            data = OmegaConf.load(p)
        except Exception as exc:  # YAML syntax errors come in many types
            raise ConfigError(f"config file '{p}' is not valid YAML{_yaml_where(exc, p)}") from None
        if not OmegaConf.is_dict(data):
            raise ConfigError(f"config file '{p}' holds a {type(OmegaConf.to_container(data)).__name__}; a config "
                              "is a mapping of sections (run:, model:, data:, train:, ...), see configs/.")
        if _text_not_mapping(data, p):  # not echoed: it may be a token or a password file given by mistake
            raise ConfigError(f"config file '{p}' is not a config: its top level is not a mapping of sections "
                              "(run:, model:, data:, train:, ...); see configs/.")
        _refuse_seed_layout(data, p)
        raw = OmegaConf.to_container(data, resolve=False)
        refuse_interpolations(raw, f"'{p}'")
        checked = moved_to_engine(_checked_sections(raw, f"'{p}'"), f"'{p}'")
        if checked != raw:
            data = OmegaConf.create(checked)
        try:
            merged = OmegaConf.merge(merged, data)
        except OmegaConfBaseException as exc:
            raise _friendly(exc, f"'{p}'") from None
        missing = set(OmegaConf.missing_keys(data))  # (merge keeps a value over '???', so read them from the file)
        given = set(_flat_keys(OmegaConf.to_container(data, resolve=False))) if OmegaConf.is_dict(data) else set()
        required = (required - given) | missing
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=200).")
        key = item.split("=", 1)[0]
        if key in MOVED_KEYS:
            key, item = MOVED_KEYS[key], MOVED_KEYS[key] + "=" + item.split("=", 1)[1]
        if "${" in item.split("=", 1)[1]:
            refuse_interpolations({key: item.split("=", 1)[1]}, f"override '{key}=...'")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _friendly(exc, f"override '{item}'", key) from None
        except Exception as exc:
            raise ConfigError(f"override '{item}' for key '{key}' could not be parsed: {exc}.") from None
        required.discard(key)
    if required:
        keys = [k for k, _, _ in _walk(Config()) if k in required] or sorted(required)
        files = ", ".join(f"'{p}'" for p in paths)
        leave, them = "leave" if len(paths) > 1 else "leaves", "them" if len(keys) > 1 else "it"
        raise ConfigError(f"{' and '.join(keys)} must be given: {files} {leave} {them} "
                          f"to you ('???', see the comment at its top); add {' '.join(k + '=...' for k in keys)} "
                          "to the command line.")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _friendly(exc, "the config") from None
    validate(cfg)
    return cfg



def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
