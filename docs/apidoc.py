"""Write docs/api.md, the API reference, from the docstrings of the public names.

    .venv/bin/python docs/apidoc.py           # rewrite docs/api.md
    .venv/bin/python docs/apidoc.py --check   # exit 1 if docs/api.md is out of date

Only the standard library's `inspect`: each name of a module's `__all__` gets a heading,
its signature and its docstring; a class also lists the public methods and properties it
defines itself. Doctest examples (`>>>` lines) become ```pycon blocks, which tests/test_docs.py
does not run as scripts (tests/test_api_docs.py runs them as doctests instead).
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

API_MD = Path(__file__).resolve().parent / "api.md"

# (module, how the docs spell its names, one line on what it holds); tests/test_api_docs.py
# requires an example for every class and function of the modules in EXAMPLES_REQUIRED.
MODULES = (
    ("torchmesh", "tm", "the core: meshes, MeshTensor, every op, printing, statistics, checkpoints."),
    ("torchmesh.nn", "tm.nn", "torch.nn modules over named dims whose parameters are MeshTensors."),
    ("torchmesh.optim", "tm.optim", "optimizers and gradient clipping over MeshTensor parameters."),
    ("torchmesh.mtf", "mtf", "Mesh TensorFlow's names and argument orders (`import torchmesh.mtf as mtf`)."),
    ("torchmesh.mtf.optimize", "mtf.optimize", "Mesh TF's optimizers with Mesh TF's update rules."),
    (
        "torchmesh.mtf.layers",
        "mtf.layers",
        "Mesh TF's layers (dense, layer_norm, attention, losses) and their variables.",
    ),
    ("torchmesh.mtf.transformer.attention", "mtf.transformer.attention", "Mesh TF's transformer attention."),
    ("torchmesh.mtf.transformer.moe", "mtf.transformer.moe", "Mesh TF's mixture of experts: top-2 gating, capacity."),
    ("torchmesh.planning", "tm.planning", "abstract evaluation, cost model and layout search (docs/planning.md)."),
    ("torchmesh.xla", "torchmesh.xla", "helpers of the xla backend: shardings, device blocks, compiled HLO."),
)
EXAMPLES_REQUIRED = tuple(module for module, _, _ in MODULES)

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class _Text(str):
    """An annotation written as a string, shown without quotes."""

    def __repr__(self) -> str:
        return self.strip("'\"")


def _unquoted(sig: inspect.Signature) -> inspect.Signature:
    def plain(annotation: object) -> object:
        return _Text(annotation) if isinstance(annotation, str) else annotation

    params = [p.replace(annotation=plain(p.annotation)) for p in sig.parameters.values()]
    return sig.replace(parameters=params, return_annotation=plain(sig.return_annotation))


def _signature(obj: object, drop_first: bool = False) -> str:
    """`(args) -> result` as written in the code, or "" where Python cannot tell; a method's
    signature without its first parameter (self, or the tensor a method is installed from)."""
    target = obj.__init__ if inspect.isclass(obj) and "__init__" in vars(obj) else obj
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return ""
    if inspect.isclass(obj) or drop_first:
        params = list(sig.parameters.values())[1:]
        returns = inspect.Signature.empty if inspect.isclass(obj) else sig.return_annotation
        sig = sig.replace(parameters=params, return_annotation=returns)
    return _ADDRESS.sub("", str(_unquoted(sig)))


def _markdown(doc: str) -> str:
    """A docstring as markdown: runs of doctest lines fenced as ```pycon, the rest as is."""
    out: list[str] = []
    in_example = in_fence = False
    for line in doc.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        starts_example = not in_fence and line.startswith(">>>")
        if starts_example and not in_example:
            out.append("```pycon")
            in_example = True
        elif in_example and not line.strip():
            out.append("```")
            in_example = False
        out.append(line)
    if in_example:
        out.append("```")
    return "\n".join(out)


def _members(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties a class defines itself, with a docstring."""
    found = []
    for name, member in vars(cls).items():
        if name.startswith("_") or not (getattr(member, "__doc__", None) or "").strip():
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if isinstance(member, property) or inspect.isfunction(member):
            found.append((name, member))
    return sorted(found)


def _member_lines(cls: type) -> list[str]:
    """One line per member; the elementwise methods (one docstring each) in one line."""
    lines, elementwise = [], []
    for name, member in _members(cls):
        summary = inspect.getdoc(member).split("\n\n")[0].replace("\n", " ")
        if summary.startswith("Elementwise "):
            elementwise.append(f"`.{name}`")
        elif isinstance(member, property):
            lines.append(f"- `.{name}` (property): {summary}")
        else:
            lines.append(f"- `.{name}{_signature(member, drop_first=True)}`: {summary}")
    if elementwise:
        lines.append(f"- elementwise, by name, no communication: {', '.join(elementwise)}")
    return lines


def _entry(prefix: str, name: str, obj: object) -> str:
    if not (inspect.isclass(obj) or callable(obj)):  # a constant: its value, not its type's docstring
        text = _ADDRESS.sub("", repr(obj))
        return f"### `{prefix}.{name}`\n\nvalue `{text if len(text) <= 300 else text[:300] + ' ...'}`"
    kind = "class" if inspect.isclass(obj) else "function"
    lines = [f"### `{prefix}.{name}`", "", f"{kind} `{name}{_signature(obj)}`"]
    if getattr(obj, "__name__", name) != name:
        lines[-1] += f", another name for `{prefix}.{obj.__name__}`"
    lines += ["", _markdown(inspect.getdoc(obj) or "(no docstring)")]
    if inspect.isclass(obj):
        members = _member_lines(obj)
        if members:
            lines += ["", "Methods and properties:", "", *members]
    return "\n".join(lines)


def _summary(obj: object) -> str:
    """The first sentence of the docstring, on one line (a constant: its kind)."""
    if not (inspect.isclass(obj) or callable(obj)):
        return f"a constant ({type(obj).__name__})"
    text = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ")
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    if len(sentence) > 120:
        sentence = sentence[:120].rsplit(" ", 1)[0] + " ..."
    return sentence.replace("|", "\\|")


def _anchor(prefix: str, name: str) -> str:
    """GitHub's anchor for the heading `### `prefix.name``."""
    return re.sub(r"[^a-z0-9_ -]", "", f"{prefix}.{name}".lower()).replace(" ", "-")


def public_modules() -> list[tuple[ModuleType, str, str]]:
    """The documented modules that exist in this checkout (optional ones may be missing)."""
    found = []
    for module_name, prefix, blurb in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        found.append((module, prefix, blurb))
    return found


def render() -> str:
    """The whole of docs/api.md."""
    parts = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/apidoc.py`; do not edit by hand",
        "(tests/test_api_docs.py fails when this file and the code disagree, and runs every",
        "example below as a doctest).",
        "",
    ]
    modules = public_modules()
    parts += [f"- [`{m.__name__}`](#{m.__name__.replace('.', '')}): {blurb}" for m, _, blurb in modules]
    for module, prefix, _ in modules:
        parts += ["", f"## {module.__name__}", ""]
        names = sorted(module.__all__, key=lambda n: (n.lower(), n))
        parts += ["| name | what it is |", "|---|---|"]
        parts += [f"| [`{prefix}.{n}`](#{_anchor(prefix, n)}) | {_summary(getattr(module, n))} |" for n in names]
        parts += ["", "\n\n".join(_entry(prefix, n, getattr(module, n)) for n in names)]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if API_MD.read_text() != text:
            print(f"{API_MD} is out of date: run python docs/apidoc.py")
            return 1
        return 0
    API_MD.write_text(text)
    print(f"wrote {API_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
