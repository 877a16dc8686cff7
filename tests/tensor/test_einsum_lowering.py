"""Two-operand einsums are lowered to one (batched) matmul on permuted views; the lowering
must equal torch.einsum, values and gradients, for every way dims can be batch, left, right or
contracted, in any storage order, including empty dims."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchmesh.tensor.einsum import _as_addmm, _as_matmul

NAMES = "abcde"


@st.composite
def equations(draw):
    a = tuple(draw(st.permutations(NAMES))[: draw(st.integers(0, 4))])
    b = tuple(draw(st.permutations(NAMES))[: draw(st.integers(0, 4))])
    union = sorted(set(a) | set(b))
    keep = [n for n in union if (n in a) != (n in b) or draw(st.booleans())]
    out = tuple(draw(st.permutations(keep)))
    sizes = {n: draw(st.integers(0, 3)) for n in NAMES}
    return a, b, out, sizes


@settings(max_examples=300, deadline=None)
@given(equations())
def test_matmul_lowering_equals_torch_einsum(case):
    a, b, out, sizes = case
    lowered = _as_matmul(a, b, out)
    assert lowered is not None  # every dim of one operand only is in the output here
    x = torch.randn([sizes[n] for n in a], dtype=torch.float64, requires_grad=True)
    y = torch.randn([sizes[n] for n in b], dtype=torch.float64, requires_grad=True)
    ref = torch.einsum(f"{''.join(a)},{''.join(b)}->{''.join(out)}", x, y)
    got = lowered(x, y)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(got, (x, y), g), torch.autograd.grad(ref, (x, y), g))


def test_dims_summed_within_one_operand_are_left_to_torch_einsum():
    assert _as_matmul(("a", "b"), ("b", "c"), ("c",)) is None  # a is summed inside x alone


@settings(max_examples=150, deadline=None)
@given(equations(), st.data())
def test_addmm_lowering_equals_einsum_plus_bias(case, data):
    """`_as_addmm` (Linear's per-device kernel): one addmm where the shapes allow, else the
    product and a broadcast add; always einsum(a, b) + c with c over some output dims."""
    a, b, out, sizes = case
    c = tuple(data.draw(st.permutations(out))[: data.draw(st.integers(0, len(out)))])
    x = torch.randn([sizes[n] for n in a], dtype=torch.float64, requires_grad=True)
    y = torch.randn([sizes[n] for n in b], dtype=torch.float64, requires_grad=True)
    z = torch.randn([sizes[n] for n in c], dtype=torch.float64, requires_grad=True)
    letters = {n: n for n in NAMES}
    ref = torch.einsum(f"{''.join(a)},{''.join(b)}->{''.join(out)}", x, y) + torch.einsum(
        f"{''.join(c)}->{''.join(letters[n] for n in out if n in c)}", z
    ).reshape([sizes[n] if n in c else 1 for n in out])
    got = _as_addmm(a, b, c, out)(x, y, z)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(got, (x, y, z), g), torch.autograd.grad(ref, (x, y, z), g))


def test_a_linear_layer_runs_one_addmm_per_device():
    left, right = ("batch", "seq"), ("heads", "d_head")
    fn = _as_addmm(("batch", "seq", "d_model"), ("d_model", "heads", "d_head"), right, left + right)
    x, w, bias = torch.randn(2, 3, 4), torch.randn(4, 2, 5), torch.randn(2, 5)
    with torch.profiler.profile() as prof:
        out = fn(x, w, bias)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::addmm" in ops and "aten::add" not in ops and "aten::mm" not in ops
    torch.testing.assert_close(out, torch.einsum("bsd,dhe->bshe", x, w) + bias)


def test_addmm_lowering_lines_up_contracted_dims_stored_in_different_orders():
    fn = _as_addmm(("x", "k1", "k2"), ("k2", "k1", "y"), ("y",), ("x", "y"))
    a, b, c = (torch.randn(s, dtype=torch.float64) for s in ((2, 3, 4), (4, 3, 5), (5,)))
    torch.testing.assert_close(fn(a, b, c), torch.einsum("xij,jiy->xy", a, b) + c)
