"""The op vocabulary beyond einsum and reductions (torchmesh/tensor/selection.py, scan.py,
stacking.py, construct.py's *_like, einsum's broadcast to new dims) against single-device
torch, forward and backward, on the meshes of `reference.MESHES`.

Each op runs under rules that split its dims over one axis, over two axes, or not at all,
with even and uneven sizes (1, 3, 5, 7, 65 over axes of 2 and 4: a dim of 3 over 4 devices
has an empty block). The communication each op documents in docs/concepts.md is asserted
with `tm.comm_stats()`: kinds, axes and bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from reference import (
    MESHES,
    assert_matches,
    build,
    check_op,
    make_mesh,
    names_of,
    rules_on,
    torch_randn,
)

import torchmesh as tm
from torchmesh.placement.mesh_shape import max_block

UNEVEN = [1, 3, 5, 7, 65]


def check_outputs(
    mesh: tm.Mesh, spec: dict, mesh_fn: Callable, torch_fn: Callable, out_dims: list[str], **tol
) -> tuple[dict, dict]:
    """`check_op` for ops returning a list of tensors: every output (dims in torch's order
    `out_dims[i]`) equals torch's and is laid out by the rules, and every floating-point
    input's gradient for the loss sum_i (y_i * g_i).sum() (floating-point outputs) equals
    torch's, shard by shard."""
    mts, ts, names = build(mesh, spec)
    ys, rs = list(mesh_fn(**mts)), list(torch_fn(**ts))
    assert len(ys) == len(rs) == len(out_dims), f"{len(ys)} outputs, torch gives {len(rs)}"
    loss, ref_loss = None, None
    for n, (y, r, dims) in enumerate(zip(ys, rs, out_dims)):
        assert_matches(y, r, dims, f"output {n}", **tol)
        assert y.tensor_layout == mesh.layout_of(y.shape), f"output {n} laid out as {y.tensor_layout}"
        if r.is_floating_point():
            g = torch_randn(" ".join(f"{d}:{s}" for d, s in zip(names_of(dims), r.shape)), 50 + n, r.dtype)
            term = (y * tm.distribute(g, names_of(dims), mesh)).sum()
            loss, ref_loss = (
                term if loss is None else loss + term,
                (r * g).sum() + (0 if ref_loss is None else ref_loss),
            )
    loss.backward()
    ref_loss.backward()
    for k, x in mts.items():
        if ts[k].is_floating_point():
            assert x.grad is not None and x.grad.tensor_layout == x.tensor_layout, f"grad of {k!r}"
            assert_matches(x.grad, ts[k].grad, names[k], f"grad of {k!r}", **tol)
    return mts, ts


def cycled(cases: list[tuple], rules: list[str], step: int = 0) -> list[tuple]:
    """Each case once, with the rules taken in turn (every `step` cases the turn skips one
    more, so that cases repeating with a period of len(rules) still meet every rule)."""
    return [(*c, rules[(i + (i // len(rules)) * step) % len(rules)]) for i, c in enumerate(cases)]


def live_axes(mesh: tm.Mesh, x: tm.MeshTensor, dim: str) -> tuple[str, ...]:
    """The axes of size > 1 splitting `dim` of `x` (the ones that communicate)."""
    return tuple(a for a in x.tensor_layout.axes_of(dim) if mesh.axis_size(a) > 1)


def records(stats: tm.CommStats) -> list[tuple]:
    return [(r.kind, r.axes, r.bytes, r.phase) for r in stats.records]


# ---- top_k, argmax, argmin ------------------------------------------------------------------------
TOPK_RULES = ["vocab:tp", "vocab:dp,tp", "batch:dp;vocab:tp;k:tp", "batch:tp", "vocab:tp,dp;k:dp"]
TOPK_CASES = [(n, k) for n in UNEVEN for k in sorted({1, min(2, n), n})]


@pytest.mark.parametrize("rules", TOPK_RULES)
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("n,k", TOPK_CASES)
def test_top_k(n, k, mesh_spec, rules):
    """Values (and their gradient) and global indices as torch.topk's; the k dim ends split
    where the rules split it."""
    check_outputs(
        make_mesh(mesh_spec, rules),
        {"x": f"batch:3 vocab:{n}"},
        lambda x: tm.top_k(x, "vocab", k),
        lambda x: torch.topk(x, k, 1),
        ["batch k", "batch k"],
    )


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("rules", ["vocab:dp,tp;hits:tp", "vocab:tp;batch:dp", "vocab:tp;hits:dp"])
def test_top_k_smallest_on_the_first_dim_with_a_new_name(mesh_spec, rules):
    check_outputs(
        make_mesh(mesh_spec, rules),
        {"x": "vocab:7 batch:5 seq:2"},
        lambda x: tm.top_k(x, "vocab", 3, new_dim="hits", largest=False),
        lambda x: torch.topk(x, 3, 0, largest=False),
        ["hits batch seq"] * 2,
    )


def stable_top_k(t: torch.Tensor, k: int, dim: int, largest: bool = True):
    """The documented tie rule: equal values in index order (a stable sort)."""
    values, order = torch.sort(t, dim=dim, descending=largest, stable=True)
    return values.narrow(dim, 0, k), order.narrow(dim, 0, k)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("rules", ["vocab:tp", "vocab:dp,tp", "vocab:tp,dp"])
@pytest.mark.parametrize("largest", [True, False])
def test_top_k_ties_go_to_the_lower_index_on_every_mesh(largest, rules, mesh_spec):
    """Values drawn from {-1, 0, 1} (ties everywhere), -inf (ties with the padding of short
    blocks) and, for the smallest, +inf: the indices are those of a stable sort, whatever the
    blocks; the gradient goes to the chosen elements."""
    t = torch.randint(-1, 2, (4, 7), generator=torch.Generator().manual_seed(1)).float()
    t[0] = float("-inf")
    t[1, 2:] = float("inf") if not largest else float("-inf")
    for k in (1, 3, 7):
        check_outputs(
            make_mesh(mesh_spec, rules),
            {"x": ("batch vocab", t)},
            lambda x, k=k: tm.top_k(x, "vocab", k, largest=largest),
            lambda x, k=k: stable_top_k(x, k, 1, largest),
            ["batch k", "batch k"],
        )


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("rules", ["vocab:tp", "vocab:dp,tp"])
def test_top_k_nan_counts_as_largest_like_torch(rules, mesh_spec):
    t = torch_randn("batch:3 vocab:7", 5)
    t[0, 5], t[1, 0], t[1, 6], t[2, 3] = float("nan"), float("nan"), float("nan"), float("inf")
    x = tm.distribute(t, "batch vocab", make_mesh(mesh_spec, rules))
    for k, largest in ((1, True), (3, True), (6, False), (7, False)):
        values, indices = tm.top_k(x, "vocab", k, largest=largest)
        ref_values, ref_indices = stable_top_k(t, k, 1, largest)
        assert_matches(values, ref_values, "batch k", equal_nan=True)
        assert_matches(indices, ref_indices, "batch k")
        torch.testing.assert_close(values.full(), torch.topk(t, k, 1, largest=largest)[0], equal_nan=True)


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_top_k_of_integers(mesh_spec):
    t = torch.randint(-3, 4, (3, 65), generator=torch.Generator().manual_seed(2))
    t[0, :] = torch.iinfo(torch.int64).min  # ties with the padding value
    mesh = make_mesh(mesh_spec, "vocab:dp,tp")
    x = tm.distribute(t, "batch vocab", mesh)
    for k, largest in ((4, True), (9, False), (65, True)):
        values, indices = tm.top_k(x, "vocab", k, largest=largest)
        ref_values, ref_indices = stable_top_k(t, k, 1, largest)
        assert_matches(values, ref_values, "batch k")
        assert_matches(indices, ref_indices, "batch k")


ARG_RULES = ["vocab:tp", "vocab:dp,tp", "batch:dp;vocab:tp", "batch:tp"]


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize(
    "kind,n,rules", cycled([(kind, n) for kind in ("argmax", "argmin") for n in UNEVEN], ARG_RULES)
)
def test_argmax_argmin(kind, n, rules, mesh_spec):
    fn = getattr(tm, kind)
    check_op(
        make_mesh(mesh_spec, rules),
        {"x": f"batch:3 vocab:{n}"},
        lambda x: fn(x, "vocab"),
        lambda x: getattr(torch, kind)(x, 1),
        "batch",
        grad=False,
    )


@pytest.mark.parametrize("rules", ["vocab:tp", "vocab:dp,tp", "vocab:tp,dp"])
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_argmax_argmin_first_occurrence_like_torch(mesh_spec, rules):
    """Ties (integer values, float and int dtypes), infinities and NaN give torch's indices:
    the first extreme, and a NaN's where there is one (torch.argmax/argmin propagate NaN)."""
    t = torch.randint(-2, 3, (6, 7), generator=torch.Generator().manual_seed(3)).float()
    t[0], t[1, 3:] = float("inf"), float("-inf")
    t[2, 5], t[3, 1], t[3, 6] = float("nan"), float("nan"), float("nan")
    mesh = make_mesh(mesh_spec, rules)
    for values in (t, t.nan_to_num(nan=2.0, posinf=3.0, neginf=-3.0).to(torch.int32)):
        x = tm.distribute(values, "batch vocab", mesh)
        assert_matches(x.argmax("vocab"), values.argmax(1), "batch")
        assert_matches(x.argmin("vocab"), values.argmin(1), "batch")
        assert_matches(tm.argmax(x, "batch"), values.argmax(0), "vocab")


def candidate_records(mesh: tm.Mesh, x: tm.MeshTensor, dim: str, k: int, rows: int) -> list[tuple] | None:
    """The all-gathers of top_k's candidates (values f32, indices int32) over the dim's axes,
    or None where they would weigh as much as the dim's block (the dim is gathered instead)."""
    axes, n = live_axes(mesh, x, dim), x.sizes[dim]
    block = max_block(n, mesh.shape, axes)
    c, group, want = min(k, block), 1, []
    if c * (4 + 4) >= block * 4:
        return None
    for a in reversed(axes):
        size = mesh.axis_size(a)
        want += [("all_gather", (a,), (size - 1) * rows * c * group * 4, "forward")] * 2
        group *= size
    return want


def gather_records(x: tm.MeshTensor, dim: str) -> list[tuple]:
    """The collectives that gather `dim` of x, other dims kept as they are."""
    with tm.comm_stats() as stats:
        x.detach().relayout(
            ";".join(
                f"{n}:{','.join(x.tensor_layout.axes_of(n))}" for n in x.dims if n != dim and x.tensor_layout.axes_of(n)
            )
        )
    return records(stats)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize(
    "rules,k",
    [("batch:dp;vocab:tp", 2), ("vocab:dp,tp", 3), ("vocab:dp,tp", 5), ("vocab:tp,dp;k:tp", 40), ("batch:tp", 5)],
)
def test_top_k_moves_only_candidates(k, rules, mesh_spec):
    """Two all-gathers (values, int32 indices) per axis of the dim, of min(k, largest block)
    candidates per block; where those would weigh as much as the block (k above half a
    block), the dim itself is gathered. Never more bytes than gathering the dim. Backward:
    nothing (each device keeps its own candidates' gradient), except an all-gather over k's
    axes where the rules split k."""
    mesh = make_mesh(mesh_spec, rules)
    n, batch = 65, 4
    x = tm.distribute(torch_randn(f"batch:{batch} vocab:{n}", 0), "batch vocab", mesh, requires_grad=True)
    with tm.comm_stats() as stats:
        values, indices = tm.top_k(x, "vocab", k)
    rows = batch // math.prod(mesh.axis_size(a) for a in live_axes(mesh, x, "batch"))
    whole = gather_records(x, "vocab")
    assert records(stats) == (candidate_records(mesh, x, "vocab", k, rows) or whole)
    assert stats.total_bytes <= sum(r[2] for r in whole)
    assert indices.dtype == torch.int64
    with tm.comm_stats() as stats:
        values.backward(gradient=tm.ones_like(values))
    k_axes = live_axes(mesh, values, "k")
    assert stats.counts == ({"all_gather": len(k_axes)} if k_axes else {})
    assert x.grad.sum().item() == pytest.approx(batch * k)


def test_top_k_small_k_sends_a_fraction_of_the_dim():
    """A vocab of 64000 over 4 devices, k=8: 32 candidates (values and indices) a row instead of
    the 48000 values of the other blocks."""
    if "dp:2;tp:4" not in MESHES:
        pytest.skip("needs the mesh dp:2;tp:4")
    mesh = make_mesh("dp:2;tp:4", "vocab:tp;batch:dp")
    x = tm.zeros("batch:2 vocab:64000", mesh)
    with tm.comm_stats() as stats:
        tm.top_k(x, "vocab", 8)
    assert records(stats) == [("all_gather", ("tp",), 3 * 8 * 4, "forward")] * 2


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("n", [7, 65])
def test_argmax_communication(n, mesh_spec):
    mesh = make_mesh(mesh_spec, "vocab:dp,tp")
    x = tm.distribute(torch_randn(f"batch:4 vocab:{n}", 1), "batch vocab", mesh)
    with tm.comm_stats() as stats:
        x.argmax("vocab")
    assert records(stats) == (candidate_records(mesh, x, "vocab", 1, 4) or gather_records(x, "vocab"))


# ---- cumsum --------------------------------------------------------------------------------------
def torch_cumsum(t: torch.Tensor, dim: int, exclusive: bool = False, reverse: bool = False) -> torch.Tensor:
    if reverse:
        t = t.flip(dim)
    out = t.cumsum(dim)
    if exclusive:
        out = out - t
    return out.flip(dim) if reverse else out


SCAN_RULES = ["seq:tp", "seq:dp,tp", "batch:dp;seq:tp", "batch:tp"]
SCAN_FLAGS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize(
    "n,exclusive,reverse,rules", cycled([(n, *f) for n in UNEVEN for f in SCAN_FLAGS], SCAN_RULES, 1)
)
def test_cumsum(n, exclusive, reverse, rules, mesh_spec):
    check_op(
        make_mesh(mesh_spec, rules),
        {"x": f"batch:3 seq:{n}"},
        lambda x: tm.cumsum(x, "seq", exclusive=exclusive, reverse=reverse),
        lambda x: torch_cumsum(x, 1, exclusive, reverse),
        "batch seq",
        atol=1e-4,
        rtol=1e-5,
    )


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_cumsum_method_on_the_first_dim_and_integers(mesh_spec):
    mesh = make_mesh(mesh_spec, "seq:tp,dp")
    check_op(
        mesh,
        {"x": "seq:65 f:3"},
        lambda x: x.cumsum("seq", reverse=True),
        lambda x: torch_cumsum(x, 0, reverse=True),
        "seq f",
        atol=1e-4,
        rtol=1e-5,
    )
    t = torch.randint(-5, 6, (65, 3), generator=torch.Generator().manual_seed(4), dtype=torch.int32)
    x = tm.distribute(t, "seq f", mesh)
    assert_matches(x.cumsum("seq"), t.cumsum(0), "seq f")  # int64, like torch
    assert_matches(tm.cumsum(x > 0, "seq", exclusive=True), (t > 0).cumsum(0) - (t > 0).long(), "seq f")


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("rules", ["batch:dp;seq:tp", "seq:dp,tp", "seq:tp,dp", "batch:tp"])
@pytest.mark.parametrize("reverse", [False, True])
def test_cumsum_communication(reverse, rules, mesh_spec):
    """Forward: one all-gather of the block totals (one number per row and block) per axis
    of the dim; backward: one reduce-scatter of their gradient per axis, in reverse order."""
    mesh = make_mesh(mesh_spec, rules)
    x = tm.distribute(torch_randn("batch:4 seq:64", 2), "batch seq", mesh, requires_grad=True)
    with tm.comm_stats() as stats:
        y = tm.cumsum(x, "seq", reverse=reverse)
    rows = 4 // math.prod(mesh.axis_size(a) for a in live_axes(mesh, x, "batch"))
    group, forward, backward = 1, [], []
    for a in reversed(live_axes(mesh, x, "seq")):
        size = mesh.axis_size(a)
        forward.append(("all_gather", (a,), (size - 1) * rows * group * 4, "forward"))
        group *= size
        backward.insert(0, ("reduce_scatter", (a,), (size - 1) * rows * group * 4 // size, "backward"))
    assert records(stats) == forward
    with tm.comm_stats() as stats:
        y.backward(gradient=tm.ones_like(y))
    assert records(stats) == backward
    assert_matches(
        x.grad,
        torch.arange(1.0, 65.0).expand(4, 64) if reverse else torch.arange(64.0, 0, -1).expand(4, 64),
        "batch seq",
    )


# ---- stack, unstack, split -------------------------------------------------------------------------
STACK_RULES = ["layer:tp", "layer:dp,tp", "d:tp;layer:dp", "batch:dp;d:tp", ""]


@pytest.mark.parametrize("rules", STACK_RULES)
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("count", [1, 3, 5])
def test_stack(count, mesh_spec, rules):
    spec = {f"x{i}": "batch:3 d:4" for i in range(count)}
    check_op(
        make_mesh(mesh_spec, rules),
        spec,
        lambda **xs: tm.stack(list(xs.values()), "layer"),
        lambda **ts: torch.stack(list(ts.values())),
        "layer batch d",
    )


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_stack_at_a_position_of_tensors_in_other_orders_and_layouts(mesh_spec):
    mesh = make_mesh(mesh_spec, "layer:tp;batch:dp")
    layout = rules_on(mesh_spec, "d:dp,tp")
    a, b, c = torch_randn("batch:3 d:5", 1), torch_randn("d:5 batch:3", 2), torch_randn("batch:3 d:5", 3)
    xs = [
        tm.distribute(a, "batch d", mesh, requires_grad=True),
        tm.distribute(b, "d batch", mesh, requires_grad=True),
        tm.distribute(c, "batch d", mesh, requires_grad=True, layout=layout),
    ]
    refs = [t.clone().requires_grad_() for t in (a, b, c)]
    y = tm.stack(xs, "layer", axis=1)
    r = torch.stack([refs[0], refs[1].T, refs[2]], 1)
    assert y.dims == ("batch", "layer", "d") and y.tensor_layout == mesh.layout_of(y.shape)
    assert_matches(y, r, "batch layer d")
    g = torch_randn("batch:3 layer:3 d:5", 4)
    (y * tm.distribute(g, "batch layer d", mesh)).sum().backward()
    (r * g).sum().backward()
    for x, ref, dims in zip(xs, refs, ["batch d", "d batch", "batch d"]):
        assert x.grad.tensor_layout == x.tensor_layout
        assert_matches(x.grad, ref.grad, dims)


@pytest.mark.parametrize("rules", ["layer:tp", "layer:dp,tp", "d:tp;layer:dp", ""])
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("n", [1, 3, 5])
def test_unstack(n, mesh_spec, rules):
    check_outputs(
        make_mesh(mesh_spec, rules),
        {"x": f"layer:{n} d:7"},
        lambda x: tm.unstack(x, "layer"),
        lambda x: list(torch.unbind(x)),
        ["d"] * n,
    )
    check_outputs(
        make_mesh(mesh_spec, rules),
        {"x": f"d:7 layer:{n}"},
        lambda x: x.unstack("layer"),
        lambda x: list(torch.unbind(x, 1)),
        ["d"] * n,
    )


SPLITS = [(7, [3, 4]), (7, [1, 5, 1]), (65, [32, 33]), (65, 16), (5, 2), (5, [0, 5]), (3, 3), (7, [2, 1, 1, 3])]


@pytest.mark.parametrize("rules", ["d:tp", "d:dp,tp", "batch:dp;d:tp", "batch:tp"])
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("n,sizes", SPLITS)
def test_split(n, sizes, mesh_spec, rules):
    pieces = [min(sizes, n - s) for s in range(0, n, sizes)] if isinstance(sizes, int) else sizes
    mts, _ = check_outputs(
        make_mesh(mesh_spec, rules),
        {"x": f"batch:3 d:{n}"},
        lambda x: tm.split(x, "d", sizes),
        lambda x: list(torch.split(x, sizes, 1)),
        ["batch d"] * len(pieces),
    )
    assert [p.sizes["d"] for p in tm.split(mts["x"], "d", sizes)] == pieces


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("rules", ["layer:tp", "layer:dp,tp", "batch:dp;layer:tp"])
def test_stack_unstack_split_communication(rules, mesh_spec):
    """stack: nothing forward, an all-gather of the gradient over the new dim's axes in
    backward; unstack and split of a split dim: one all-gather of it per axis forward."""
    mesh = make_mesh(mesh_spec, rules)
    xs = [tm.distribute(torch_randn("batch:4 d:8", i), "batch d", mesh, requires_grad=True) for i in range(8)]
    with tm.comm_stats() as stats:
        y = tm.stack(xs, "layer")
    assert stats.records == []
    layer_axes = live_axes(mesh, y, "layer")
    with tm.comm_stats() as stats:
        y.backward(gradient=tm.ones_like(y))
    assert [(r.kind, r.axes, r.phase) for r in stats.records] == [
        ("all_gather", (a,), "backward") for a in reversed(layer_axes)
    ]
    local = y.shards[0].numel() * 4
    with tm.comm_stats() as stats:
        pieces = tm.unstack(y.detach(), "layer")
    gathers, group = [], 1
    for a in reversed(layer_axes):
        gathers.append(("all_gather", (a,), (mesh.axis_size(a) - 1) * local * group, "forward"))
        group *= mesh.axis_size(a)
    assert records(stats) == gathers and len(pieces) == 8
    with tm.comm_stats() as stats:
        tm.split(y.detach(), "layer", [3, 5])
    assert records(stats) == gathers


# ---- zeros_like, ones_like, full_like ----------------------------------------------------------------
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("layout", [None, "d:dp,tp", ""])
def test_like_constructors_keep_dims_layout_and_mesh(layout, mesh_spec):
    mesh = make_mesh(mesh_spec, "batch:dp;d:tp")
    t = torch_randn("batch:5 d:7", 0)
    x = tm.distribute(t, "batch d", mesh, layout=None if layout is None else rules_on(mesh_spec, layout))
    with tm.comm_stats() as stats:
        made = [
            (tm.zeros_like(x), torch.zeros_like(t)),
            (tm.ones_like(x, dtype=torch.int32), torch.ones(5, 7, dtype=torch.int32)),
            (tm.full_like(x, 2.5, dtype=torch.float64), torch.full((5, 7), 2.5, dtype=torch.float64)),
        ]
    assert stats.records == []
    for y, ref in made:
        assert y.tensor_layout == x.tensor_layout and y.mesh is x.mesh and not y.requires_grad
        assert_matches(y, ref, "batch d")
    w = tm.zeros_like(x, requires_grad=True)
    (w * x).sum().backward()
    assert_matches(w.grad, t, "batch d")


# ---- einsum broadcasting to new dims -------------------------------------------------------------------
BCAST_RULES = ["k:tp", "k:dp,tp", "batch:dp;k:tp", "d:tp;k:dp", ""]


@pytest.mark.parametrize("rules", BCAST_RULES)
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("n", UNEVEN)
def test_einsum_broadcasts_to_a_new_dim(n, mesh_spec, rules):
    check_op(
        make_mesh(mesh_spec, rules),
        {"x": "batch:3 d:5"},
        lambda x: tm.einsum("batch d -> batch k d", x, sizes={"k": n}),
        lambda x: x[:, None, :].expand(3, n, 5),
        "batch k d",
    )


@pytest.mark.parametrize("rules", ["k:tp;ff:dp", "batch:dp;k:tp", "d:tp;k:dp"])
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_einsum_broadcast_with_a_contraction_and_the_mesh_tf_form(mesh_spec, rules):
    mesh = make_mesh(mesh_spec, rules)
    spec = {"x": "batch:3 d:5", "w": "d:5 ff:7"}
    check_op(
        mesh,
        spec,
        lambda x, w: tm.einsum("batch d, d ff -> k batch ff j", x, w, sizes={"k": 3, "j": 2}),
        lambda x, w: (x @ w)[None, :, :, None].expand(3, 3, 7, 2),
        "k batch ff j",
    )
    check_op(
        mesh,
        spec,
        lambda x, w: tm.einsum([x, w], output_shape=[tm.Dim("batch", 3), tm.Dim("k", 5), "ff"]),
        lambda x, w: (x @ w)[:, None, :].expand(3, 5, 7),
        "batch k ff",
    )
    check_op(
        mesh,
        spec,
        lambda x, w: tm.einsum([x, w], output_shape="k:3 batch ff"),
        lambda x, w: (x @ w)[None].expand(3, 3, 7),
        "k batch ff",
    )


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("rules", ["k:tp", "k:dp,tp", "batch:dp;k:tp", ""])
def test_einsum_broadcast_communication(rules, mesh_spec):
    """Forward: nothing (each device fills its own block of the new dim); backward: the
    input's gradient summed over the new dim's axes, one all-reduce."""
    mesh = make_mesh(mesh_spec, rules)
    x = tm.distribute(torch_randn("batch:4 d:8", 3), "batch d", mesh, requires_grad=True)
    with tm.comm_stats() as stats:
        y = tm.einsum("batch d -> batch d k", x, sizes={"k": 8})
    assert stats.records == []
    k_axes = live_axes(mesh, y, "k")
    with tm.comm_stats() as stats:
        y.backward(gradient=tm.ones_like(y))
    local = x.shards[0].numel() * 4
    k = math.prod(mesh.axis_size(a) for a in k_axes)
    assert records(stats) == ([("all_reduce", k_axes, 2 * (k - 1) * local // k, "backward")] if k_axes else [])
    assert_matches(x.grad, torch.full((4, 8), 8.0), "batch d")


# ---- errors -------------------------------------------------------------------------------------
def test_errors_name_the_dims_and_the_fix():
    mesh = tm.Mesh("tp:2", rules="vocab:tp")
    x = tm.distribute(torch.randn(2, 5), "batch vocab", mesh)
    with pytest.raises(tm.DimError, match=r"k=6, but 'vocab' has size 5 .*k is an int from 1 to 5"):
        tm.top_k(x, "vocab", 6)
    with pytest.raises(tm.DimError, match=r"new_dim 'batch' is already a dim"):
        tm.top_k(x, "vocab", 2, new_dim="batch")
    with pytest.raises(tm.DimError, match=r"argmax: dims \(seq\) are not dims of the tensor \(batch, vocab\)"):
        tm.argmax(x, "seq")
    with pytest.raises(tm.ArgumentTypeError, match=r"cast first"):
        tm.argmax(x > 0, "vocab")
    with pytest.raises(tm.DimError, match=r"cumsum: dims \(seq\)"):
        tm.cumsum(x, "seq")
    for call in (lambda: x.argmax(-1), lambda: x.cumsum(1), lambda: x.top_k(1, 2), lambda: tm.unstack(x, 0)):
        with pytest.raises(TypeError, match=r"dims are named, not numbered; this tensor's dims are \(batch, vocab\)"):
            call()
    assert tm.argmax(x, tm.Dim("vocab", 5)).dims == ("batch",)  # a Dim names the dim too
    with pytest.raises(tm.DimError, match=r"sizes \[2, 2\] must be non-negative ints summing to the dim's size 5"):
        tm.split(x, "vocab", [2, 2])
    with pytest.raises(tm.DimError, match=r"tensor 0 has \{'batch': 2, 'vocab': 5\}, tensor 1 has"):
        tm.stack([x, tm.distribute(torch.randn(2, 4), "batch vocab", mesh)], "layer")
    with pytest.raises(tm.DimError, match=r"'vocab' is already a dim"):
        tm.stack([x, x], "vocab")
    with pytest.raises(tm.DimError, match=r"output dims \['k'\] are in no input.*sizes=\{'k': <size>\}"):
        tm.einsum("batch vocab -> batch vocab k", x)
    with pytest.raises(tm.DimError, match=r"sizes gives 'vocab' size 4, but the inputs have it with size 5"):
        tm.einsum("batch vocab -> batch vocab k", x, sizes={"k": 2, "vocab": 4})
    with pytest.raises(tm.DimError, match=r"sizes names 'kk', which is neither"):
        tm.einsum("batch vocab -> batch vocab k", x, sizes={"k": 2, "kk": 4})
