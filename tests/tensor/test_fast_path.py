"""The eager fast path of elementwise ops (`tensor/elementwise.py`): inputs that all have the
layout the rules give their dims skip the planner and compute slice-wise; any other layout
takes the planned path, whose output follows the rules. Both give torch's numbers and
gradients."""

from __future__ import annotations

import pytest
import torch

import torchmesh as tm
from torchmesh.tensor import elementwise, reduce


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


def assert_torchs_numbers(outs: list, expected: list, a: torch.Tensor, r: torch.Tensor) -> None:
    """Each output's values equal torch's, and the gradient of a weighted sum of them reaches
    the source `a` as it reaches torch's leaf `r` (the weights tell the outputs apart)."""
    for o, e in zip(outs, expected):
        torch.testing.assert_close(o.full(), e.detach())
    sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
    sum((e * (i + 1)).sum() for i, e in enumerate(expected)).backward()
    torch.testing.assert_close(a.grad, r.grad)


# ---- reductions and softmax (`tensor/reduce.py`, `contraction.cached_run`) -------------------
def _no_planned_reduce(monkeypatch) -> list:
    planned: list = []
    monkeypatch.setattr(reduce, "run_op", lambda *args, **kw: planned.append(args) or None)
    return planned


def test_reductions_over_unsplit_dims_skip_the_planner_with_torchs_numbers(monkeypatch):
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp")
    a = torch.randn(4, 6, 5, requires_grad=True)
    x = tm.distribute(a, "batch ff d", mesh)

    def reductions():
        return [x.sum("d"), x.mean("d"), x.max("d"), x.min("d"), tm.softmax(x, "d"), tm.log_softmax(x, "d")]

    reductions()  # the first call plans and fills the cache
    planned = _no_planned_reduce(monkeypatch)
    outs = reductions()  # the second reads it
    assert not planned
    assert [o.layout for o in outs[:4]] == [{"batch": "dp", "ff": "tp"}] * 4
    monkeypatch.undo()  # the total below sums over split dims: planned
    r = a.detach().clone().requires_grad_()
    expected = [r.sum(2), r.mean(2), r.amax(2), r.amin(2), torch.softmax(r, 2), torch.log_softmax(r, 2)]
    assert_torchs_numbers(outs, expected, a, r)


def test_a_split_reduced_dim_still_all_reduces_on_every_call():
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp")
    t = torch.randn(4, 6)
    x = tm.distribute(t, "batch ff", mesh)
    for _ in range(2):
        with tm.comm_stats() as stats:
            s, p = x.sum("ff"), tm.softmax(x, "ff")
        assert stats.counts == {"all_reduce": 3}  # the sum; softmax's maximum and sum
        torch.testing.assert_close(s.full(), t.sum(1))
        torch.testing.assert_close(p.full(), torch.softmax(t, 1))


def test_an_axis_of_size_one_needs_no_all_reduce():
    mesh = tm.Mesh("dp:2;tp:1", rules="batch:dp;ff:tp")
    t = torch.randn(4, 6)
    with tm.comm_stats() as stats:
        s = tm.distribute(t, "batch ff", mesh).sum("ff")
    assert stats.counts == {}
    torch.testing.assert_close(s.full(), t.sum(1))


def test_the_cache_follows_scoped_rules_and_relayouts_once():
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp")
    t = torch.randn(4, 6)
    x = tm.distribute(t, "batch ff", mesh)
    assert x.sum("ff").layout == {"batch": "dp"}
    with mesh.rules_scope("ff:tp"):
        with tm.comm_stats() as stats:
            s = x.sum("ff")  # x is not in the scoped rules' layout: planned, relaid out
        assert stats.counts  # ff is now split: a collective ran
        torch.testing.assert_close(s.full(), t.sum(1))
    y = x.relayout("ff:tp")  # not the rules' layout; softmax along ff relays it out once
    for _ in range(2):
        with tm.comm_stats() as stats:
            p = tm.softmax(y, "ff")
        assert sum(stats.counts.values()) == 1, stats.counts
        torch.testing.assert_close(p.full(), torch.softmax(t, 1))


def test_an_invalid_reduction_raises_on_every_call():
    x = tm.zeros("batch:4 d:0", tm.Mesh("dp:2", rules="batch:dp"))
    for _ in range(2):
        with pytest.raises(tm.DimError, match="size 0"):
            x.max("d")


def test_operators_with_numbers_take_the_fast_path_in_python_s_argument_order(monkeypatch):
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp")
    a = torch.randn(4, 6, requires_grad=True)
    x = tm.distribute(a, "batch ff", mesh)
    planned = []
    monkeypatch.setattr(elementwise, "run_op", lambda *args, **kw: planned.append(args) or None)
    outs = [2 - x, x - 2, 3.0 / (x * x + 1), x**2, 2**x, -x + 0.5, x % 2.5, (x // 1).detach()]
    assert not planned
    r = a.detach().clone().requires_grad_()
    expected = [2 - r, r - 2, 3.0 / (r * r + 1), r**2, 2**r, -r + 0.5, r % 2.5, (r // 1).detach()]
    monkeypatch.undo()
    assert all(o.tensor_layout == x.tensor_layout for o in outs)
    assert_torchs_numbers(outs, expected, a, r)


def test_operators_on_other_operands_take_the_general_path():
    mesh = tm.Mesh("dp:2", rules="batch:dp")
    t = torch.randn(4, 6)
    x = tm.distribute(t, "batch ff", mesh)
    ints = tm.distribute(torch.arange(24).reshape(4, 6), "batch ff", mesh)
    torch.testing.assert_close((ints + True).full(), torch.arange(24).reshape(4, 6) + True)  # bool: general
    torch.testing.assert_close((ints / 2).full(), torch.arange(24).reshape(4, 6) / 2)  # torch's promotion
    y = tm.distribute(torch.ones(6), "ff", mesh)  # other dims: broadcast by name
    torch.testing.assert_close((x + y).full(), t + 1)
    with pytest.raises(tm.DimError, match="no dim names"):
        x + torch.ones(4, 6)


def test_an_input_broadcast_over_an_axis_is_summed_only_when_it_needs_a_gradient():
    """x replicated over tp meets w split over tp: x's gradient is summed over tp. An x that
    needs none (a constant, or under no_grad) runs no collective at all; one that does has
    its gradient all-reduced in backward (torch's gradient), on every call."""
    mesh = tm.Mesh("tp:2", rules="ff:tp")
    a, b = torch.randn(4, 6), torch.randn(6, 8)
    w = tm.distribute(b, "d ff", mesh, requires_grad=True)
    for _ in range(2):
        with tm.comm_stats() as stats:
            y = tm.einsum("batch d, d ff -> batch ff", tm.distribute(a, "batch d", mesh), w)  # x: a constant
            (y * y).mean("batch").backward(tm.ones("ff:8", mesh))
            with torch.no_grad():
                tm.einsum("batch d, d ff -> batch ff", tm.distribute(a, "batch d", mesh, requires_grad=True), w)
        assert stats.counts == {}
        torch.testing.assert_close(y.full(), a @ b)
    for _ in range(2):
        x = tm.distribute(a, "batch d", mesh, requires_grad=True)
        y = tm.einsum("batch d, d ff -> batch ff", x, w)
        with tm.comm_stats() as stats:
            y.backward(tm.ones("batch:4 ff:8", mesh))
        assert [(r.kind, r.phase) for r in stats.records] == [("all_reduce", "backward")]
        torch.testing.assert_close(x.grad.full(), b.sum(1).expand(4, 6))


def test_a_checked_einsum_skips_the_checks_only_for_the_same_equation_and_layouts(monkeypatch):
    """The second call of an einsum with the same equation and layouts skips parsing and the
    dim checks (the first call made them); anything else is checked, on every call."""
    from torchmesh.tensor import einsum as einsum_module

    mesh = tm.Mesh("tp:2", rules="ff:tp")
    x, w = tm.randn("batch:4 d:8", mesh, seed=0), tm.randn("d:8 ff:6", mesh, seed=1)
    parse, parsed = einsum_module.parse_equation, []
    monkeypatch.setattr(einsum_module, "parse_equation", lambda eq: parsed.append(eq) or parse(eq))
    for _ in range(3):
        y = tm.einsum("batch d, d ff -> batch ff", x, w)
    assert parsed == ["batch d, d ff -> batch ff"]
    torch.testing.assert_close(y.full(), x.full() @ w.full())
    for _ in range(2):  # the same equation, an operand with other dims: refused every time
        with pytest.raises(ValueError, match="operand 1 is written"):
            tm.einsum("batch d, d ff -> batch ff", x, tm.randn("d:8 e:6", mesh, seed=1))
        with pytest.raises(TypeError, match="not a MeshTensor"):
            tm.einsum("batch d, d ff -> batch ff", x, w.full())


# ---- ops planned once per layout and mesh (`contraction.cached_run`) --------------------------
def _count_plans(monkeypatch) -> list:
    from torchmesh.tensor import contraction

    planned: list = []
    plan_op = contraction.plan_op
    monkeypatch.setattr(contraction, "plan_op", lambda *args: planned.append(args[-1]) or plan_op(*args))
    return planned


def test_a_repeated_op_is_not_planned_again_and_gives_torchs_numbers(monkeypatch):
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp")
    x, w = tm.randn("batch:4 d:8", mesh, seed=0), tm.randn("ff:6 d:8", mesh, seed=1, requires_grad=True)
    ops = [
        lambda: tm.einsum("batch d, ff d -> batch ff", x, w),  # no collective
        lambda: tm.einsum("batch d, ff d -> batch", x, w),  # a finishing all-reduce over tp
        lambda: w.sum("ff"),  # a sum over a split dim
        lambda: w.mean("d"),  # a local sum and a product with a number
    ]
    first = [op() for op in ops]
    planned = _count_plans(monkeypatch)
    again = [op() for op in ops]
    assert planned == []
    for a, b in zip(first, again):
        assert a.tensor_layout == b.tensor_layout
        torch.testing.assert_close(a.full(), b.full())
    tx, tw = x.full(), w.full()
    torch.testing.assert_close(again[1].full(), (tx @ tw.T).sum(1))
    torch.testing.assert_close(again[3].full(), tw.mean(1))


def test_a_repeated_op_is_planned_again_under_other_rules_on_another_mesh_or_when_checking(monkeypatch):
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp")
    t = torch.randn(4, 6)
    x = tm.distribute(t, "batch ff", mesh)
    assert x.sum("batch").layout == {}
    planned = _count_plans(monkeypatch)
    with mesh.rules_scope("ff:tp"):  # other rules, another plan: the result is split over tp
        assert x.sum("batch").layout == {"ff": "tp"}
    assert x.sum("batch").layout == {}  # the mesh's own rules again: the first run, kept
    other = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp")  # the same layout on another mesh
    assert tm.distribute(t, "batch ff", other).relayout("batch:dp").sum("batch").layout == {"ff": "tp"}
    assert planned == ["sum", "sum"]
    mesh.impl.checking = True  # check mode names every op: the general path
    try:
        torch.testing.assert_close(x.sum("batch").full(), t.sum(0))
    finally:
        mesh.impl.checking = False
    assert len(planned) == 3
