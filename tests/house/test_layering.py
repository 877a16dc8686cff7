"""The package's import graph: one layer per folder, every import downhill, no circle
(docs/design.md, "Layers"). Read from the source with `ast`, so it fails on the import that
goes up, naming the file and line, before anything runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "torchmesh"

#: Lowest first. A module may import its own folder or a folder of a lower layer, never one
#: beside it or above it. `errors` and `arguments` (checks of user arguments) are the base every
#: layer raises from;
#: the package root (`torchmesh/__init__.py`, `mtf`, `__main__`) is the public face on top.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("torchmesh.errors",),
    ("torchmesh.arguments",),
    ("torchmesh.placement",),
    ("torchmesh.comm",),
    ("torchmesh.xla",),
    ("torchmesh.tensor",),
    ("torchmesh.nn",),
    ("torchmesh.optim", "torchmesh.checkpoint"),
    ("torchmesh.planning",),
    ("torchmesh",),
)

#: The one deliberate deferred import (an import inside a function): none is needed today.
DEFERRED_ALLOWED: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").exists() or (PACKAGE.parent / rel / "__init__.py").exists()


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """Imports under `if TYPE_CHECKING:` are for type checkers only: no runtime edge."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids.update(id(n) for b in node.body for n in ast.walk(b))
    return ids


def imports() -> list[tuple[str, str, int, bool]]:
    """(importer, imported module, line, deferred) for every torchmesh import in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
            for target in targets:
                if target == "torchmesh" or target.startswith("torchmesh."):
                    found.append((name, target, node.lineno, id(node) not in top))
    return found


def layer(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def folder(module: str) -> str:
    """The layer prefix a module belongs to (its folder, or the root module itself)."""
    return max((p for ps in LAYERS for p in ps if module == p or module.startswith(p + ".")), key=len)


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        assert layer(_module_name(path)) >= 0, _module_name(path)


def test_imports_go_downhill():
    up = [
        f"{a} (line {line}) imports {b}: layer {layer(a)} -> {layer(b)}"
        for a, b, line, _ in imports()
        if folder(a) != folder(b) and layer(b) >= layer(a)
    ]
    assert not up, "imports against the layering:\n" + "\n".join(up)


def test_no_import_circle():
    graph: dict[str, set[str]] = {}
    for a, b, _, _ in imports():
        if a != b and not a.startswith(b + ".") and b != "torchmesh":  # a package's own __init__
            graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_deferred_imports():
    deferred = {(a, b) for a, b, _, lazy in imports() if lazy}
    assert deferred <= DEFERRED_ALLOWED, f"imports inside functions: {sorted(deferred - DEFERRED_ALLOWED)}"


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a placement module importing tensor is reported."""
    assert layer("torchmesh.placement.layout") < layer("torchmesh.tensor.mesh_tensor")
    assert layer("torchmesh.planning.cli") > layer("torchmesh.nn.transformer")
    assert folder("torchmesh.errors") != folder("torchmesh.tensor.mesh")
