"""tm.conv1d / tm.conv2d, tm.max_pool2d / tm.avg_pool2d and tm.batch_norm (torchmesh/tensor/conv.py)
against torch's own functions: forward and every gradient, shard by shard, on one device and on
2x2 sim meshes with h split, w split, both, the batch split and the channels split, for filters
of 1, 3 and 5 and paddings SAME and VALID; the communication of a spatial split is the halo
only (tm.comm_stats). The 4-process gloo launch of these functions (and the modules) is in
tests/nn/test_conv_layers.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import assert_matches, check_op, make_mesh, measure, torch_randn

import torchmesh as tm

FOUR = "a:2;b:2"
#: layouts of a conv's dims on the 2x2 mesh (and the one-device mesh, no rules)
LAYOUTS = [
    ("dp:1", ""),
    (FOUR, "h:a"),  # h split
    (FOUR, "w:b"),  # w split
    (FOUR, "h:a;w:b"),  # both split
    (FOUR, "batch:a;h:b"),  # batch split (and h)
    (FOUR, "in_ch:a;w:b"),  # input channels split: partial sums
    (FOUR, "out_ch:a;h:b"),  # output channels split
]


def same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    """TF's (and Mesh TF's) SAME padding of a dim of size n: (before, after)."""
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def torch_conv2d(x, w, b=None, stride=1, padding="SAME"):
    """The reference: x is batch h w in_ch, w is out_ch in_ch kh kw; F.conv2d with TF's padding."""
    t = x.permute(0, 3, 1, 2).contiguous()
    if padding == "SAME":
        (ht, hb), (wl, wr) = (same_pads(t.shape[2], w.shape[2], stride), same_pads(t.shape[3], w.shape[3], stride))
        t = F.pad(t, (wl, wr, ht, hb))
    return F.conv2d(t, w, b, stride=stride).permute(0, 2, 3, 1)


def torch_conv1d(x, w, b=None, stride=1, padding="SAME"):
    """x is batch w in_ch, w is kw in_ch out_ch (Mesh TF's filter order)."""
    t = x.permute(0, 2, 1).contiguous()
    if padding == "SAME":
        t = F.pad(t, same_pads(t.shape[2], w.shape[0], stride))
    return F.conv1d(t, w.permute(2, 1, 0), b, stride=stride).permute(0, 2, 1)


#: every layout with a filter of 3, both paddings; filters of 1 and 5 on one device and with both
#: spatial dims split, and a few more layouts
CONV_CASES = (
    [(*layout, 3, padding) for layout in LAYOUTS for padding in ("SAME", "VALID")]
    + [(*LAYOUTS[i], k, padding) for i in (0, 3) for k in (1, 5) for padding in ("SAME", "VALID")]
    + [(*LAYOUTS[5], 1, "SAME"), (*LAYOUTS[4], 5, "VALID"), (*LAYOUTS[6], 5, "SAME"), (*LAYOUTS[2], 1, "VALID")]
    + [(*LAYOUTS[1], 5, "SAME")]
)


@pytest.mark.parametrize("mesh_spec,rules,k,padding", CONV_CASES)
def test_conv2d_equals_torch(mesh_spec, rules, k, padding):
    mesh = make_mesh(mesh_spec, rules)
    check_op(
        mesh,
        {"x": "batch:2 h:8 w:6 in_ch:2", "w": f"out_ch:4 in_ch:2 kh:{k} kw:{k}", "b": "out_ch:4"},
        lambda x, w, b: tm.conv2d(x, w, b, padding=padding),
        lambda x, w, b: torch_conv2d(x, w, b, padding=padding),
        "batch h w out_ch",
        atol=1e-4,
        rtol=1e-4,
    )


@pytest.mark.parametrize(
    "mesh_spec,rules,h,w,k,stride,padding",
    [
        ("dp:1", "", 7, 6, 3, 2, "SAME"),
        ("dp:1", "", 7, 6, 4, 3, "VALID"),
        (FOUR, "h:a;w:b", 8, 8, 5, 2, "SAME"),  # blocks of 4, a multiple of 2: halo exchange
        (FOUR, "h:a;w:b", 8, 8, 3, 2, "VALID"),
        (FOUR, "h:a;w:b", 6, 6, 3, 2, "SAME"),  # blocks of 3: gathered
        (FOUR, "h:a;out_ch:b", 7, 5, 3, 1, "SAME"),  # uneven blocks: gathered
        ("hp:4", "h:hp", 4, 3, 5, 1, "SAME"),  # a halo of 2 from blocks of 1: two neighbours each side
        ("hp:4", "h:hp", 8, 3, 4, 1, "SAME"),  # an even filter: 1 row before, 2 after
    ],
)
def test_conv2d_stride_uneven_and_long_halos(mesh_spec, rules, h, w, k, stride, padding):
    mesh = make_mesh(mesh_spec, rules)
    check_op(
        mesh,
        {"x": f"batch:2 h:{h} w:{w} in_ch:2", "w": f"out_ch:3 in_ch:2 kh:{k} kw:{k}"},
        lambda x, w: tm.conv2d(x, w, stride=stride, padding=padding),
        lambda x, w: torch_conv2d(x, w, stride=stride, padding=padding),
        "batch h w out_ch",
        atol=1e-4,
        rtol=1e-4,
    )


@pytest.mark.parametrize("mesh_spec,rules", [("dp:1", ""), (FOUR, "w:a;out_ch:b"), ("sp:4", "w:sp")])
@pytest.mark.parametrize("k,padding", [(1, "SAME"), (3, "VALID"), (5, "SAME")])
def test_conv1d_equals_torch(mesh_spec, rules, k, padding):
    mesh = make_mesh(mesh_spec, rules)
    check_op(
        mesh,
        {"x": "batch:2 w:8 in_ch:3", "w": f"kw:{k} in_ch:3 out_ch:2", "b": "out_ch:2"},
        lambda x, w, b: tm.conv1d(x, w, b, padding=padding),
        lambda x, w, b: torch_conv1d(x, w, b, padding=padding),
        "batch w out_ch",
        atol=1e-4,
        rtol=1e-4,
    )


def test_conv2d_named_dims_in_any_order():
    """Dims are found by name: a channels-first input and a Mesh TF-ordered filter."""
    mesh = make_mesh(FOUR, "h:a;w:b")
    xv, wv = torch_randn("batch:2 h:4 w:4 c:3", 0), torch_randn("fh:3 fw:3 c:3 f:5", 1)
    x = tm.distribute(xv.permute(3, 0, 1, 2), "c batch h w", mesh)
    w = tm.distribute(wv, "fh fw c f", mesh)
    y = tm.conv2d(x, w, spatial=("h", "w"), kernel=("fh", "fw"), channels=("c", "f"))
    assert y.dims == ("f", "batch", "h", "w")
    assert_matches(y, torch_conv2d(xv, wv.permute(3, 2, 0, 1)), "batch h w f", atol=1e-4, rtol=1e-4)


# ---- communication ----------------------------------------------------------------------------------
def _conv_stats(mesh, x_dims, k, stride=1, padding="SAME"):
    x = tm.randn(x_dims, mesh, seed=0, requires_grad=True)
    w = tm.randn(f"out_ch:4 in_ch:2 kh:{k} kw:{k}", mesh, seed=1, requires_grad=True)
    fwd = measure(lambda: tm.conv2d(x, w, stride=stride, padding=padding))
    y = tm.conv2d(x, w, stride=stride, padding=padding)
    bwd = measure(lambda: y.sum().backward())
    return fwd, bwd


def test_split_h_sends_only_the_halo():
    """h split in two: each device receives one row from each neighbour (zeros at the edges)."""
    mesh = tm.Mesh("a:2", rules="h:a")
    fwd, bwd = _conv_stats(mesh, "batch:2 h:8 w:6 in_ch:2", 3)
    row = 2 * 6 * 2 * 4  # batch x w x in_ch floats
    assert [(r.kind, r.axes, r.bytes) for r in fwd.records] == [("shift", ("a",), row)] * 2
    shifts = [r.bytes for r in bwd.records if r.kind == "shift"]
    assert shifts == [row, row]  # the halo's gradient goes back
    assert {r.kind for r in bwd.records} <= {"shift", "all_reduce"}  # (and the filter's gradient)


def test_both_split_halo_bytes_with_stride_and_long_halos():
    mesh = tm.Mesh("a:2;b:2", rules="h:a;w:b")
    # filter 5, stride 2: SAME pads 3 = 1 before + 2 after, each as rows of the neighbours' blocks
    fwd, _ = _conv_stats(mesh, "batch:2 h:8 w:8 in_ch:2", 5, stride=2)
    h_row, w_col = 2 * 4 * 2 * 4, 2 * 4 * 2 * 4  # a block is 4 x 4; w is exchanged on the grown block
    got = sorted((r.axes, r.bytes) for r in fwd.records if r.kind == "shift")
    assert got == sorted([(("a",), h_row), (("a",), 2 * h_row), (("b",), 7 * w_col // 4), (("b",), 14 * w_col // 4)])
    assert fwd.counts == {"shift": 4}
    # h of 4 over 4 devices, filter 5: two rows each side, one from each of two neighbours
    mesh = tm.Mesh("hp:4", rules="h:hp")
    fwd, _ = _conv_stats(mesh, "batch:1 h:4 w:3 in_ch:2", 5)
    assert [(r.kind, r.bytes) for r in fwd.records] == [("shift", 1 * 3 * 2 * 4)] * 4


def test_channel_splits_communicate_like_einsum():
    mesh = tm.Mesh("a:2", rules="in_ch:a")
    fwd, _ = _conv_stats(mesh, "batch:2 h:4 w:4 in_ch:2", 3)
    out_bytes = 2 * 4 * 4 * 4 * 4  # the output, batch h w out_ch floats
    assert [(r.kind, r.bytes) for r in fwd.records] == [("all_reduce", out_bytes)]  # 2(k-1)/k * S, k = 2
    mesh = tm.Mesh("a:2", rules="out_ch:a")
    fwd, _ = _conv_stats(mesh, "batch:2 h:4 w:4 in_ch:2", 3)
    assert fwd.records == []


def test_uneven_split_is_gathered_and_valid_output_is_recut():
    mesh = tm.Mesh("a:2", rules="h:a")
    fwd, _ = _conv_stats(mesh, "batch:1 h:7 w:2 in_ch:2", 3)
    assert fwd.counts == {"all_gather": 1}
    fwd, _ = _conv_stats(mesh, "batch:1 h:8 w:3 in_ch:2", 3, padding="VALID")
    assert fwd.counts == {"shift": 1, "all_gather": 1}  # the halo after each block, then 6 rows cut again


# ---- pooling ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh_spec,rules", [("dp:1", ""), (FOUR, "h:a;w:b"), (FOUR, "batch:a;c:b")])
@pytest.mark.parametrize("kind,window", [("max", 2), ("max", 3), ("avg", (4, 2)), ("avg", 2)])
def test_pool2d_equals_torch(mesh_spec, rules, kind, window):
    mesh = make_mesh(mesh_spec, rules)
    ops = {"max": (tm.max_pool2d, F.max_pool2d), "avg": (tm.avg_pool2d, F.avg_pool2d)}[kind]
    check_op(
        mesh,
        {"x": "batch:2 c:2 h:8 w:7"},
        lambda x: ops[0](x, window),
        lambda x: ops[1](x, window, window),
        "batch c h w",
    )


def test_max_pool_ties_go_where_torch_sends_them():
    """Ties inside a window: the gradient goes to one element, as F.max_pool2d's."""
    mesh = make_mesh(FOUR, "h:a;w:b")
    check_op(
        mesh,
        {"x": ("h w", torch.ones(4, 4))},
        lambda x: tm.max_pool2d(x, 2),
        lambda x: F.max_pool2d(x[None], 2)[0],
        "h w",
    )


def test_pool_on_blocks_communicates_nothing():
    mesh = tm.Mesh("a:2;b:2", rules="h:a;w:b")
    x = tm.randn("batch:2 h:8 w:4 c:3", mesh, seed=0, requires_grad=True)
    assert measure(lambda: tm.max_pool2d(x, 2)).counts == {}
    y = tm.avg_pool2d(x, 2)
    assert measure(lambda: (y * y).sum().backward()).counts == {"all_reduce": 1}  # the scalar loss only
    assert measure(lambda: tm.max_pool2d(x, 4)).counts == {"all_gather": 1}  # w's blocks of 2 < 4


def test_pool1d():
    mesh = make_mesh("sp:2", "w:sp")
    check_op(mesh, {"x": "b:3 w:8"}, lambda x: tm.max_pool1d(x, 2), lambda x: F.max_pool1d(x[:, None], 2)[:, 0], "b w")
    check_op(mesh, {"x": "b:3 w:8"}, lambda x: tm.avg_pool1d(x, 4), lambda x: F.avg_pool1d(x[:, None], 4)[:, 0], "b w")


# ---- batch norm -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mesh_spec,rules", [("dp:1", ""), (FOUR, "batch:a;h:b"), (FOUR, "batch:a,b"), (FOUR, "ch:a;w:b")]
)
def test_batch_norm_training_with_running_stats_equals_torch(mesh_spec, rules):
    mesh = make_mesh(mesh_spec, rules)
    rm, rv = torch.zeros(3), torch.ones(3)
    mean, var = tm.zeros("ch:3", mesh), tm.ones("ch:3", mesh)
    for step in range(3):  # the running statistics follow torch's over several batches
        spec = {"x": "batch:4 ch:3 h:4 w:3", "g": "ch:3", "b": "ch:3"}
        check_op(
            mesh,
            spec,
            lambda x, g, b: tm.batch_norm(x, "ch", mean, var, g, b, training=True, momentum=0.2),
            lambda x, g, b: F.batch_norm(x, rm, rv, g, b, training=True, momentum=0.2),
            "batch ch h w",
            seed=step,
        )
        assert_matches(mean, rm, "ch", "running_mean")
        assert_matches(var, rv, "ch", "running_var")
    check_op(
        mesh,
        {"x": "batch:4 ch:3 h:4 w:3", "g": "ch:3"},
        lambda x, g: tm.batch_norm(x, "ch", mean, var, g),
        lambda x, g: F.batch_norm(x, rm, rv, g),
        "batch ch h w",
    )


def test_batch_norm_statistics_are_all_reduced_over_split_dims():
    mesh = tm.Mesh("a:2;b:2", rules="batch:a;h:b")
    x = tm.randn("batch:4 h:4 ch:3", mesh, seed=0)
    s = measure(lambda: tm.batch_norm(x, "ch", training=True))
    assert s.counts == {"all_reduce": 2} and all(r.axes == ("a", "b") for r in s.records)  # mean and variance


# ---- errors -----------------------------------------------------------------------------------------
def test_errors_name_the_problem():
    mesh = tm.Mesh("a:2", rules="h:a")
    x = tm.randn("batch:1 h:4 w:4 in_ch:2", mesh, seed=0)
    w = tm.randn("out_ch:3 in_ch:2 kh:3 kw:3", mesh, seed=1)
    with pytest.raises(tm.ArgumentError, match="padding='FULL'"):
        tm.conv2d(x, w, padding="FULL")
    with pytest.raises(tm.ArgumentError, match="stride=0"):
        tm.conv2d(x, w, stride=0)
    with pytest.raises(tm.DimError, match="exactly the dims"):
        tm.conv2d(x, tm.randn("out_ch:3 in_ch:2 kh:3", mesh, seed=1))
    with pytest.raises(tm.DimError, match="in_ch"):
        tm.conv2d(x, tm.randn("out_ch:3 in_ch:5 kh:3 kw:3", mesh, seed=1))
    with pytest.raises(tm.DimError, match="'VALID' leaves no output"):
        tm.conv2d(tm.randn("batch:1 h:2 w:4 in_ch:2", mesh, seed=0), w, padding="VALID")
    with pytest.raises(tm.DimError, match="'out_ch'"):
        tm.conv2d(x.rename(batch="out_ch"), w)
    with pytest.raises(tm.DimError, match="window 5"):
        tm.max_pool2d(x, 5)
    with pytest.raises(tm.DimError, match="more than one value per channel"):
        tm.batch_norm(tm.randn("batch:1 ch:2", mesh, seed=0), "ch", training=True)
    with pytest.raises(tm.ArgumentError, match="running_var is None"):
        tm.batch_norm(x, "in_ch")
