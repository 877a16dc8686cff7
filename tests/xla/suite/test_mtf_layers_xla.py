"""torchmesh.mtf.layers and mtf.transformer on XLA devices: a few case bodies of
tests/mtf/test_layers.py and tests/mtf/test_transformer.py (dense, multihead attention,
masked local attention with the length split, the MoE layer) on an xla b:2;m:2 mesh, each
against its plain-torch formula, forward and gradients; seeded weights equal the sim mesh's.
"""

from __future__ import annotations

import test_layers as layers
import test_transformer as transformer
import torch

import torchmesh as tm


def xla_mesh(rules: str) -> tm.Mesh:
    return tm.Mesh("b:2;m:2", rules=rules, backend="xla")


def test_dense_and_attention_on_xla():
    got = layers.case_dense(xla_mesh(layers.RULES))
    want = layers.case_dense(layers.one_device())
    assert torch.equal(got["w"].cpu(), want["w"])
    layers.case_multihead_attention(xla_mesh(layers.RULES))


def test_masked_local_attention_on_xla():
    layers.case_masked_local_attention(xla_mesh(layers.RULES_LOCAL), 2, 16, 3, 4, 2, 3, 4)


def test_moe_layer_on_xla():
    got = transformer.case_moe_layer(xla_mesh(transformer.RULES))
    want = transformer.case_moe_layer(transformer.one_device())
    assert torch.equal(got["wi"].cpu(), want["wi"])
    torch.testing.assert_close(got["y"], want["y"], rtol=1e-5, atol=1e-5)
