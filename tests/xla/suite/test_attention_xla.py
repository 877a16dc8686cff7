"""tm.attention on XLA devices: cases of tests/tensor/test_attention.py (forward and every gradient
against torch's scaled_dot_product_attention on the full tensors), with the mesh made on xla,
each device's block read from torch-xla (see conftest.py). On xla each device program sees
the global tensors, so the fused kernel runs whatever the rules (the partitioner splits it);
the einsum route is taken for dropout."""

from __future__ import annotations

import os

import pytest
import test_attention as attention
from reference import rules_on

import torchmesh as tm

DEVICES = int(os.environ.get("CPU_NUM_DEVICES", "4"))
MESHES = {4: ["dp:2;tp:2"], 8: ["dp:2;tp:4"]}[DEVICES]
CASES = [  # (case, rules): heads split (uneven: 3 over tp), queries split, keys split, grouped heads
    ("causal", "heads:tp;kv_heads:tp"),
    ("cross_causal_scale", "seq:tp;heads:dp"),
    ("bool_mask_causal", "kv_seq:tp;batch:dp"),
    ("grouped", "batch:dp;heads:tp;kv_heads:tp"),
]


def xla_mesh(spec: str, rules: str = "") -> tm.Mesh:
    return tm.Mesh(spec, rules=rules_on(spec, rules), backend="xla")


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case,rules", CASES if DEVICES == 4 else CASES[::2])
def test_attention_matches_torch(case, rules, mesh_spec):
    attention.run_case(xla_mesh(mesh_spec, rules), case)


@pytest.mark.parametrize("mesh_spec", MESHES[:1])
def test_dropout_matches_one_device(mesh_spec, monkeypatch):
    monkeypatch.setattr(attention, "make_mesh", xla_mesh)
    attention.test_dropout_is_layout_invariant(mesh_spec, "kv_seq:tp;seq:dp")
