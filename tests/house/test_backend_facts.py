"""Backend facts live on the backend (issue 17.3): code outside `comm/` and `xla/` reads
`MeshImpl`'s facts, never a backend's name or a device type; each backend's facts have the
values its callers rely on; a Mesh is immutable and `rules_scope` is a context variable."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch
from harness import run_distributed

import torchmesh as tm
from torchmesh.comm.abstract import AbstractImpl
from torchmesh.comm.dist import DistImpl
from torchmesh.comm.sim import SimImpl
from torchmesh.errors import BackendError, MeshError
from torchmesh.xla.backend import XlaImpl

PACKAGE = Path(__file__).resolve().parents[2] / "torchmesh"
#: The folders that may know backends by name and devices by type.
BACKEND_FOLDERS = ("comm", "xla")

_NAMES = r"""["'](?:sim|dist|xla|abstract|meta)["']"""
#: A test of a backend's name or a device type (one line of source).
FORBIDDEN = [
    re.compile(r"\.backend\s*(?:==|!=)"),  # mesh.backend == ...
    re.compile(r"\bbackend\s*(?:==|!=)\s*[\"']"),  # backend == "dist"
    re.compile(r"\.type\s*(?:==|!=|in\b|not\s+in\b)"),  # t.device.type == "meta", device.type in (...)
    re.compile(_NAMES + r"\s*(?:==|!=|in\b|not\s+in\b)"),  # "xla" == name, "meta" in types
    re.compile(r"(?:==|!=)\s*" + _NAMES),  # name != "xla"
    re.compile(r"\bin\s*[(\[{][^)\]}]*" + _NAMES),  # kind in ("cpu", "meta")
]


def offending_lines(text: str) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if any(p.search(line) for p in FORBIDDEN)]


def test_no_backend_name_or_device_type_branch_outside_the_backends():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in BACKEND_FOLDERS:
            continue
        found += [f"torchmesh/{rel}:{n}: {line}" for n, line in offending_lines(path.read_text())]
    assert not found, "branch on a MeshImpl fact instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "line",
    [
        'if mesh.backend == "dist":',
        "    elif ref.mesh.backend != 'sim':",
        'if backend == "sim" and shape.size > 4096:',
        'if agreed.device.type == "meta":',
        'x._data[0].device.type != "meta"',
        'if torch.device(target).type == "meta":',
        "if any(t.device.type not in _STORAGE_DEVICES for t in ts):",
        'return "xla" == impl.name',
        'if name != "abstract":',
        '_STORAGE_DEVICES = ("cpu", "cuda", "meta"); ok = kind in ("cpu", "meta")',
    ],
)
def test_the_check_catches_a_planted_branch(line):
    assert offending_lines(f"x = 1\n{line}\n") == [(2, line.strip())]


@pytest.mark.parametrize(
    "line",
    [
        'mesh = tm.Mesh("dp:2", backend="abstract")',
        "if impl.checkpoint_form == 'per_rank':",
        "if not impl.holds_values:",
        '"""On the xla backend ..."""',
        'BACKENDS = {"sim": SimImpl, "dist": DistImpl}',
    ],
)
def test_the_check_passes_a_clean_line(line):
    assert offending_lines(line) == []


# ---- each backend's facts ---------------------------------------------------------------------
FACTS = (
    "holds_every_shard",
    "multi_process",
    "reads_values",
    "holds_values",
    "can_regather",
    "checkpoint_form",
    "defers_grad_sync",
    "all_reduces_in_place",
    "annotates",
)
EXPECTED = {
    SimImpl: (True, False, True, True, True, "global", True, False, False),
    DistImpl: (False, True, True, True, True, "per_rank", True, True, False),
    AbstractImpl: (False, False, False, False, True, "global", True, False, False),
    XlaImpl: (False, False, False, True, False, "global", False, False, True),
}


@pytest.mark.parametrize("impl", list(EXPECTED), ids=lambda c: c.name)
def test_each_backend_states_its_facts(impl):
    assert tuple(getattr(impl, f) for f in FACTS) == EXPECTED[impl]
    assert impl.max_devices == (4096 if impl is SimImpl else None)


def test_sim_facts_in_use():
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp")
    assert tuple(getattr(mesh.impl, f) for f in FACTS) == EXPECTED[SimImpl] and mesh.impl.device_mesh is None
    x = tm.randn("batch:4 d:2", mesh, seed=0)
    with pytest.raises(BackendError, match="holds all 4 devices' shards"):
        _ = x.local
    assert torch.equal(tm.randn("batch:4 d:2", tm.Mesh("dp:1"), seed=0).local, x.full())  # one device: its shard
    with pytest.raises(MeshError, match="a sim mesh holds at most 4096"):
        tm.Mesh("dp:4097")
    with pytest.raises(BackendError, match="needs the dist backend"):
        tm.to_dtensor(x)


def test_abstract_facts_in_use():
    mesh = tm.Mesh("dp:4097", rules="batch:dp", backend="abstract")  # no device limit of its own
    assert tuple(getattr(mesh.impl, f) for f in FACTS) == EXPECTED[AbstractImpl]
    x = tm.randn("batch:8194 d:2", mesh, seed=0)  # nothing drawn
    assert x.local.is_meta and tuple(x.local.shape) == (2, 2)
    tm.check_replicas(x)  # no values: nothing to compare, and no error


def dist_facts() -> dict:
    mesh = tm.Mesh("tp:2", rules="ff:tp", backend="dist")
    impl = mesh.impl
    x = tm.randn("ff:4", mesh, seed=0)
    return {
        "facts": tuple(getattr(impl, f) for f in FACTS),
        "device_mesh": type(impl.device_mesh).__name__,
        "local": tuple(x.local.shape),
    }


def test_dist_facts():
    for out in run_distributed(dist_facts, 2, timeout=120):
        assert out == {"facts": EXPECTED[DistImpl], "device_mesh": "DeviceMesh", "local": (2,)}


# ---- a Mesh is immutable; rules_scope is a context variable -----------------------------------
def test_mesh_is_immutable():
    mesh = tm.Mesh("tp:2", rules="ff:tp")
    for name, value in (("rules", tm.LayoutRules.parse("d:tp")), ("backend", "abstract"), ("new", 1)):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(mesh, name, value)
    with pytest.raises(AttributeError, match="immutable"):
        del mesh.impl
    assert str(mesh.rules) == "ff:tp" and mesh.backend == "sim" and not hasattr(mesh, "new")


def test_rules_scope_restores_and_stays_in_its_thread():
    mesh = tm.Mesh("tp:2", rules="ff:tp")
    x = tm.randn("d:4 ff:4", mesh, seed=0)
    seen = []
    with mesh.rules_scope("d:tp", replace=True):
        assert str(mesh.rules) == "d:tp"
        assert (x + 1).layout == {"d": "tp"}  # tensors made before the scope follow it
        with mesh.rules_scope("e:tp"):
            assert str(mesh.rules) == "d:tp;e:tp"
        assert str(mesh.rules) == "d:tp"
        other = threading.Thread(target=lambda: seen.append(str(mesh.rules)))
        other.start()
        other.join()
    assert seen == ["ff:tp"]  # another thread never saw the scope
    with pytest.raises(ValueError), mesh.rules_scope("d:tp", replace=True):
        raise ValueError
    assert str(mesh.rules) == "ff:tp" and (x + 1).layout == {"ff": "tp"}
