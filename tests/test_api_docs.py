"""The API reference: every public name has a docstring with an example, every example holds
(run as a doctest), and docs/api.md is what docs/apidoc.py writes from the code today."""

from __future__ import annotations

import doctest
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("apidoc", ROOT / "docs" / "apidoc.py")
apidoc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(apidoc)

PUBLIC = [
    (f"{module.__name__}.{name}", getattr(module, name))
    for module, _, _ in apidoc.public_modules()
    for name in module.__all__
]
# Every class and function of these modules needs an example (constants have no docstring).
SURFACE = [
    (name, obj)
    for name, obj in PUBLIC
    if name.rsplit(".", 1)[0] in apidoc.EXAMPLES_REQUIRED and (inspect.isclass(obj) or callable(obj))
]
# Examples run here, in one CPU process; torchmesh.xla's need the XLA runtime, so they run in
# a process of their own (test_xla_docstring_examples_hold).
DOCTESTED = [(name, obj) for name, obj in PUBLIC if not name.startswith("torchmesh.xla.")]


def _has_example(doc: str) -> bool:
    return ">>>" in doc or "```" in doc


def test_public_names_are_found():
    names = {name for name, _ in PUBLIC}
    assert {"torchmesh.Mesh", "torchmesh.einsum", "torchmesh.nn.Linear", "torchmesh.mtf.Dimension"} <= names


def test_every_public_name_has_a_docstring_with_an_example():
    missing = [name for name, obj in SURFACE if not _has_example(inspect.getdoc(obj) or "")]
    assert not missing, f"public names whose docstring has no example (a >>> line or a code block): {missing}"


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    seen, tests = set(), []
    for name, obj in DOCTESTED:
        if id(obj) in seen or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        seen.add(id(obj))
        for test in finder.find(obj, name):
            if test.examples and test.name not in {t.name for t in tests}:
                tests.append(test)
    return tests


@pytest.mark.parametrize("test", _doctests(), ids=lambda t: t.name)
def test_docstring_example_holds(test):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=lambda text: pytest.fail(text, pytrace=False))
    assert runner.failures == 0


XLA_DOCTESTS = """
import doctest, sys
import torchmesh.xla as xla

finder = doctest.DocTestFinder(exclude_empty=True)
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
for name in xla.__all__:
    for test in finder.find(getattr(xla, name), "torchmesh.xla." + name):
        runner.run(test)
print(runner.summarize(verbose=False))
sys.exit(1 if runner.failures or not runner.tries else 0)
"""


def test_xla_docstring_examples_hold():
    """torchmesh.xla's examples, on 4 virtual CPU XLA devices in a fresh process (torch-xla
    reads its devices when it is imported)."""
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}
    out = subprocess.run(
        [sys.executable, "-c", XLA_DOCTESTS], capture_output=True, text=True, env=env, timeout=280, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_api_md_is_up_to_date():
    up_to_date = apidoc.API_MD.read_text() == apidoc.render()
    assert up_to_date, "docs/api.md differs from the docstrings: run .venv/bin/python docs/apidoc.py"


# ---- the documents link each other correctly ----------------------------------------------------

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")


def test_readme_links_every_doc():
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in DOCS[1:] if f"docs/{p.name}" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    targets = [t for t in LINK.findall(doc.read_text()) if "://" not in t and not t.startswith("mailto:")]
    missing = [t for t in targets if not (doc.parent / t).exists()]
    assert not missing, f"{doc.name} links to files that do not exist: {missing}"


# ---- the output the guides show is what their blocks print ------------------------------------

GUIDES = ["tutorial.md", "concepts.md", "from-dtensor.md", "porting-from-mesh-tensorflow.md"]
SHOWN = re.compile(r"```python\n((?:(?!```).)*)```\n\n```text\n((?:(?!```).)*)```", re.S)


def _shown_outputs():
    for name in GUIDES:
        for i, (code, shown) in enumerate(SHOWN.findall((ROOT / "docs" / name).read_text())):
            if 'backend="dist"' not in code and 'backend="xla"' not in code:  # sim blocks only
                yield pytest.param(code, shown, id=f"{name}[{i}]")


@pytest.mark.parametrize(("code", "shown"), list(_shown_outputs()))
def test_shown_output_is_what_the_block_prints(code, shown, capsys):
    """A ```text block right after a python block shows lines of its output, in order ('...'
    stands for lines left out), so printed pictures and numbers cannot drift from the code."""
    exec(compile(code, "<doc>", "exec"), {"__name__": "__doc_block__"})
    printed = iter(line.rstrip() for line in capsys.readouterr().out.splitlines())
    expected = [line.rstrip() for line in shown.splitlines() if line.strip() not in ("", "...")]
    missing = [line for line in expected if not any(line == p for p in printed)]
    assert not missing, f"lines shown in the doc but not printed (in this order): {missing}"
