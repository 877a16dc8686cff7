"""docs/porting-from-mesh-tensorflow.md stays honest: its tables are parsed, and

(a) every `mtf.X` / `mtf.layers.X` / `mtf.optimize.X` / `mtf.transformer.*.X` name in a column
    about torchmesh.mtf resolves in torchmesh.mtf;
(b) every row names at least one test; each named file exists, each `path::test_name` is a test
    defined there, and each of the row's names is used in a named file (as `.name`) or, for a
    row naming tests/test_api_docs.py's doctest runner, in an example (`>>>`) of its docstring;
(c) every public name of torchmesh.mtf (ops, layers, optimize, transformer.attention/moe) is
    in some row.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import torchmesh.mtf as mtf

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "porting-from-mesh-tensorflow.md"
DOCTEST_RUNNER = ("tests/test_api_docs.py", "test_docstring_example_holds")

# Names and paths a change in flight is adding (skipped while missing, checked once present).
# Empty: everything the guide maps exists.
IN_PROGRESS: frozenset[str] = frozenset()

NAME = re.compile(r"(?<![\w.])mtf(?:\.[A-Za-z_]\w*)+")
REF = re.compile(r"(?P<path>(?:tests|examples)/[\w/]+\.py)?(?:::(?P<test>\w+))?")
SEPARATOR = re.compile(r"\|(\s*:?-+:?\s*\|)+")
MODULES = {
    "mtf": mtf,
    "mtf.layers": mtf.layers,
    "mtf.optimize": mtf.optimize,
    "mtf.transformer.attention": mtf.transformer.attention,
    "mtf.transformer.moe": mtf.transformer.moe,
}


@dataclasses.dataclass(frozen=True)
class Row:
    line: int
    names: tuple[str, ...]  # mtf names in the columns about torchmesh.mtf
    refs: tuple[tuple[str, str | None], ...]  # (path, test name or None)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def checked_rows(text: str) -> list[Row]:
    """The rows of every table whose last column is "checked by"."""
    lines, rows, i = text.splitlines(), [], 0
    while i + 1 < len(lines):
        if not (lines[i].startswith("|") and SEPARATOR.fullmatch(lines[i + 1].strip())):
            i += 1
            continue
        header, i = _cells(lines[i]), i + 2
        mtf_columns = [c for c, title in enumerate(header) if "mtf" in title]
        while i < len(lines) and lines[i].startswith("|"):
            cells = _cells(lines[i])
            if header[-1].lower() == "checked by":
                assert len(cells) == len(header), f"line {i + 1}: {len(cells)} cells under {len(header)} columns"
                names = tuple(n for c in mtf_columns for n in NAME.findall(cells[c]))
                refs, path = [], None
                for ref in REF.finditer(cells[-1]):
                    if ref.group(0):  # a file, a file::test, or ::test in the file named before
                        path = ref["path"] or path
                        assert path, f"line {i + 1}: '{ref.group(0)}' follows no file"
                        refs.append((path, ref["test"]))
                rows.append(Row(i + 1, names, tuple(refs)))
            i += 1
    return rows


ROWS = checked_rows(GUIDE.read_text())


def resolve(name: str) -> tuple[Any, Any]:
    """(module, object) of an `mtf.a.b` name, importing as Mesh TF's `mtf.transformer.moe` does."""
    obj: Any = mtf
    module: Any = mtf
    for part in name.split(".")[1:]:
        obj = getattr(obj, part)
        if inspect.ismodule(obj):
            module = obj
    return module, obj


def aliases(name: str) -> set[str]:
    """The name's leaf and the other public names of its module bound to the same object
    (`mtf.mtf_abs` is `mtf.abs`)."""
    module, obj = resolve(name)
    return {name.rsplit(".", 1)[-1]} | {n for n in getattr(module, "__all__", ()) if getattr(module, n, None) is obj}


def missing(name: str) -> bool:
    """An in-progress name that does not exist yet."""
    if name not in IN_PROGRESS:
        return False
    try:
        resolve(name)
    except AttributeError:
        return True
    return False


def in_docstring_example(name: str) -> bool:
    doc = inspect.getdoc(resolve(name)[1]) or ""
    examples = [line for line in doc.splitlines() if line.lstrip().startswith((">>>", "..."))]
    return any(re.search(rf"\b{a}\b", line) for a in aliases(name) for line in examples)


def test_the_guide_has_its_tables():
    assert len(ROWS) >= 60
    names = {n for row in ROWS for n in row.names}
    assert {"mtf.einsum", "mtf.layers.dense", "mtf.optimize.AdafactorOptimizer", "mtf.gelu"} <= names


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"line{r.line}")
def test_names_resolve_and_tests_exist(row):
    for name in row.names:
        if not missing(name):
            resolve(name)  # (a): AttributeError names the missing part
    assert row.refs, f"line {row.line}: the row names no test"
    texts, skipped = [], False
    for path, test in row.refs:
        file = ROOT / path
        if not file.exists() and path in IN_PROGRESS:
            skipped = True
            continue
        assert file.exists(), f"line {row.line}: {path} does not exist"
        text = file.read_text()
        if test is not None:
            assert re.search(rf"^def {test}\(", text, re.M), f"line {row.line}: {path} defines no {test}"
        texts.append(text)
    doctested = any(ref == DOCTEST_RUNNER for ref in row.refs)
    for name in row.names:
        if missing(name) or skipped:
            continue
        used = any(re.search(rf"\.{a}\b", text) for a in aliases(name) for text in texts)
        assert used or (doctested and in_docstring_example(name)), (
            f"line {row.line}: {name} is used in none of {[p for p, _ in row.refs]}"
            + ("" if not doctested else " nor in its docstring's examples")
        )


@pytest.mark.parametrize("prefix", list(MODULES))
def test_every_public_mtf_name_is_in_the_guide(prefix):
    listed = {n for row in ROWS for n in row.names}
    absent = [f"{prefix}.{n}" for n in MODULES[prefix].__all__ if f"{prefix}.{n}" not in listed]
    assert not absent, f"public names the porting guide's tables do not map: {absent}"


def test_in_progress_lists_only_what_the_guide_maps():
    """The constant holds rows' names and files only (so it cannot silence anything else)."""
    mapped = {n for row in ROWS for n in row.names} | {path for row in ROWS for path, _ in row.refs}
    assert IN_PROGRESS <= mapped, sorted(IN_PROGRESS - mapped)


def test_a_broken_row_is_caught():
    """The checks above can fail: a made-up name, a missing test, a name no named test uses."""
    bad = checked_rows(
        "| Mesh TF = `torchmesh.mtf` | own | checked by |\n|---|---|---|\n"
        "| `mtf.layers.no_such_layer` | | `tests/mtf/test_layers.py::test_no_such_test` |\n"
        "| `mtf.cumsum` | | `tests/mtf/test_layers.py::test_dense` |\n"
    )
    assert [r.names for r in bad] == [("mtf.layers.no_such_layer",), ("mtf.cumsum",)]
    with pytest.raises(AttributeError):
        test_names_resolve_and_tests_exist(bad[0])
    with pytest.raises(AssertionError, match="used in none"):
        test_names_resolve_and_tests_exist(bad[1])
