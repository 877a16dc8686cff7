"""Every program of tests/support/programs.py on sim meshes, against plain torch."""

from __future__ import annotations

import pytest
from programs import MESHES_2, MESHES_4, PROGRAMS, compare, rules_for, run_program

import torchmesh as tm


@pytest.mark.parametrize("mesh_spec", ["dp:1;tp:1", *MESHES_2, *MESHES_4, "dp:2;tp:4"])
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_program_matches_torch(name, mesh_spec):
    mesh = tm.Mesh(mesh_spec, rules=rules_for(mesh_spec), backend="sim")
    got, records = run_program(name, mesh)
    compare(got, PROGRAMS[name][1](mesh), f"{name} on sim {mesh_spec}")
    if mesh.size == 1:
        assert records == []  # one device never communicates
