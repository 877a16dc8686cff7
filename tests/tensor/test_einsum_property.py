"""Property test: random einsums under random layout rules on a sim "dp:2;tp:2" mesh equal
torch.einsum, forward and backward, shard by shard.

Dim names, sizes (multiples of 4), rules (a dim over dp, tp, both, or none), 1-3 operand
specs, and for some operands a layout of their own to hold them in are drawn at random.
A draw whose layout is invalid (two dims of one tensor on one axis) must raise
`tm.LayoutError` (a ValueError), and only then; any other exception fails. Partial sums must
be completed (all-reduce or reduce-scatter) exactly when a contracted dim has a rule.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import assert_matches, torch_randn

import torchmesh as tm

MESH = "dp:2;tp:2"
NAMES = ["a", "b", "c", "d", "e"]
RULE_CHOICES = [(), ("dp",), ("tp",), ("dp", "tp"), ("tp", "dp")]
TOL = {"rtol": 1e-4, "atol": 1e-4}


@st.composite
def problems(draw):
    n = draw(st.integers(2, 5))
    names = draw(st.permutations(NAMES))[:n]
    sizes = {d: draw(st.sampled_from([4, 8])) for d in names}
    rules = {d: draw(st.sampled_from(RULE_CHOICES)) for d in names}
    n_ops = draw(st.integers(1, 3))
    operands = [
        draw(st.lists(st.sampled_from(names), unique=True, min_size=1, max_size=min(n, 3))) for _ in range(n_ops)
    ]
    planted = draw(st.booleans())
    if planted:
        # plant a contracted dim c and an output dim o whose rules start with the same axis:
        # c must take it (partial sums), o is then computed whole and split afterwards
        c, o = names[0], names[1]
        axis = draw(st.sampled_from(["dp", "tp"]))
        rules[c], rules[o] = (axis, *(a for a in rules[c] if a != axis)), (axis,)
        operands = [[d for d in op if d != o] or [c] for op in operands][:2]
        operands[0] = [c, *(d for d in operands[0] if d != c)]
        operands.append([o])
    used = list(dict.fromkeys(d for op in operands for d in op))
    out = draw(st.permutations(used))[: draw(st.integers(0, len(used)))]
    if planted:
        out = [d for d in out if d != names[0]]
        out = out if names[1] in out else [*out, names[1]]
    # some operands are held in a layout of their own instead of the rules' (None: the rules')
    held = [draw(st.none() | st.fixed_dictionaries({d: st.sampled_from(RULE_CHOICES) for d in op})) for op in operands]
    return sizes, rules, operands, list(out), held


def invalid(dims: list[str], rules: dict) -> bool:
    """True when two dims of this tensor are split over one axis (docs/design.md, "Model")."""
    axes = [a for d in dims for a in rules[d]]
    return len(axes) != len(set(axes))


def rules_text(rules: dict) -> str:
    return ";".join(f"{d}:{','.join(ax)}" for d, ax in rules.items() if ax)


def torch_equation(operands: list[list[str]], out: list[str]) -> str:
    return ",".join("".join(op) for op in operands) + "->" + "".join(out)


@settings(max_examples=40, deadline=None)
@given(problems())
def test_random_einsum_matches_torch(problem):
    sizes, rules, operands, out, held = problem
    mesh = tm.Mesh(MESH, rules=rules_text(rules), backend="sim")
    equation = ", ".join(" ".join(op) for op in operands) + " -> " + " ".join(out)
    # an operand must be valid in the layout it is held in; the output in the rules' layout
    # (the computation itself never puts two dims on one axis)
    expect_error = invalid(out, rules) or any(invalid(op, rules if h is None else h) for op, h in zip(operands, held))

    values = [torch_randn(" ".join(f"{d}:{sizes[d]}" for d in op), seed=i) for i, op in enumerate(operands)]
    try:
        xs = [
            tm.distribute(v, op, mesh, requires_grad=True, layout=None if h is None else rules_text(h))
            for v, op, h in zip(values, operands, held)
        ]
        with tm.comm_stats() as stats:
            y = tm.einsum(equation, *xs)
    except tm.LayoutError as e:
        assert isinstance(e, ValueError)
        assert expect_error, f"{equation} under {rules}, held {held}: a valid layout raised: {e}"
        return
    assert not expect_error, f"{equation} under {rules}, held {held}: two dims of a tensor on one axis"

    ts = [v.clone().requires_grad_() for v in values]
    ref = torch.einsum(torch_equation(operands, out), *ts)
    assert y.dims == tuple(out)
    assert y.tensor_layout == mesh.layout_of(y.shape)
    assert_matches(y, ref, out, "einsum", **TOL)

    # partial sums are completed (all-reduce or reduce-scatter) iff a contracted dim has a rule
    contracted = [d for op in operands for d in op if d not in out]
    partial = any(r.kind in ("all_reduce", "reduce_scatter") for r in stats.records)
    assert partial == any(rules[d] for d in contracted), (equation, rules, stats.counts)

    g = torch_randn(" ".join(f"{d}:{sizes[d]}" for d in out), seed=99)
    y.backward(gradient=tm.distribute(g, out, mesh))
    ref.backward(g)
    for x, t, op in zip(xs, ts, operands):
        assert x.grad.tensor_layout == x.tensor_layout  # the layout it is held in
        assert_matches(x.grad, t.grad, op, f"grad of ({' '.join(op)})", **TOL)
