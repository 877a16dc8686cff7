"""torchmesh.mtf's ops on XLA devices: a few of tests/mtf/test_mtf_ops.py's case bodies (Mesh TF's
top_k with its gradient, its x^2 + x gradient, selection, one_hot/gather, cumsum, slicing) run on
an xla mesh; random values and a default-initialised variable equal the sim mesh's.
"""

from __future__ import annotations

import os

import test_mtf_ops as ops
import torch

import torchmesh as tm
import torchmesh.mtf as mtf

M = int(os.environ.get("CPU_NUM_DEVICES", "4")) // 2  # b:2;m:2 on 4 devices, b:2;m:4 on 8


def xla_mesh(rules: str) -> tm.Mesh:
    return tm.Mesh(f"b:2;m:{M}", rules=rules, backend="xla")


def test_mesh_tf_cases_on_xla():
    ops.case_top_k(tm.Mesh(f"rows:2;cols:{M}", rules="a:rows;b:cols", backend="xla"))
    ops.case_x_squared_plus_x(xla_mesh(ops.RULES))


def test_ops_on_xla():
    for rules in (ops.RULES, ops.RULES_V):
        mesh = xla_mesh(rules)
        ops.case_selection(mesh)
        ops.case_one_hot_gather(mesh)
        ops.case_cumsum(mesh)
        ops.case_slicing(mesh)


def test_random_and_variables_equal_sim_on_xla():
    want = ops.case_random(ops.one_device())
    got = ops.case_random(xla_mesh(ops.RULES))
    for k in want:  # xla may fuse u * (max - min) + min: equal to a rounding
        torch.testing.assert_close(got[k].cpu(), want[k], rtol=1e-6, atol=1e-6, msg=k)
    tm.manual_seed(5)
    w = mtf.get_variable(xla_mesh(ops.RULES_V), "w", [ops.DM, ops.VOCAB])
    tm.manual_seed(5)
    assert torch.equal(w.full().detach().cpu(), mtf.get_variable(ops.one_device(), "w", [ops.DM, ops.VOCAB]).full())
