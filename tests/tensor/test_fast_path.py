"""The eager fast path of elementwise ops (`tensor/elementwise.py`): inputs that all have the
layout the rules give their dims skip the planner and compute slice-wise; any other layout
takes the planned path, whose output follows the rules. Both give torch's numbers and
gradients."""

from __future__ import annotations

import torch

import torchmesh as tm
from torchmesh.tensor import elementwise


def test_same_layout_inputs_take_the_fast_path_with_torchs_numbers(monkeypatch):
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp")
    a, b = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    x, y = tm.distribute(a, "batch ff", mesh), tm.distribute(b, "batch ff", mesh)
    planned = []
    monkeypatch.setattr(elementwise, "run_op", lambda *args, **kw: planned.append(args) or None)
    out = (x * y + 2) / (y.exp() + 1)
    assert not planned  # no plan was run
    assert out.tensor_layout == x.tensor_layout
    out.sum().backward()
    ra, rb = (t.detach().clone().requires_grad_() for t in (a, b))
    expected = (ra * rb + 2) / (rb.exp() + 1)
    expected.sum().backward()
    torch.testing.assert_close(out.full(), expected.detach())
    torch.testing.assert_close(a.grad, ra.grad)
    torch.testing.assert_close(b.grad, rb.grad)


def test_other_layouts_take_the_planned_path_and_follow_the_rules():
    mesh = tm.Mesh("dp:2", rules="batch:dp")
    t = torch.randn(4, 6)
    x = tm.distribute(t, "batch ff", mesh).relayout("ff:dp")  # not the rules' layout
    out = x + x
    assert out.layout == {"batch": "dp"}
    torch.testing.assert_close(out.full(), t + t)
    mixed = x + tm.distribute(t, "batch ff", mesh)
    assert mixed.layout == {"batch": "dp"}
    torch.testing.assert_close(mixed.full(), t + t)
