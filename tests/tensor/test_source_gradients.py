"""Gradients that flow back into the torch tensor a MeshTensor was distributed from, on sim:
exactly the single-device gradient, whatever the replication (each block counted once, not
once per replica), and through `x.full()` too (every replica's block gets it)."""

from __future__ import annotations

import pytest
import torch

import torchmesh as tm

CASES = [("b:2;m:2", "batch:b"), ("b:2;m:2", ""), ("b:2;m:2", "batch:b;d:m"), ("b:4", "d:b"), ("b:2;m:2", "batch:b,m")]


def _reference(fn) -> torch.Tensor:
    t = torch.arange(24.0).reshape(4, 6).div(7).requires_grad_()
    fn(t).backward()
    return t.grad


@pytest.mark.parametrize(("mesh_spec", "rules"), CASES)
def test_gradient_into_source_through_ops(mesh_spec, rules):
    mesh = tm.Mesh(mesh_spec, rules=rules)
    t = torch.arange(24.0).reshape(4, 6).div(7).requires_grad_()
    x = tm.distribute(t, "batch d", mesh)
    (x * x).sum().backward()
    torch.testing.assert_close(t.grad, _reference(lambda u: (u * u).sum()), rtol=0, atol=0)


@pytest.mark.parametrize(("mesh_spec", "rules"), CASES)
def test_gradient_into_source_through_full(mesh_spec, rules):
    mesh = tm.Mesh(mesh_spec, rules=rules)
    t = torch.arange(24.0).reshape(4, 6).div(7).requires_grad_()
    x = tm.distribute(t, "batch d", mesh)
    (x.exp().full() * torch.arange(6.0)).sum().backward()
    torch.testing.assert_close(t.grad, _reference(lambda u: (u.exp() * torch.arange(6.0)).sum()))
