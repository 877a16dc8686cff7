"""The op suite of tests/tensor/test_ops.py on XLA devices: its op tables and its reference check
(`reference.check_op`: forward and every input's gradient against single-device torch),
with each device's block read from torch-xla (see conftest.py).

A deterministic sample keeps compilation time low: every case of each table runs, each
under one of the table's rules (cycling through them), on the meshes of this device count
(4 devices: dp:2;tp:2 and tp:4; 8 devices: dp:2;tp:4, every third case).
"""

from __future__ import annotations

import os

import pytest
import reference
import test_ops as ops
import torch
from reference import check_op, rules_on

import torchmesh as tm

DEVICES = int(os.environ.get("CPU_NUM_DEVICES", "4"))
MESHES = {4: ["dp:2;tp:2", "tp:4"], 8: ["dp:2;tp:4"]}[DEVICES]
EVERY = {4: 1, 8: 3}[DEVICES]


def xla_mesh(spec: str, rules: str = "") -> tm.Mesh:
    return tm.Mesh(spec, rules=rules_on(spec, rules), backend="xla")


def cycled(cases, rules):
    """(case, rules) pairs: every case once, the rules taken in turn."""
    return [(c, rules[i % len(rules)]) for i, c in enumerate(cases)]


def sampled(params):
    return params[::EVERY]


def run(spec, rules, inputs, mesh_fn, torch_fn, out, **kw):
    return ops.run_case(xla_mesh(spec, rules), inputs, mesh_fn, torch_fn, out, **kw)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case,rules", sampled(cycled(list(ops.EW_CASES), ops.EW_RULES)))
def test_elementwise(case, rules, mesh_spec):
    run(mesh_spec, rules, ops.EW_INPUTS, *ops.EW_CASES[case])


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case", sampled(list(ops.CMP_CASES)))
def test_comparisons(case, mesh_spec):
    run(mesh_spec, "batch:dp;ff:tp", ops.EW_INPUTS, *ops.CMP_CASES[case], grad=False)


EINSUMS = [(e, rs[0]) for e, rs in ops.EINSUM_CASES] + [(e, rs[-1]) for e, rs in ops.EINSUM_CASES if len(rs) > 1]
UNEVEN_EINSUMS = [(e, rs[0]) for e, rs in ops.EINSUM_CASES]  # ops.UNEVEN_SIZES: 1, 3, 5, 7, 65


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize(
    "equation,rules,sizes",
    [(e, r, "even") for e, r in sampled(EINSUMS)] + [(e, r, "uneven") for e, r in sampled(UNEVEN_EINSUMS)],
)
def test_einsum(equation, rules, sizes, mesh_spec):
    table = ops.SIZES if sizes == "even" else ops.UNEVEN_SIZES
    lhs, _, rhs = equation.partition("->")
    spec = {f"x{i}": " ".join(f"{n}:{table[n]}" for n in part.split()) for i, part in enumerate(lhs.split(","))}
    check_op(
        xla_mesh(mesh_spec, rules),
        spec,
        lambda **xs: tm.einsum(equation, *xs.values()),
        lambda **ts: ops.torch_einsum(equation, *ts.values()),
        rhs.strip(),
    )


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case,rules", sampled(cycled(list(ops.RED_CASES), ops.RED_RULES)))
def test_reduction(case, rules, mesh_spec):
    run(mesh_spec, rules, ops.RED_INPUTS, *ops.RED_CASES[case])


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case,rules", sampled(cycled(list(ops.BOOL_CASES), ops.RED_RULES[:2])))
def test_any_all(case, rules, mesh_spec):
    run(mesh_spec, rules, ops.RED_INPUTS, *ops.BOOL_CASES[case], grad=False)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case,rules", sampled(cycled(list(ops.SM_CASES), ops.SM_RULES)))
def test_softmax(case, rules, mesh_spec):
    run(mesh_spec, rules, {"x": "batch:8 vocab:16"}, *ops.SM_CASES[case], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize(
    "old,new,rules",
    sampled(
        [
            ("ff", "hidden", "batch:dp;ff:tp"),
            ("hidden", "ff", "batch:dp;ff:tp"),
            ("ff", "batch2", "ff:dp;batch2:tp"),
            ("ff", "hidden", "ff:dp,tp;hidden:tp"),
        ]
    ),
)
def test_rename(old, new, rules, mesh_spec):
    run(
        mesh_spec,
        rules,
        {"x": f"batch:8 {old}:16"},
        lambda x: x.rename(**{old: new}) * 1.5,
        lambda x: x * 1.5,
        f"batch {new}",
    )


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case", sampled(list(ops.RA_CASES)))
def test_rearrange(case, mesh_spec):
    dims, pattern, sizes, rules, torch_fn, out = ops.RA_CASES[case]
    check_op(xla_mesh(mesh_spec, rules), {"x": dims}, lambda x: tm.rearrange(x, pattern, **sizes), torch_fn, out)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("target", sampled(["batch:tp", "", "ff:dp,tp", "ff:tp,dp", "batch:tp;ff:dp"]))
def test_relayout(target, mesh_spec):
    mesh = xla_mesh(mesh_spec, "batch:dp;ff:tp")
    tgt = rules_on(mesh_spec, target)
    mts, _ = check_op(
        mesh, {"x": "batch:8 ff:16"}, lambda x: x.relayout(tgt) * 2, lambda x: x * 2, "batch ff", rules_layout=False
    )
    want = tm.LayoutRules.parse(tgt)
    assert mts["x"].relayout(tgt).tensor_layout.axes == (want.axes_of("batch"), want.axes_of("ff"))


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case,rules", sampled(cycled(list(ops.SEQ_CASES), ops.SEQ_RULES)))
def test_slice_concat_pad(case, rules, mesh_spec):
    run(mesh_spec, rules, ops.SEQ_INPUTS, *ops.SEQ_CASES[case])


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize(
    "offset,wrap,rules",
    sampled([(1, False, "seq:tp"), (-3, True, "seq:tp,dp"), (5, False, "f:tp;seq:dp"), (17, True, "seq:tp")]),
)
def test_shift(offset, wrap, rules, mesh_spec):
    run(
        mesh_spec,
        rules,
        {"x": "f:8 seq:16"},
        lambda x: tm.shift(x, "seq", offset, wrap=wrap),
        lambda x: ops.torch_shift(x, offset, 1, wrap),
        "f seq",
    )


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case,rules", sampled(cycled(list(ops.GATHER_CASES), ops.GATHER_RULES)))
def test_gather(case, rules, mesh_spec):
    run(mesh_spec, rules, ops.GATHER_INPUTS, *ops.GATHER_CASES[case])


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_one_hot_cross_entropy(mesh_spec):
    run(
        mesh_spec,
        "vocab:tp;batch:dp",
        ops.GATHER_INPUTS,
        lambda logits, ids: (tm.one_hot(ids, "vocab:16") * tm.log_softmax(logits, "vocab")).sum("vocab"),
        lambda logits, ids: (torch.nn.functional.one_hot(ids, 16) * torch.log_softmax(logits, 1)).sum(1),
        "batch",
    )


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_random_and_dropout_are_the_same_as_on_one_device(mesh_spec):
    mesh, one = xla_mesh(mesh_spec, "batch:dp;ff:tp"), tm.Mesh("dp:1")
    for fn in (tm.randn, tm.rand):
        torch.testing.assert_close(
            fn("batch:8 ff:16", mesh, seed=11).full(), fn("batch:8 ff:16", one, seed=11).full(), rtol=0, atol=0
        )
    keep = tm.dropout(tm.ones("batch:8 ff:16", one), 0.25, seed=9).full()
    torch.testing.assert_close(tm.dropout(tm.ones("batch:8 ff:16", mesh), 0.25, seed=9).full(), keep)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case", sampled(list(ops.CAST_CASES)))
def test_casts_and_detach(case, mesh_spec):
    mesh_fn, torch_fn = ops.CAST_CASES[case]
    run(mesh_spec, "batch:dp;ff:tp", {"x": "batch:8 ff:16"}, mesh_fn, torch_fn, "batch ff")


# ---- test_ops.py's single tests (regressions, gradients of odd layouts), their meshes on xla ----
SINGLE = [
    ("test_broadcast_gradient_against_two_split_axes", {}),
    ("test_grad_laid_out_like_input_with_its_own_layout", {}),
    ("test_relayout_from_replicated_and_back_to_rules", {}),
    ("test_scalar_torch_tensor_requiring_grad_is_refused", {}),
    ("test_max_min_gradient_shared_among_ties", {"kind": "max"}),
    ("test_reduction_of_input_held_off_rules_reduce_scatters", {"kind": "sum"}),
    ("test_shift_past_the_end_keeps_the_graph", {"offset": 40}),
]


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("name,kwargs", sampled(SINGLE), ids=[n for n, _ in sampled(SINGLE)])
def test_single(name, kwargs, mesh_spec, monkeypatch):
    monkeypatch.setattr(ops, "make_mesh", xla_mesh)
    monkeypatch.setattr(ops, "assert_matches", reference.assert_matches)  # the device-block check
    getattr(ops, name)(mesh_spec=mesh_spec, **kwargs)


# ---- uneven splits (test_ops.py's uneven tables, sampled): XLA pads its own tiles ----------------


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case,rules", sampled(cycled(list(ops.EW_CASES), ops.EW_RULES))[::3])
def test_elementwise_uneven(case, rules, mesh_spec):
    run(mesh_spec, rules, ops.UNEVEN_EW_INPUTS, *ops.EW_CASES[case])


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize(
    "case,rules", sampled(cycled(["sum_ff", "max_ff", "logsumexp_two", "mean_all"], ops.RED_RULES))
)
def test_reduction_uneven(case, rules, mesh_spec):
    run(mesh_spec, rules, {"x": "batch:5 seq:3 ff:7"}, *ops.RED_CASES[case])


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case,rules", sampled(cycled(["softmax", "log_softmax"], ops.SM_RULES)))
def test_softmax_uneven(case, rules, mesh_spec):
    run(mesh_spec, rules, {"x": "batch:3 vocab:65"}, *ops.SM_CASES[case], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("target", ["batch:tp", "ff:dp,tp", "batch:tp;ff:dp"])
def test_relayout_uneven(target, mesh_spec):
    tgt = rules_on(mesh_spec, target)
    check_op(
        xla_mesh(mesh_spec, "batch:dp;ff:tp"),
        {"x": "batch:5 ff:7"},
        lambda x: x.relayout(tgt) * 2,
        lambda x: x * 2,
        "batch ff",
        rules_layout=False,
    )


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case,rules", sampled(cycled(list(ops.GATHER_CASES), ops.GATHER_RULES)))
def test_gather_uneven(case, rules, mesh_spec):
    run(mesh_spec, rules, ops.UNEVEN_GATHER_INPUTS, *ops.GATHER_CASES[case])


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case,rules", [("slice", "seq:tp"), ("concat", "seq:dp,tp"), ("pad", "f:tp;seq:dp")])
def test_slice_concat_pad_uneven(case, rules, mesh_spec):
    run(mesh_spec, rules, ops.UNEVEN_SEQ_INPUTS, *ops.SEQ_CASES[case])


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_shift_uneven(mesh_spec):
    run(
        mesh_spec,
        "seq:tp",
        {"x": "f:5 seq:13"},
        lambda x: tm.shift(x, "seq", 3),
        lambda x: ops.torch_shift(x, 3, 1, False),
        "f seq",
    )
