"""Source scan: weights load only through safetensors or `torch.load(weights_only=True)`; no
pickle, no hub code, no `trust_remote_code` anywhere in the package."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "colodiffusion"
UNSAFE_MODULES = {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def scan(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        where = path.relative_to(root.parent)
        if "trust_remote_code" in text:
            problems.append(f"{where}: mentions trust_remote_code")
        tree = ast.parse(text)
        for call in _calls(tree):
            name = _name(call.func)
            head, _, last = name.rpartition(".")
            if head.split(".")[0] in UNSAFE_MODULES and last in ("load", "loads", "Unpickler"):
                problems.append(f"{where}:{call.lineno}: unpickles with {name}")
            if name in ("torch.load", "torch.serialization.load"):
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in call.keywords)
                if not ok:
                    problems.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
    return problems


def test_package_loads_weights_safely():
    assert scan(SRC) == []


def test_the_scan_catches_unsafe_code(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "bad.py").write_text(
        "import torch\nimport pickle\n"
        "d = pickle.loads(b'')\na = torch.load('x')\nb = torch.load('x', weights_only=False)\nc = torch.load('x', weights_only=True)\n"
        "m = Model.from_pretrained('x', trust_remote_code=True)\n"
    )
    found = scan(pkg)
    assert len([p for p in found if "weights_only" in p]) == 2
    assert any("pickle" in p for p in found) and any("trust_remote_code" in p for p in found)
