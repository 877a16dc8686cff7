"""tm.local_map on XLA devices: the cases of tests/tensor/test_local_map.py (forward and every
gradient against single-device torch, each device's block read from torch-xla), run inside
a manual-sharding region; uneven splits are refused with a BackendError."""

from __future__ import annotations

import doctest
import os

import pytest
import test_local_map as lm

import torchmesh as tm
import torchmesh.xla.manual as manual

MESHES = {4: ["dp:2;tp:2", "tp:4"], 8: ["dp:2;tp:4"]}[int(os.environ.get("CPU_NUM_DEVICES", "4"))]


@pytest.mark.parametrize("case", lm.CASES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spec", MESHES)
def test_case_on_xla(spec, case):
    case(lm.mesh_on(spec, lm.RULES[case], "xla"), (8, 6, 8))  # divisible by every split


def test_uneven_split_is_refused():
    mesh = lm.mesh_on(MESHES[0], "batch:dp;ch:tp", "xla")
    x = tm.randn("batch:4 seq:3 ch:5", mesh, seed=0)
    w = tm.randn("ch:5 k:3", mesh, seed=1)
    with pytest.raises(tm.BackendError, match=r"dim 'ch' of size 5 .* unevenly\. XLA pads uneven blocks"):
        tm.local_map(lm.conv, x, w, out_dims="batch seq ch")


@pytest.mark.skipif(MESHES[0] != "dp:2;tp:2", reason="the example's mesh has 4 devices")
def test_manual_region_example_holds():
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(manual.to_blocks, "to_blocks"):
        runner.run(test)
    assert runner.tries and not runner.failures
