"""Every python code block in README.md and docs/*.md runs (so the docs never rot)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks():
    for path in FILES:
        for i, code in enumerate(BLOCK.findall(path.read_text())):
            yield pytest.param(code, id=f"{path.name}[{i}]")


def test_docs_have_python_blocks():
    assert len(list(_blocks())) >= 5


def exec_block(code: str) -> None:
    # A module in sys.modules: torch.compile (docs/compile.md) imports a function's module by name.
    module = types.ModuleType("__doc_block__")
    sys.modules[module.__name__] = module
    exec(compile(code, "<doc>", "exec"), module.__dict__)


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_block_runs(code, capsys):
    if 'backend="xla"' in code:  # torch-xla reads its devices at import: a fresh process on 4 CPU devices
        env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=280)
        assert out.returncode == 0, out.stderr[-3000:]
    elif 'backend="dist"' in code:  # a torchrun block: run it on 4 gloo processes
        from harness import run_distributed

        run_distributed(exec_block, 4, args=(code,))
    else:
        exec_block(code)
