"""tm.nn on XLA devices: the module tests of tests/nn/test_nn.py (forward and every gradient
against plain torch over the same global weights) with their meshes made on xla, and 20
AdamW steps of the TransformerLM of tests/nn/test_train_lm.py against single-device torch
(test_four_devices.py)."""

from __future__ import annotations

import os

import pytest
import test_moe as test_moe_sim
import test_nn
import test_train_lm as lm

import torchmesh as tm

DEVICES = int(os.environ.get("CPU_NUM_DEVICES", "4"))
MESHES = {4: ["dp:2;tp:2", "tp:4"], 8: ["dp:2;tp:4"]}[DEVICES]


def xla_mesh(spec: str) -> tm.Mesh:
    return tm.Mesh(spec, rules=lm.rules_for(spec), backend="xla")


@pytest.fixture(autouse=True)
def meshes_on_xla(monkeypatch):
    """test_nn's tests make their meshes with test_nn.make_mesh: make them on xla."""
    monkeypatch.setattr(test_nn, "make_mesh", xla_mesh)


MODULE_TESTS = [
    "test_linear_to_several_dims",
    "test_linear_contracting_a_split_dim",
    "test_embedding_with_split_vocab",
    "test_feed_forward",
    "test_cross_entropy_over_split_vocab",
]


@pytest.mark.parametrize("spec", MESHES)
@pytest.mark.parametrize("name", MODULE_TESTS if DEVICES == 4 else MODULE_TESTS[::2])
def test_module(name, spec):
    getattr(test_nn, name)(spec)


@pytest.mark.parametrize("spec", MESHES)
def test_attention(spec):
    test_nn.test_attention_causal_grouped(spec, 4 if "tp:4" in spec else 2)


MOE_CASES = {  # (mesh, rules, top_k, capacity_factor), from tests/nn/test_moe.py's meshes
    4: [
        ("dp:2;tp:2", "batch:dp;experts:dp;ff:tp", 2, 1.0),
        ("dp:4", "batch:dp;experts:dp", 1, 1.0),
        ("dp:2;ep:2", "batch:dp,ep;experts:ep", 2, 0.5),
    ],
    8: [("dp:2;tp:4", "batch:dp;experts:dp;ff:tp", 2, 0.5)],
}[DEVICES]


@pytest.mark.parametrize("mesh_spec,rules,top_k,capacity_factor", MOE_CASES)
def test_moe(mesh_spec, rules, top_k, capacity_factor):
    """tm.nn.MoE (routing, capacity, dispatch and combine) forward and backward vs torch."""
    cfg = test_moe_sim.config(top_k, capacity_factor=capacity_factor)
    mesh = tm.Mesh(mesh_spec, rules=rules, backend="xla")
    test_moe_sim.compare(test_moe_sim.run_moe(mesh, cfg), test_moe_sim.run_reference(cfg), f"xla {mesh_spec} {rules}")
