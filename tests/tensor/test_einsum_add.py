"""`einsum_add` (tm.nn.Linear's x·W + b): one op with one addmm per device where the
contraction needs no collective; after the all-reduce where it does. Values and gradients
equal torch's F.linear on every layout, and the collectives are those of einsum then add."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchmesh as tm
from torchmesh.tensor.einsum import einsum_add

RULES = {
    "column-parallel (ff split)": "batch:dp;ff:tp",
    "row-parallel (d split)": "batch:dp;d:tp",
    "replicated weight": "batch:dp",
    "both split": "d:dp;ff:tp",
}


@pytest.mark.parametrize("rules", RULES.values(), ids=RULES.keys())
def test_einsum_add_equals_linear_and_einsum_plus_bias(rules):
    mesh = tm.Mesh("dp:2;tp:2", rules=rules)
    x0, w0, b0 = (torch.randn(s, dtype=torch.float64) for s in ((4, 6), (6, 8), (8,)))
    x = tm.distribute(x0, "batch d", mesh, requires_grad=True)
    w = tm.distribute(w0, "d ff", mesh, requires_grad=True)
    b = tm.distribute(b0, "ff", mesh, requires_grad=True)
    with tm.comm_stats() as fused_stats:
        y = einsum_add("batch d, d ff -> batch ff", x, w, b)
    with tm.comm_stats() as plain_stats:
        plain = tm.einsum("batch d, d ff -> batch ff", x, w) + b
    assert fused_stats.counts == plain_stats.counts  # no collective added or dropped
    leaves = [t.clone().requires_grad_() for t in (x0, w0, b0)]
    ref = F.linear(leaves[0], leaves[1].T, leaves[2])
    torch.testing.assert_close(y.full(), ref.detach())
    torch.testing.assert_close(plain.full(), ref.detach())
    g = torch.randn(4, 8, dtype=torch.float64)
    (y * tm.distribute(g, "batch ff", mesh)).sum().backward()
    (ref * g).sum().backward()
    for got, want in zip((x, w, b), leaves):
        torch.testing.assert_close(got.grad.full(), want.grad)


def test_a_column_parallel_linear_runs_addmm_and_no_add():
    mesh = tm.Mesh("tp:2", rules="ff:tp")
    lin = tm.nn.Linear(mesh, "d:6", "ff:8", seed=0)
    x = tm.randn("batch:4 d:6", mesh, seed=1)
    with torch.profiler.profile() as prof:
        lin(x)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::addmm" in ops and "aten::add" not in ops


def test_other_dtypes_and_wrong_names_take_einsum_and_add():
    mesh = tm.Mesh("tp:2", rules="ff:tp")
    x, w = tm.ones("batch:2 d:3", mesh), tm.ones("d:3 ff:4", mesh)
    b = tm.distribute(torch.arange(4, dtype=torch.float64), "ff", mesh)
    y = einsum_add("batch d, d ff -> batch ff", x, w, b)  # float32 product + float64 bias: promoted
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.full(), torch.full((2, 4), 3.0, dtype=torch.float64) + torch.arange(4.0))
    with pytest.raises(tm.DimError, match="operand 0"):
        einsum_add("batch e, d ff -> batch ff", x, w, b)


def test_a_repeated_einsum_add_follows_the_dtypes():
    """The second call with the same layouts runs as planned before; a bias of another dtype
    (same layout) takes the einsum and the add, which promote as torch does."""
    mesh = tm.Mesh("tp:2", rules="ff:tp")
    x, w = tm.randn("batch:4 d:6", mesh, seed=0), tm.randn("d:6 ff:8", mesh, seed=1)
    b = tm.randn("ff:8", mesh, seed=2)
    for _ in range(2):
        y = einsum_add("batch d, d ff -> batch ff", x, w, b)
        assert y.dtype == torch.float32
    wide = b.to(torch.float64)
    assert wide.tensor_layout is b.tensor_layout
    y = einsum_add("batch d, d ff -> batch ff", x, w, wide)
    assert y.dtype == torch.float64
    ref = F.linear(x.full(), w.full().T) + wide.full()
    torch.testing.assert_close(y.full(), ref)
