"""Every op on sim meshes against plain single-device torch, forward and backward.

Each case runs on the meshes of `reference.MESHES` under layout rules that split the op's
inputs, outputs and contracted dims (a dim over one axis, over two axes, or replicated);
`reference.check_op` compares the output and every input's gradient shard by shard.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from reference import (
    MESHES,
    assert_matches,
    check_op,
    make_mesh,
    names_of,
    rules_on,
    single_device,
    torch_randn,
)

import torchmesh as tm


def run_case(mesh, inputs: dict, mesh_fn, torch_fn, out_dims: str, **kw):
    """check_op with the inputs each function names (its parameters) taken from `inputs`."""
    params = list(inspect.signature(mesh_fn).parameters)
    spec = {k: inputs[k] for k in params}
    return check_op(mesh, spec, mesh_fn, torch_fn, out_dims, **kw)


# ---- elementwise ------------------------------------------------------------------------------
EW_INPUTS = {"x": "batch:8 ff:16", "b": "ff:16", "c": "batch:8", "xt": "ff:16 batch:8"}
# Sizes that do not divide (over tp:2, dp:2;tp:2 and dp:2;tp:4: blocks that differ by one, and
# empty blocks where a dim has fewer rows than its axes have devices).
UNEVEN_EW_INPUTS = {"x": "batch:5 ff:7", "b": "ff:7", "c": "batch:5", "xt": "ff:7 batch:5"}
EW_RULES = ["batch:dp;ff:tp", "ff:dp,tp", "batch:tp,dp", "batch:tp;ff:dp"]

EW_CASES = {
    "add_broadcast": (lambda x, b: x + b, lambda x, b: x + b, "batch ff"),
    "sub_mul_scalar": (lambda x, c: (x - c) * 2.5, lambda x, c: (x - c[:, None]) * 2.5, "batch ff"),
    "div": (lambda x, b: x / (b * b + 1), lambda x, b: x / (b * b + 1), "batch ff"),
    "reflected": (lambda x: 1.0 - 2.0 / (x * x + 1) + 3 * x, lambda x: 1.0 - 2.0 / (x * x + 1) + 3 * x, "batch ff"),
    "pow_neg_abs": (lambda x: -abs(x) + x**2 + torch.pow(x, 3), lambda x: -abs(x) + x**2 + torch.pow(x, 3), "batch ff"),
    "relu": (lambda x: torch.relu(x), lambda x: torch.relu(x), "batch ff"),
    "exp": (lambda x: torch.exp(x), lambda x: torch.exp(x), "batch ff"),
    "gelu": (lambda x: F.gelu(x), lambda x: F.gelu(x), "batch ff"),
    "silu_tanh_sigmoid": (
        lambda x: F.silu(x) + x.tanh() * x.sigmoid(),
        lambda x: F.silu(x) + x.tanh() * x.sigmoid(),
        "batch ff",
    ),
    "where": (lambda x, b: torch.where(x > 0, x, b), lambda x, b: torch.where(x > 0, x, b.expand_as(x)), "batch ff"),
    "tm_where_scalar": (
        lambda x, c: tm.where(c > 0, x, 0.5),
        lambda x, c: torch.where(c[:, None] > 0, x, 0.5),
        "batch ff",
    ),
    "maximum": (lambda x, b: torch.maximum(x, b), lambda x, b: torch.maximum(x, b), "batch ff"),
    "clamp": (lambda x: torch.clamp(x, -0.5, 0.7), lambda x: torch.clamp(x, -0.5, 0.7), "batch ff"),
    # broadcasting by name: the outer product of two 1-d tensors, each broadcast against the other
    "outer": (lambda c, b: c * b, lambda c, b: c[:, None] * b[None, :], "batch ff"),
    # the same dims in another storage order
    "transposed": (lambda x, xt: x * xt + xt, lambda x, xt: x * xt.T + xt.T, "batch ff"),
    "chain": (
        lambda x, b, c: torch.relu(x * b + c) * 2 + x,
        lambda x, b, c: torch.relu(x * b + c[:, None]) * 2 + x,
        "batch ff",
    ),
}


@pytest.mark.parametrize("sizes", ["even", "uneven"])
@pytest.mark.parametrize("rules", EW_RULES)
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case", list(EW_CASES))
def test_elementwise(case, mesh_spec, rules, sizes):
    mesh_fn, torch_fn, out = EW_CASES[case]
    inputs = EW_INPUTS if sizes == "even" else UNEVEN_EW_INPUTS
    run_case(make_mesh(mesh_spec, rules), inputs, mesh_fn, torch_fn, out)


CMP_CASES = {
    "gt": (lambda x, b: x > b, lambda x, b: x > b, "batch ff"),
    "le": (lambda x, c: x <= c, lambda x, c: x <= c[:, None], "batch ff"),
    "eq_ne": (lambda x, b: (x == x * 1) & (x != b), lambda x, b: (x == x * 1) & (x != b), "batch ff"),
    "ge_or": (lambda x, c: (x >= 0.5) | (c < 0), lambda x, c: (x >= 0.5) | (c[:, None] < 0), "batch ff"),
    "logical_not": (lambda c: torch.logical_not(c > 0), lambda c: torch.logical_not(c > 0), "batch"),
    "isfinite": (lambda x: torch.isfinite(x / (x > 0)), lambda x: torch.isfinite(x / (x > 0)), "batch ff"),
}


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case", list(CMP_CASES))
def test_comparisons(case, mesh_spec):
    mesh_fn, torch_fn, out = CMP_CASES[case]
    mts, _ = run_case(make_mesh(mesh_spec, "batch:dp;ff:tp"), EW_INPUTS, mesh_fn, torch_fn, out, grad=False)
    assert mesh_fn(**mts).dtype == torch.bool


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_broadcast_gradient_against_two_split_axes(mesh_spec):
    """A scalar-per-ff weight broadcast against batch split over dp and tp: its gradient is
    the whole sum on every device (per-shard check), as in torch."""
    mesh = make_mesh(mesh_spec, "batch:dp,tp")
    run_case(mesh, EW_INPUTS, lambda x, b: (x * b).exp(), lambda x, b: (x * b).exp(), "batch ff")


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_grad_laid_out_like_input_with_its_own_layout(mesh_spec):
    """x held in a layout other than the rules': the op relays it out, x.grad keeps x's layout."""
    mesh = make_mesh(mesh_spec, "batch:dp;ff:tp")
    t, b = torch_randn("batch:8 ff:16", 1), torch_randn("ff:16", 2)
    x = tm.distribute(
        t, "batch ff", mesh, requires_grad=True, layout="batch:tp" if "tp" in mesh.axis_names else "ff:dp"
    )
    w = tm.distribute(b, "ff", mesh, requires_grad=True)
    tt, bt = t.clone().requires_grad_(), b.clone().requires_grad_()
    (torch.sin(x * w) * x).sum().backward()
    (torch.sin(tt * bt) * tt).sum().backward()
    assert x.grad.tensor_layout == x.tensor_layout and w.grad.tensor_layout == w.tensor_layout
    assert_matches(x.grad, tt.grad, "batch ff")
    assert_matches(w.grad, bt.grad, "ff")


# ---- einsum -----------------------------------------------------------------------------------
def torch_einsum(equation: str, *ts: torch.Tensor) -> torch.Tensor:
    """torch.einsum over dim names: each name becomes a letter."""
    lhs, _, rhs = equation.partition("->")
    letters: dict[str, str] = {}
    for n in equation.replace(",", " ").replace("->", " ").split():
        letters.setdefault(n, "abcdefghijklmnopqrstuvwxyz"[len(letters)])
    ops = [" ".join(letters[n] for n in part.split()) for part in lhs.split(",")]
    return torch.einsum(
        ",".join(o.replace(" ", "") for o in ops) + "->" + "".join(letters[n] for n in rhs.split()), *ts
    )


UNEVEN_SIZES = {"batch": 5, "d": 7, "ff": 3, "b": 5, "c": 7, "heads": 3, "seq": 1, "kv": 5, "dh": 3, "a": 65, "e": 7}
SIZES = {"batch": 8, "d": 16, "ff": 16, "b": 8, "c": 16, "heads": 8, "seq": 4, "kv": 4, "dh": 8, "a": 8, "e": 8}

EINSUM_CASES = [
    ("batch d, d ff -> batch ff", ["batch:dp;ff:tp", "d:tp", "batch:dp;d:tp", "d:dp,tp", "batch:dp,tp", "ff:tp;d:dp"]),
    ("batch d, d ff -> ff batch", ["batch:dp;ff:tp", "d:tp;ff:dp"]),
    ("b, c -> c", ["b:tp;c:tp", "b:dp,tp;c:tp", "c:dp,tp"]),  # contracted and output dim on one axis: reduce-scatter
    ("ff batch, heads -> heads batch", ["ff:tp;heads:tp", "ff:dp;heads:tp", "batch:dp;heads:tp"]),
    (
        "batch heads seq dh, batch heads kv dh -> batch heads seq kv",
        ["batch:dp;heads:tp", "dh:tp;batch:dp", "kv:tp;heads:dp"],
    ),
    ("a b, b c, c e -> a e", ["a:dp;b:tp", "b:dp;c:tp", "c:dp,tp;a:dp", "a:tp;e:dp"]),
    ("a b, a b ->", ["a:dp;b:tp", "b:dp,tp"]),
    ("a, b -> a b", ["a:dp;b:tp", "a:tp;b:dp", "b:dp,tp"]),
    ("batch d, d -> batch", ["d:tp", "batch:dp;d:tp", "d:dp,tp"]),
    ("a b -> b a", ["a:tp", "a:dp;b:tp"]),
    ("a b -> a", ["b:tp", "a:dp;b:tp", "b:dp,tp"]),
]


@pytest.mark.parametrize("sizes", ["even", "uneven"])
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("equation,rules", [(e, r) for e, rs in EINSUM_CASES for r in rs])
def test_einsum(equation, rules, mesh_spec, sizes):
    lhs, _, rhs = equation.partition("->")
    operands = [part.split() for part in lhs.split(",")]
    table = SIZES if sizes == "even" else UNEVEN_SIZES
    spec = {f"x{i}": " ".join(f"{n}:{table[n]}" for n in ns) for i, ns in enumerate(operands)}
    check_op(
        make_mesh(mesh_spec, rules),
        spec,
        lambda **xs: tm.einsum(equation, *xs.values()),
        lambda **ts: torch_einsum(equation, *ts.values()),
        rhs.strip(),
    )


MTF_FORMS = {
    "output_shape_str": (lambda x, w: tm.einsum([x, w], output_shape="batch ff"), "batch ff"),
    "implicit_output": (lambda x, w: tm.einsum([x, w]), "batch ff"),
    "output_shape_dims": (
        lambda x, w: tm.einsum([x, w], output_shape=[tm.Dim("ff", 16), tm.Dim("batch", 8)]),
        "ff batch",
    ),
    "implicit_arrowless": (lambda x, w: tm.einsum("batch d, d ff", x, w), "batch ff"),
}


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("form", list(MTF_FORMS))
def test_einsum_mesh_tf_form(form, mesh_spec):
    mesh_fn, out = MTF_FORMS[form]
    mesh = make_mesh(mesh_spec, "batch:dp;d:tp")
    mts, _ = run_case(
        mesh,
        {"x": "batch:8 d:16", "w": "d:16 ff:16"},
        mesh_fn,
        lambda x, w: (x @ w) if out == "batch ff" else (x @ w).T,
        out,
    )
    assert mesh_fn(**mts).dims == names_of(out)


# ---- reductions -------------------------------------------------------------------------------
RED_INPUTS = {"x": "batch:8 seq:4 ff:16"}
RED_RULES = ["batch:dp;ff:tp", "ff:dp,tp", "batch:tp;seq:dp", "batch:dp,tp", "ff:tp,dp"]
RED_CASES = {
    "sum_ff": (lambda x: x.sum("ff"), lambda x: x.sum(2), "batch seq"),
    "sum_two": (lambda x: x.sum("batch ff"), lambda x: x.sum((0, 2)), "seq"),
    "sum_list": (lambda x: x.sum(["seq", "ff"]), lambda x: x.sum((1, 2)), "batch"),
    "sum_all": (lambda x: x.sum(), lambda x: x.sum(), ""),
    "torch_sum": (lambda x: torch.sum(x, "ff"), lambda x: x.sum(2), "batch seq"),
    "reduce_sum_reduced_dim": (lambda x: tm.reduce_sum(x, reduced_dim="batch"), lambda x: x.sum(0), "seq ff"),
    "reduce_sum_output_shape": (lambda x: tm.reduce_sum(x, output_shape="ff seq"), lambda x: x.sum(0).T, "ff seq"),
    "mean_ff": (lambda x: x.mean("ff"), lambda x: x.mean(2), "batch seq"),
    "mean_all": (lambda x: x.mean(), lambda x: x.mean(), ""),
    "mean_dim": (
        lambda x: tm.reduce_mean(x, reduced_dim=tm.Dim("batch", x.sizes["batch"])),
        lambda x: x.mean(0),
        "seq ff",
    ),
    "max_ff": (lambda x: x.max("ff"), lambda x: x.amax(2), "batch seq"),
    "min_batch": (lambda x: x.min("batch"), lambda x: x.amin(0), "seq ff"),
    "max_all": (lambda x: x.max(), lambda x: x.amax(), ""),
    "min_two": (lambda x: tm.reduce_min(x, "batch ff"), lambda x: x.amin((0, 2)), "seq"),
    "logsumexp_ff": (lambda x: tm.logsumexp(x, "ff"), lambda x: torch.logsumexp(x, 2), "batch seq"),
    "logsumexp_two": (lambda x: tm.logsumexp(x, "batch ff"), lambda x: torch.logsumexp(x, (0, 2)), "seq"),
    "logsumexp_all": (lambda x: x.logsumexp(), lambda x: torch.logsumexp(x, (0, 1, 2)), ""),
}


@pytest.mark.parametrize("inputs", [RED_INPUTS, {"x": "batch:5 seq:3 ff:7"}], ids=["even", "uneven"])
@pytest.mark.parametrize("rules", RED_RULES)
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case", list(RED_CASES))
def test_reduction(case, mesh_spec, rules, inputs):
    mesh_fn, torch_fn, out = RED_CASES[case]
    run_case(make_mesh(mesh_spec, rules), inputs, mesh_fn, torch_fn, out)


BOOL_CASES = {
    "any_ff": (lambda x: (x > 1.0).any("ff"), lambda x: (x > 1.0).any(2), "batch seq"),
    "all_batch": (lambda x: (x > -1.5).all("batch"), lambda x: (x > -1.5).all(0), "seq ff"),
    "any_all_dims": (lambda x: (x > 2.5).any(), lambda x: (x > 2.5).any(), ""),
    "all_all_dims": (lambda x: (x > -4.0).all(), lambda x: (x > -4.0).all(), ""),
    "all_two": (lambda x: (x > -2.5).all("seq ff"), lambda x: (x > -2.5).all(2).all(1), "batch"),
    "any_float": (
        lambda x: tm.reduce_any(torch.relu(x - 1.0), "ff"),
        lambda x: torch.relu(x - 1.0).bool().any(2),
        "batch seq",
    ),
}


@pytest.mark.parametrize("rules", RED_RULES[:2])
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case", list(BOOL_CASES))
def test_any_all(case, mesh_spec, rules):
    mesh_fn, torch_fn, out = BOOL_CASES[case]
    _, ts = run_case(make_mesh(mesh_spec, rules), RED_INPUTS, mesh_fn, torch_fn, out, grad=False)
    r = torch_fn(**ts)
    assert 0 < r.sum() < r.numel() or case.endswith("all_dims")  # the case is not trivially constant


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("kind", ["max", "min"])
def test_max_min_gradient_shared_among_ties(kind, mesh_spec):
    """Like torch.amax/amin, the gradient is split evenly among tied extremes, across shards."""
    t = torch.randint(-2, 3, (8, 16), generator=torch.Generator().manual_seed(0)).float()
    fn = (lambda x: x.max("ff")) if kind == "max" else (lambda x: x.min("ff"))
    ref = (lambda x: x.amax(1)) if kind == "max" else (lambda x: x.amin(1))
    check_op(make_mesh(mesh_spec, "ff:dp,tp"), {"x": ("batch ff", t)}, fn, ref, "batch")


# ---- softmax ----------------------------------------------------------------------------------
SM_RULES = ["vocab:tp", "vocab:dp,tp", "vocab:tp,dp", "batch:dp;vocab:tp", "batch:dp,tp"]
NEG_INF = float("-inf")
SM_CASES = {
    "softmax": (lambda x: tm.softmax(x, "vocab"), lambda x: torch.softmax(x, 1), "batch vocab"),
    "log_softmax": (lambda x: tm.log_softmax(x, "vocab"), lambda x: torch.log_softmax(x, 1), "batch vocab"),
    "torch_softmax": (lambda x: torch.softmax(x, "vocab"), lambda x: torch.softmax(x, 1), "batch vocab"),
    "F_log_softmax": (lambda x: F.log_softmax(x, dim="vocab"), lambda x: F.log_softmax(x, dim=1), "batch vocab"),
    "method": (lambda x: x.softmax("vocab") * 3, lambda x: x.softmax(1) * 3, "batch vocab"),
    "softmax_batch": (lambda x: tm.softmax(x, "batch"), lambda x: torch.softmax(x, 0), "batch vocab"),
    # columns >= 5 masked: whole shards hold only -inf; the global max is still finite
    "masked": (
        lambda x: tm.softmax(tm.where(tm.arange(x.shape[1], x.mesh) < 5, x, NEG_INF), "vocab"),
        lambda x: torch.softmax(torch.where(torch.arange(x.shape[1]) < 5, x, NEG_INF), 1),
        "batch vocab",
    ),
    "masked_log": (
        lambda x: tm.log_softmax(tm.where(tm.arange(x.shape[1], x.mesh) < 5, x * 30, -1e4), "vocab"),
        lambda x: torch.log_softmax(torch.where(torch.arange(x.shape[1]) < 5, x * 30, -1e4), 1),
        "batch vocab",
    ),
}


@pytest.mark.parametrize(
    "dims", ["batch:8 vocab:16", "batch:3 vocab:65"], ids=["even", "uneven"]
)  # 65: nanoGPT's vocab
@pytest.mark.parametrize("rules", SM_RULES)
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case", list(SM_CASES))
def test_softmax(case, mesh_spec, rules, dims):
    mesh_fn, torch_fn, out = SM_CASES[case]
    run_case(make_mesh(mesh_spec, rules), {"x": dims}, mesh_fn, torch_fn, out, atol=1e-4, rtol=1e-5)


# ---- rename, rearrange, relayout ----------------------------------------------------------------
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize(
    "old,new,rules",
    [
        ("ff", "hidden", "batch:dp;ff:tp"),  # split -> replicated: all-gather
        ("hidden", "ff", "batch:dp;ff:tp"),  # replicated -> split: local slice
        ("ff", "batch2", "ff:dp;batch2:tp"),  # split over dp -> split over tp
        ("ff", "hidden", "ff:dp,tp;hidden:tp"),  # over two axes -> over the minor one
    ],
)
def test_rename(old, new, rules, mesh_spec):
    mesh = make_mesh(mesh_spec, rules)
    mts, _ = check_op(
        mesh, {"x": f"batch:8 {old}:16"}, lambda x: x.rename(**{old: new}) * 1.5, lambda x: x * 1.5, f"batch {new}"
    )
    y = mts["x"].rename({old: new})
    assert y.dims == ("batch", new) and y.tensor_layout == mesh.layout_of(y.shape)


RA_CASES = {
    "split_local": (
        "batch:8 ff:16",
        "batch (heads dh) -> batch heads dh",
        {"heads": 4},
        "ff:tp;heads:tp;batch:dp",
        lambda x: x.reshape(8, 4, 4),
        "batch heads dh",
    ),
    "split_relayout": (
        "batch:8 ff:16",
        "batch (heads dh) -> batch heads dh",
        {"heads": 4},
        "ff:tp;dh:tp",
        lambda x: x.reshape(8, 4, 4),
        "batch heads dh",
    ),
    "merge_local": (
        "batch:8 heads:4 dh:4",
        "batch heads dh -> batch (heads dh):ff",
        {},
        "ff:tp;heads:tp",
        lambda x: x.reshape(8, 16),
        "batch ff",
    ),
    "merge_relayout": (
        "batch:8 heads:4 dh:4",
        "batch heads dh -> batch (heads dh):ff",
        {},
        "ff:tp;dh:tp",
        lambda x: x.reshape(8, 16),
        "batch ff",
    ),
    "merge_transposed": (
        "batch:8 heads:4 dh:4",
        "batch heads dh -> (dh heads):ff batch",
        {},
        "ff:tp;batch:dp",
        lambda x: x.permute(2, 1, 0).reshape(16, 8),
        "ff batch",
    ),
    "merge_other_axis": (
        "batch:8 heads:4 dh:4",
        "batch heads dh -> batch (heads dh):ff",
        {},
        "heads:dp;ff:tp",
        lambda x: x.reshape(8, 16),
        "batch ff",
    ),
    "split_two_axes": (
        "batch:8 ff:16",
        "batch (heads dh) -> batch heads dh",
        {"dh": 2},
        "ff:dp,tp;heads:dp,tp",
        lambda x: x.reshape(8, 8, 2),
        "batch heads dh",
    ),
    "regroup": (
        "batch:8 ff:16",
        "(b2 b1) (h d) -> (h b2) (b1 d):ff",
        {"b2": 2, "h": 4},
        "ff:tp;h_b2:dp",
        lambda x: x.reshape(2, 4, 4, 4).permute(2, 0, 1, 3).reshape(8, 16),
        "h_b2 ff",
    ),
    "transpose": ("batch:8 ff:16", "batch ff -> ff batch", {}, "batch:dp;ff:tp", lambda x: x.T, "ff batch"),
    "unnamed_group": (
        "batch:8 heads:4 dh:4",
        "batch heads dh -> batch (heads dh)",
        {},
        "heads:tp",
        lambda x: x.reshape(8, 16),
        "batch heads_dh",
    ),
}


@pytest.mark.parametrize("dims", ["batch:8 ff:16", "batch:5 ff:7", "batch:3 ff:65"], ids=["even", "uneven", "vocab65"])
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize(
    "target", ["batch:tp", "", "ff:dp,tp", "ff:tp,dp", "batch:dp,tp", "batch:tp;ff:dp", "batch:dp;ff:tp"]
)
def test_relayout(target, mesh_spec, dims):
    mesh = make_mesh(mesh_spec, "batch:dp;ff:tp")
    tgt = rules_on(mesh_spec, target)
    mts, _ = check_op(mesh, {"x": dims}, lambda x: x.relayout(tgt) * 2, lambda x: x * 2, "batch ff", rules_layout=False)
    y = mts["x"].relayout(tgt)
    want = tm.LayoutRules.parse(tgt)
    assert y.tensor_layout.axes == (want.axes_of("batch"), want.axes_of("ff"))


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_relayout_from_replicated_and_back_to_rules(mesh_spec):
    mesh = make_mesh(mesh_spec, "batch:dp;ff:tp")
    t = torch_randn("batch:8 ff:16", 3)
    x = tm.distribute(t, "batch ff", mesh, layout="", requires_grad=True)
    assert x.layout == {}
    y = x.relayout()
    assert y.tensor_layout == mesh.layout_of(y.shape)
    assert_matches(y, t, "batch ff")
    (y * y).sum().backward()
    assert x.grad.layout == {}
    assert_matches(x.grad, 2 * t, "batch ff")


# ---- slice, concat, pad, shift --------------------------------------------------------------------
SEQ_RULES = ["seq:tp", "seq:dp,tp", "seq:tp,dp", "f:tp;seq:dp", ""]
SEQ_INPUTS = {"x": "seq:16 f:8", "y": "f:8 seq:8", "z": "seq:8 f:8"}
UNEVEN_SEQ_INPUTS = {"x": "seq:13 f:5", "y": "f:5 seq:7", "z": "seq:3 f:5"}
SEQ_CASES = {
    "slice": (lambda x: tm.slice(x, "seq", 3, 11), lambda x: x[3:11], "seq f"),
    "slice_negative": (lambda x: tm.slice(x, "seq", -8, 16), lambda x: x[-8:], "seq f"),
    "slice_other_dim": (lambda x: tm.slice(x, "f", 2, 6), lambda x: x[:, 2:6], "seq f"),
    "concat": (lambda x, y: tm.concat([x, y], "seq"), lambda x, y: torch.cat([x, y.T]), "seq f"),
    "concat_three": (lambda z, x, y: tm.concat([z, x, y], "seq"), lambda z, x, y: torch.cat([z, x, y.T]), "seq f"),
    "pad": (lambda x: tm.pad(x, "seq", 2, 6), lambda x: F.pad(x, (0, 0, 2, 6)), "seq f"),
    "pad_value": (lambda x: tm.pad(x, "seq", 8, 0, value=1.5), lambda x: F.pad(x, (0, 0, 8, 0), value=1.5), "seq f"),
    "pad_other_dim": (lambda x: tm.pad(x, "f", 4, 4), lambda x: F.pad(x, (4, 4)), "seq f"),
}


@pytest.mark.parametrize("sizes", ["even", "uneven"])
@pytest.mark.parametrize("rules", SEQ_RULES)
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case", list(SEQ_CASES))
def test_slice_concat_pad(case, mesh_spec, rules, sizes):
    mesh_fn, torch_fn, out = SEQ_CASES[case]
    run_case(make_mesh(mesh_spec, rules), SEQ_INPUTS if sizes == "even" else UNEVEN_SEQ_INPUTS, mesh_fn, torch_fn, out)


def torch_shift(x: torch.Tensor, offset: int, dim: int, wrap: bool) -> torch.Tensor:
    """out[i] = x[i - offset], zero where i - offset is out of range (or wrapped)."""
    if wrap:
        return torch.roll(x, offset, dim)
    n = x.shape[dim]
    idx = torch.arange(n) - offset
    valid = (idx >= 0) & (idx < n)
    picked = x.index_select(dim, idx.clamp(0, n - 1))
    shape = [1] * x.dim()
    shape[dim] = n
    return picked * valid.reshape(shape)


@pytest.mark.parametrize("rules", ["seq:tp", "seq:tp,dp", "f:tp;seq:dp"])
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("offset", [0, 1, -1, 3, -3, 4, 5, -6, 9, 15, 16, 17, -17])
def test_shift(offset, wrap, mesh_spec, rules):
    # seq:16 is 8, 4 or 2 rows a shard: offsets cross one and several shards, and the whole dim
    run_case(
        make_mesh(mesh_spec, rules),
        {"x": "f:8 seq:16"},
        lambda x: tm.shift(x, "seq", offset, wrap=wrap),
        lambda x: torch_shift(x, offset, 1, wrap),
        "f seq",
    )


def test_torch_shift_reference_itself():
    x = torch.arange(5.0)
    assert torch_shift(x, 2, 0, False).tolist() == [0, 0, 0, 1, 2]
    assert torch_shift(x, -2, 0, False).tolist() == [2, 3, 4, 0, 0]
    assert torch_shift(x, 2, 0, True).tolist() == [3, 4, 0, 1, 2]


# ---- gather, one_hot ------------------------------------------------------------------------------
IDS = torch.tensor([3, 15, 0, 7, 8, 3, 12, 3])  # repeats: the table's gradient accumulates
IDS2 = torch.tensor([[1, 2, 14, 2], [0, 0, 9, 15], [5, 6, 7, 8], [15, 14, 13, 3]] * 2)
GATHER_INPUTS = {
    "table": "vocab:16 d:8",
    "ids": ("batch", IDS),
    "ids2": ("batch seq", IDS2),
    "logits": "batch:8 vocab:16",
    "logits3": "batch:8 seq:4 vocab:16",
}
UNEVEN_IDS = torch.tensor([3, 6, 0, 4, 1, 3, 5, 3])
UNEVEN_GATHER_INPUTS = {
    "table": "vocab:7 d:5",
    "ids": ("batch", UNEVEN_IDS),
    "ids2": ("batch seq", IDS2 % 7),
    "logits": "batch:8 vocab:7",
    "logits3": "batch:8 seq:4 vocab:7",
}
GATHER_RULES = ["vocab:tp", "vocab:dp,tp", "vocab:tp;batch:dp", "d:tp;batch:dp", "batch:tp;vocab:dp"]
# the index's own dims on the vocab's axis: the lookup result is reduce-scattered into them
INDEX_ON_VOCAB_AXIS = {
    "embedding": ["vocab:tp;batch:tp"],
    "embedding_2d": ["vocab:tp,dp;seq:dp", "vocab:dp;seq:tp;batch:dp"],
    "pick_k": ["vocab:tp;seq:tp", "vocab:dp,tp;seq:dp"],
}
GATHER_CASES = {
    "embedding": (lambda table, ids: tm.gather(table, ids, "vocab"), lambda table, ids: table[ids], "batch d"),
    "embedding_fn": (lambda ids, table: tm.embedding(ids, table), lambda ids, table: table[ids], "batch d"),
    "embedding_2d": (
        lambda table, ids2: tm.gather(table, ids2, "vocab"),
        lambda table, ids2: table[ids2],
        "batch seq d",
    ),
    "pick_targets": (
        lambda logits, ids: tm.gather(logits, ids, "vocab"),
        lambda logits, ids: logits.gather(1, ids[:, None])[:, 0],
        "batch",
    ),
    "pick_targets_3d": (
        lambda logits3, ids2: tm.gather(logits3, ids2, "vocab"),
        lambda logits3, ids2: logits3.gather(2, ids2[:, :, None])[:, :, 0],
        "batch seq",
    ),
    # shared dim batch, index-only dim seq (k picks per row)
    "pick_k": (
        lambda logits, ids2: tm.gather(logits, ids2, "vocab"),
        lambda logits, ids2: logits.gather(1, ids2),
        "batch seq",
    ),
}


@pytest.mark.parametrize("sizes", ["even", "uneven"])
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize(
    "case,rules", [(c, r) for c in GATHER_CASES for r in GATHER_RULES + INDEX_ON_VOCAB_AXIS.get(c, [])]
)
def test_gather(case, rules, mesh_spec, sizes):
    mesh_fn, torch_fn, out = GATHER_CASES[case]
    run_case(
        make_mesh(mesh_spec, rules), GATHER_INPUTS if sizes == "even" else UNEVEN_GATHER_INPUTS, mesh_fn, torch_fn, out
    )


@pytest.mark.parametrize("inputs,n", [(GATHER_INPUTS, 16), (UNEVEN_GATHER_INPUTS, 7)], ids=["even", "uneven"])
@pytest.mark.parametrize("rules", GATHER_RULES)
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_one_hot(mesh_spec, rules, inputs, n):
    mesh = make_mesh(mesh_spec, rules)
    run_case(
        mesh,
        inputs,
        lambda ids: tm.one_hot(ids, f"vocab:{n}"),
        lambda ids: F.one_hot(ids, n).float(),
        "batch vocab",
        grad=False,
    )
    run_case(
        mesh,
        inputs,
        lambda ids2: tm.one_hot(ids2, tm.Dim("vocab", n), dtype=torch.float64),
        lambda ids2: F.one_hot(ids2, n).double(),
        "batch seq vocab",
        grad=False,
    )
    # one_hot feeds a differentiable op: the cross-entropy of picked logits
    run_case(
        mesh,
        inputs,
        lambda logits, ids: (tm.one_hot(ids, f"vocab:{n}") * tm.log_softmax(logits, "vocab")).sum("vocab"),
        lambda logits, ids: (F.one_hot(ids, n) * torch.log_softmax(logits, 1)).sum(1),
        "batch",
    )


# ---- randomness --------------------------------------------------------------------------------
@pytest.mark.parametrize("rules", ["batch:dp;ff:tp", "ff:dp,tp", "batch:tp"])
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_random_is_layout_invariant(mesh_spec, rules):
    mesh, one = make_mesh(mesh_spec, rules), single_device()
    for fn in (tm.randn, tm.rand):
        ref = fn("batch:8 ff:16", one, seed=11).full()
        assert_matches(fn("batch:8 ff:16", mesh, seed=11), ref, "batch ff", rtol=0, atol=0)
        assert not torch.equal(fn("batch:8 ff:16", mesh, seed=12).full(), ref)
    ref = tm.randn("batch:8 ff:16", one, seed=11).full()
    assert 0.5 < ref.std() < 1.5 and (tm.rand("batch:8 ff:16", one, seed=11).full() < 1).all()
    # the global stream: the same manual_seed gives the same values on every mesh
    tm.manual_seed(5)
    a = tm.randn("ff:16 batch:8", mesh)
    tm.manual_seed(5)
    assert_matches(a, tm.randn("ff:16 batch:8", one).full(), "ff batch", rtol=0, atol=0)


@pytest.mark.parametrize("rules", ["batch:dp;ff:tp", "ff:dp,tp"])
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_dropout_is_layout_invariant(mesh_spec, rules):
    mesh, one = make_mesh(mesh_spec, rules), single_device()
    t = torch_randn("batch:8 ff:16", 4)
    keep = tm.dropout(tm.ones("batch:8 ff:16", one), 0.25, seed=9).full() * 0.75  # the mask, from one device
    assert 0.5 < keep.mean() < 0.95 and set(keep.unique().tolist()) == {0.0, 1.0}
    check_op(mesh, {"x": ("batch ff", t)}, lambda x: tm.dropout(x, 0.25, seed=9), lambda x: x * keep / 0.75, "batch ff")
    x = tm.distribute(t, "batch ff", mesh)
    assert tm.dropout(x, 0.25, training=False) is x
    assert_matches(tm.dropout(x, 1.0, seed=1), torch.zeros(8, 16), "batch ff")


# ---- casts, detach ---------------------------------------------------------------------------------
CAST_CASES = {
    "to_float64": (lambda x: x.to(torch.float64) * 3, lambda x: x.to(torch.float64) * 3),
    "double": (lambda x: x.double().exp(), lambda x: x.double().exp()),
    "bfloat16": (lambda x: x.bfloat16() * 2, lambda x: x.bfloat16() * 2),
    "tm_cast": (lambda x: tm.cast(x, torch.float64) + 1, lambda x: x.to(torch.float64) + 1),
    "detach": (lambda x: x.detach() * x + torch.detach(x), lambda x: x.detach() * x + x.detach()),
}


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case", list(CAST_CASES))
def test_casts_and_detach(case, mesh_spec):
    mesh_fn, torch_fn = CAST_CASES[case]
    mts, _ = check_op(make_mesh(mesh_spec, "batch:dp;ff:tp"), {"x": "batch:8 ff:16"}, mesh_fn, torch_fn, "batch ff")
    assert mts["x"].grad.dtype == torch.float32
    d = mts["x"].detach()
    assert not d.requires_grad and mts["x"].requires_grad
    assert d.tensor_layout == mts["x"].tensor_layout


# ---- regressions (library bugs these tests found) and edge cases--------------------------------------------
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_scalar_torch_tensor_requiring_grad_is_refused(mesh_spec):
    """A plain 0-d torch tensor that requires grad used to get every device's gradient added
    up (2x the true gradient on dp:2;tp:2, and rank-local on dist). It is refused now; as a
    replicated MeshTensor it gets the torch gradient on every mesh."""
    mesh = make_mesh(mesh_spec, "batch:dp;ff:tp")
    t = torch_randn("batch:8 ff:16", 0)
    x = tm.distribute(t, "batch ff", mesh)
    s = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(ValueError, match="0-d torch.Tensor that requires grad"):
        x * s
    with pytest.raises(tm.DimError):
        torch.where(x > 0, x, s)
    assert_matches(x * s.detach() + torch.tensor(1.0), t * 2 + 1, "batch ff")  # constants are fine
    with torch.no_grad():
        assert_matches(x * s, t * 2, "batch ff")
    sm = tm.distribute(torch.tensor(2.0), "", mesh, requires_grad=True)
    (x * sm).sum().backward()
    assert_matches(sm.grad, t.sum(), "")


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("offset", [16, -16, 40])
def test_shift_past_the_end_keeps_the_graph(offset, mesh_spec):
    """Shifting everything off the dim gives zeros; on one device (or along an unsplit dim) the
    zeros used to drop out of the autograd graph, so .backward() raised on some meshes only."""
    mesh = make_mesh(mesh_spec, "batch:dp")
    x = tm.randn("batch:8 seq:16", mesh, seed=0, requires_grad=True)
    y = tm.shift(x, "seq", offset)
    assert y.requires_grad
    (y.sum() + x.sum()).backward()
    assert_matches(x.grad, torch.ones(8, 16), "batch seq")
    assert_matches(y, torch.zeros(8, 16), "batch seq")


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("kind", ["sum", "mean"])
def test_reduction_of_input_held_off_rules_reduce_scatters(kind, mesh_spec):
    """x held with b split (rules split b and c over the same axis, so x itself can only be
    held in a custom layout): reducing b leaves c to be split over that axis: the partial
    sums are reduce-scattered; max is all-reduced, then sliced."""
    mesh = make_mesh(mesh_spec, "b:tp;c:tp")
    t = torch_randn("b:8 c:16", 5)
    x = tm.distribute(t, "b c", mesh, layout=rules_on(mesh_spec, "b:tp"), requires_grad=True)
    tt = t.clone().requires_grad_()
    y = getattr(x, kind)("b")
    r = {"sum": tt.sum(0), "mean": tt.mean(0)}[kind]
    assert_matches(y, r, "c")
    assert y.tensor_layout == mesh.layout_of(y.shape)
    g = torch_randn("c:16", 6)
    y.backward(gradient=tm.distribute(g, "c", mesh))
    r.backward(g)
    assert x.grad.tensor_layout == x.tensor_layout
    assert_matches(x.grad, tt.grad, "b c")
    assert_matches(x.detach().max("b"), t.amax(0), "c")


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("rules", ["batch:dp,tp", "batch:tp;ff:dp"])
def test_random_is_layout_invariant_across_generator_blocks(rules, mesh_spec):
    """Rows of 2048 values: the generator blocks hold 32 rows, so shards start and end inside
    blocks and span several."""
    mesh, one = make_mesh(mesh_spec, rules), single_device()
    assert_matches(
        tm.randn("batch:48 ff:2048", mesh, seed=3),
        tm.randn("batch:48 ff:2048", one, seed=3).full(),
        "batch ff",
        rtol=0,
        atol=0,
    )
    ref = tm.dropout(tm.ones("batch:48 ff:2048", one), 0.3, seed=4).full()
    assert_matches(tm.dropout(tm.ones("batch:48 ff:2048", mesh), 0.3, seed=4), ref, "batch ff", rtol=0, atol=0)


# ---- uneven splits (the tables above run with uneven sizes too; here the cases of their own) -------
# Over tp:2, dp:2;tp:2 and dp:2;tp:4 these give blocks that differ by one, and (3 or 5 over the 8
# blocks of dp,tp on dp:2;tp:4) empty blocks.


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize(
    "old,new,rules",
    [
        ("ff", "hidden", "batch:dp;ff:tp"),
        ("hidden", "ff", "batch:dp;ff:tp"),
        ("ff", "batch2", "ff:dp;batch2:tp"),
        ("ff", "hidden", "ff:dp,tp;hidden:tp"),
    ],
)
def test_rename_uneven(old, new, rules, mesh_spec):
    check_op(
        make_mesh(mesh_spec, rules),
        {"x": f"batch:5 {old}:7"},
        lambda x: x.rename(**{old: new}) * 1.5,
        lambda x: x * 1.5,
        f"batch {new}",
    )


UNEVEN_RA_CASES = {
    "split_heads_3": (
        "batch:5 ff:12",
        "batch (heads dh) -> batch heads dh",
        {"heads": 3},
        "ff:tp;heads:tp;batch:dp",
        lambda x: x.reshape(5, 3, 4),
        "batch heads dh",
    ),
    "merge_heads_3": (
        "batch:5 heads:3 dh:4",
        "batch heads dh -> batch (heads dh):ff",
        {},
        "ff:tp;heads:tp",
        lambda x: x.reshape(5, 12),
        "batch ff",
    ),
    "transpose": ("batch:5 ff:7", "batch ff -> ff batch", {}, "batch:dp;ff:tp", lambda x: x.T, "ff batch"),
    "split_uneven_batch": (
        "batch:5 ff:12",
        "batch (heads dh) -> batch heads dh",
        {"heads": 4},
        "batch:dp;heads:tp",
        lambda x: x.reshape(5, 4, 3),
        "batch heads dh",
    ),
    "merge_uneven_batch": (
        "batch:5 heads:4 dh:3",
        "batch heads dh -> batch (heads dh):ff",
        {},
        "batch:dp;ff:tp;heads:tp",
        lambda x: x.reshape(5, 12),
        "batch ff",
    ),
}


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case", [*RA_CASES, *UNEVEN_RA_CASES])
def test_rearrange(case, mesh_spec):
    dims, pattern, sizes, rules, torch_fn, out = {**RA_CASES, **UNEVEN_RA_CASES}[case]
    check_op(make_mesh(mesh_spec, rules), {"x": dims}, lambda x: tm.rearrange(x, pattern, **sizes), torch_fn, out)


@pytest.mark.parametrize("rules", ["seq:tp", "seq:tp,dp", "f:tp;seq:dp"])
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("offset", [1, -1, 3, -6, 13, 14])
def test_shift_uneven(offset, wrap, mesh_spec, rules):
    run_case(
        make_mesh(mesh_spec, rules),
        {"x": "f:5 seq:13"},
        lambda x: tm.shift(x, "seq", offset, wrap=wrap),
        lambda x: torch_shift(x, offset, 1, wrap),
        "f seq",
    )


@pytest.mark.parametrize("rules", ["batch:dp;ff:tp", "ff:dp,tp", "batch:tp"])
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_random_and_dropout_uneven(mesh_spec, rules):
    mesh, one = make_mesh(mesh_spec, rules), single_device()
    for fn in (tm.randn, tm.rand):
        assert_matches(
            fn("batch:5 ff:7", mesh, seed=11), fn("batch:5 ff:7", one, seed=11).full(), "batch ff", rtol=0, atol=0
        )
    keep = tm.dropout(tm.ones("batch:5 ff:7", one), 0.25, seed=9).full()
    assert_matches(tm.dropout(tm.ones("batch:5 ff:7", mesh), 0.25, seed=9), keep, "batch ff", rtol=0, atol=0)


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_constructors_uneven(mesh_spec):
    mesh = make_mesh(mesh_spec, "batch:dp,tp;ff:tp")
    assert_matches(tm.zeros("batch:3 d:2", mesh), torch.zeros(3, 2), "batch d")
    assert_matches(tm.full("batch:5", 2.5, mesh), torch.full((5,), 2.5), "batch")
    assert_matches(tm.arange("batch:7", mesh), torch.arange(7), "batch")
    assert_matches(tm.arange("ff:1", mesh), torch.arange(1), "ff")
