"""A tensor read by several ops that broadcast it over an axis (the q, k and v projections of
one activation under tensor parallelism) has its gradient summed over that axis once:
autograd adds the ops' gradients up first, then one all-reduce runs
(`contraction.summed_input`). The gradients are torch's."""

from __future__ import annotations

import torch

import torchmesh as tm


def _projections(mesh: tm.Mesh, x: tm.MeshTensor) -> tuple[tm.MeshTensor, list[tm.MeshTensor]]:
    ws = [tm.randn("d:8 heads:4", mesh, seed=i + 1, requires_grad=True) for i in range(3)]
    outs = [tm.einsum("batch d, d heads -> batch heads", x, w) for w in ws]
    loss = sum(((o * o) * (i + 1)).sum() for i, o in enumerate(outs))
    return loss, ws


def test_three_projections_of_one_input_sum_its_gradient_once():
    mesh = tm.Mesh("tp:2", rules="heads:tp")
    x = tm.randn("batch:4 d:8", mesh, seed=0, requires_grad=True)
    loss, ws = _projections(mesh, x)
    with tm.comm_stats() as stats:
        loss.backward()
    assert [(r.kind, r.axes, r.phase) for r in stats.records] == [("all_reduce", ("tp",), "backward")]

    ref = tm.Mesh("tp:1", rules="heads:tp")
    rx = tm.randn("batch:4 d:8", ref, seed=0).full().requires_grad_()
    rws = [tm.randn("d:8 heads:4", ref, seed=i + 1).full().requires_grad_() for i in range(3)]
    sum((((rx @ w) ** 2) * (i + 1)).sum() for i, w in enumerate(rws)).backward()
    torch.testing.assert_close(x.grad.full(), rx.grad)
    for w, rw in zip(ws, rws):
        torch.testing.assert_close(w.grad.full(), rw.grad)


def test_a_tensor_read_in_several_steps_gets_every_steps_gradient():
    """The summed form is kept on the tensor: a constant input read again in the next step
    (its own backward) reuses it, and each backward sums that step's gradient."""
    mesh = tm.Mesh("tp:2", rules="heads:tp")
    x = tm.randn("batch:4 d:8", mesh, seed=0, requires_grad=True)
    for _ in range(2):
        loss, _ = _projections(mesh, x)
        with tm.comm_stats() as stats:
            loss.backward()
        assert stats.counts == {"all_reduce": 1}
    first = x.grad.full() / 2
    x.grad = None
    loss, _ = _projections(mesh, x)
    loss.backward()
    torch.testing.assert_close(x.grad.full(), first)


def test_reads_over_other_axes_or_without_gradient_sum_apart():
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;heads:tp;ff:dp")
    x = tm.randn("batch:4 d:8", mesh, seed=0, requires_grad=True)
    w = tm.randn("d:8 heads:4", mesh, seed=1, requires_grad=True)
    v = tm.randn("d:8 ff:6", mesh, seed=2, requires_grad=True)
    with torch.no_grad():
        tm.einsum("batch d, d heads -> batch heads", x, w)  # no gradient: nothing kept
    assert x._summed is None
    a = tm.einsum("batch d, d heads -> batch heads", x, w)  # x broadcast over tp
    b = tm.einsum("d, d ff -> ff", x.sum("batch"), v)  # x.sum(...) broadcast over dp: another tensor
    with tm.comm_stats() as stats:
        ((a * a).sum() + (b * b).sum()).backward()
    backward = [r.axes for r in stats.records if r.phase == "backward"]
    assert backward.count(("tp",)) == 1
    ref = tm.Mesh("dp:1;tp:1", rules="batch:dp;heads:tp;ff:dp")
    rx, rw, rv = (
        tm.randn(d, ref, seed=s).full().requires_grad_()
        for d, s in (("batch:4 d:8", 0), ("d:8 heads:4", 1), ("d:8 ff:6", 2))
    )
    (((rx @ rw) ** 2).sum() + ((rx.sum(0) @ rv) ** 2).sum()).backward()
    for got, want in ((x, rx), (w, rw), (v, rv)):
        torch.testing.assert_close(got.grad.full(), want.grad)
