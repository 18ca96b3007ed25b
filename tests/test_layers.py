"""The package's imports point down its layers and never form a cycle (imports inside functions count).

From the bottom: config -> diffusion, storage -> models -> generate (sampling) -> data -> parallel ->
train -> commands (cli, export, evaluate, bench). A module may import its own layer's package and
anything below; diffusion and storage sit side by side and do not import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = "colodiffusion"
SRC = Path(__file__).resolve().parents[1] / "src" / PKG
LAYERS = [
    {"config", "lifeline", "__init__"},
    {"diffusion", "storage"},
    {"models"},
    {"generate"},
    {"data"},
    {"parallel"},
    {"train"},
    {"cli", "export", "evaluate", "bench", "bench_args", "__main__"},
]
COMMANDS = LAYERS[-1]


def module_sources(root: Path = SRC) -> dict[str, str]:
    """{dotted module name: source} for every .py file of the package."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = [PKG, *f.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f.read_text()
    return out


def imports(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body. `from a.b import c` names the
    module a.b.c when that is a module, else a.b."""
    edges: dict[str, set[str]] = {}
    for name, src in sources.items():
        found = set()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == PKG}
            elif (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.level == 0
                and node.module.split(".")[0] == PKG
            ):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if sub in sources else node.module)
        edges[name] = {m for m in found if m != name}
    return edges


def group(module: str) -> str:
    """The layer group a module belongs to: its first package below colodiffusion (commands are one group)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return "commands" if top in COMMANDS else top


def level(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, deps in edges.items() for b in deps
                  if group(a) != group(b) and level(b) >= level(a))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_import_points_down_a_layer():
    edges = imports(module_sources())
    assert len(edges) > 40  # the scan really read the package
    assert upward(edges) == []


def test_no_import_cycles():
    assert cycles(imports(module_sources())) == []


def test_the_checks_catch_an_upward_import_and_a_cycle():
    # A storage module that reaches into the loop, and two models modules that import each other
    # inside functions: the shapes this layout forbids.
    fake = {
        "colodiffusion.config": "",
        "colodiffusion.storage.checkpoint": "def f():\n    from colodiffusion.train import signals\n",
        "colodiffusion.train.signals": "from colodiffusion.config import X\n",
        "colodiffusion.models.a": "def f():\n    import colodiffusion.models.b\n",
        "colodiffusion.models.b": "from colodiffusion.models import a\n",
    }
    edges = imports(fake)
    assert upward(edges) == ["colodiffusion.storage.checkpoint -> colodiffusion.train.signals"]
    assert cycles(edges) == [["colodiffusion.models.a", "colodiffusion.models.b"]]
