"""No private name used across packages (issue 17, "Habits"). A package is a folder of
torchmesh (placement, comm, xla, tensor, nn, optim, checkpoint, planning) or the root. A name
`_x` defined in one package (a module-level name, a class member, an attribute assigned as
`obj._x = ...`, a `__slots__` entry) is that package's own: another package reads it through a
public name the owner gives it, so the owner can change its internals without breaking a caller
it cannot see. Read from the source with `ast`, naming the file and line."""

from __future__ import annotations

import ast
import textwrap
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "torchmesh"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of_module(root: Path, module: str) -> str | None:
    """The package ("" for the root) of a module of this tree; None for a module outside it."""
    parts = module.split(".")
    if parts[0] != root.name:
        return None
    if len(parts) > 1 and (root / parts[1]).is_dir():
        return parts[1]
    return ""


def _string_arguments(tree: ast.Module) -> set[int]:
    """ids of the string constants that name an attribute: getattr/hasattr/setattr/delattr's second
    argument, `d.get("_x")` / `d.pop("_x")` / `d.setdefault("_x")`, `d["_x"]`, `"_x" in d`."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            args = node.args[1:2] if name in ("getattr", "hasattr", "setattr", "delattr", "__setattr__") else []
            if name in ("get", "pop", "setdefault"):
                args = node.args[:1]
            ids.update(id(a) for a in args)
        elif isinstance(node, ast.Subscript):
            ids.add(id(node.slice))
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            ids.add(id(node.left))
    return ids


def _definitions(tree: ast.Module) -> set[str]:
    """The private names this module defines."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            found.add(node.attr)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__slots__" for t in node.targets):
            found.update(c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "setattr",
            "__setattr__",
        ):
            found.update(a.value for a in node.args[1:2] if isinstance(a, ast.Constant))
    return {n for n in found if isinstance(n, str) and _private(n)}


def crossings(root: Path = PACKAGE) -> list[str]:
    """'file:line: what' for each private name a module uses that another package defines."""
    trees = {path: ast.parse(path.read_text()) for path in sorted(root.rglob("*.py"))}
    package = {path: _package_of_module(root, _module_name(root, path)) for path in trees}
    owners: dict[str, set[str]] = defaultdict(set)
    for path, tree in trees.items():
        for name in _definitions(tree):
            owners[name].add(package[path] or "")

    found = []
    for path, tree in trees.items():
        here = package[path] or ""
        where = path.relative_to(root.parent)
        module = _module_name(root, path)
        base_package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        named = _string_arguments(tree)

        def other(name: str, here: str = here) -> bool:
            return bool(owners.get(name)) and here not in owners[name]

        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    up = base_package.split(".")[: len(base_package.split(".")) - node.level + 1]
                    source = ".".join(up + ([node.module] if node.module else []))
                theirs = _package_of_module(root, source)
                for alias in node.names:
                    if theirs is not None and theirs != here and _private(alias.name):
                        found.append(f"{where}:{node.lineno}: from {source} import {alias.name}")
            elif isinstance(node, ast.Attribute) and _private(node.attr) and other(node.attr):
                found.append(
                    f"{where}:{node.lineno}: {ast.unparse(node)} ({node.attr} is {sorted(owners[node.attr])}'s)"
                )
            elif (
                isinstance(node, ast.Constant)
                and id(node) in named
                and isinstance(node.value, str)
                and _private(node.value)
                and other(node.value)
            ):
                found.append(f"{where}:{node.lineno}: {node.value!r} ({node.value} is {sorted(owners[node.value])}'s)")
    return sorted(found, key=lambda f: (f.split(":")[0], int(f.split(":")[1])))


def test_no_private_name_crosses_a_package():
    found = crossings()
    assert not found, (
        "a module uses a private name another package defines; give the owner a public name "
        "(a property, a function) and use that:\n  " + "\n  ".join(found)
    )


def test_the_check_finds_a_planted_crossing(tmp_path):
    """The check on a small tree: the crossings planted in `b/` are found, the uses it allows are not."""
    root = tmp_path / "pkg"
    sources = {
        "__init__.py": "",
        "a/__init__.py": "",
        "a/m.py": """
            _table = {}
            def _helper(): ...
            class Box:
                __slots__ = ("_data",)
                def __init__(self, d):
                    self._data = d
                def public(self):
                    return self._data, _helper()  # its own: fine
            def fill(module):
                object.__setattr__(module, "_specs", {})
        """,
        "a/n.py": """
            from pkg.a.m import _helper, _table  # the same package: fine
            def use(box):
                return box._data, _helper(), _table
        """,
        "b/__init__.py": "",
        "b/user.py": """
            import torch
            from pkg.a import m
            from pkg.a.m import _helper
            from ..a.m import Box, _table
            class Mine:
                def __init__(self):
                    self._own = 1
                def f(self, box):
                    return self._own, torch._C, box.__class__, box.public()  # allowed
                def g(self, box, module):
                    return box._data, m._table, module.__dict__.get("_specs"), getattr(box, "_data")
        """,
    }
    for rel, text in sources.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    found = [f.split(" (")[0] for f in crossings(root)]
    assert found == [
        "pkg/b/user.py:4: from pkg.a.m import _helper",
        "pkg/b/user.py:5: from pkg.a.m import _table",
        "pkg/b/user.py:12: box._data",
        "pkg/b/user.py:12: m._table",
        "pkg/b/user.py:12: '_specs'",
        "pkg/b/user.py:12: '_data'",
    ], found
