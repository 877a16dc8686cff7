"""Two-operand einsums are lowered to one (batched) matmul on permuted views; the lowering
must equal torch.einsum, values and gradients, for every way dims can be batch, left, right or
contracted, in any storage order, including empty dims."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchmesh.tensor.einsum import _as_matmul

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
