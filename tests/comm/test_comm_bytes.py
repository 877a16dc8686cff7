"""Exact communication of each op, from the table of docs/design.md, "Communication" and the ring formulas of
torchmesh/comm/stats.py: kind, axes, bytes per device, phase. Every expected number is
computed here by hand from the shapes (fp32: 4 bytes; bool reductions: uint8, 1 byte), and
every op that the table says is local must record nothing at all.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import (
    all_gather_bytes as ag,
)
from reference import (
    all_reduce_bytes as ar,
)
from reference import (
    all_to_all_bytes as a2a,
)
from reference import (
    make_mesh,
    measure,
)
from reference import (
    reduce_scatter_bytes as rs,
)

import torchmesh as tm

F32 = 4


def recs(stats: tm.CommStats) -> list[tuple]:
    return [(r.kind, r.axes, r.bytes, r.phase) for r in stats.records]


def test_ring_formulas_match_stats_table():
    """The helpers used below are the table of torchmesh/comm/stats.py (S = 1024 bytes)."""
    assert [ar(k, 1024) for k in (1, 2, 4, 8)] == [0, 1024, 1536, 1792]
    assert [ag(k, 1024) for k in (1, 2, 4)] == [0, 1024, 3072]
    assert [rs(k, 1024) for k in (1, 2, 4)] == [0, 512, 768]
    assert [a2a(k, 1024) for k in (2, 4)] == [512, 768]


# ---- einsum ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mesh_spec,rules,axes,k",
    [
        ("tp:2", "d:tp", ("tp",), 2),
        ("tp:4", "d:tp", ("tp",), 4),
        ("dp:2;tp:2", "d:tp", ("tp",), 2),
        ("dp:2;tp:4", "d:dp,tp", ("dp", "tp"), 8),
    ],
)
def test_einsum_contracted_split_is_one_all_reduce_and_free_backward(mesh_spec, rules, axes, k):
    mesh = make_mesh(mesh_spec, rules)
    x = tm.randn("batch:8 d:16", mesh, seed=0, requires_grad=True)
    w = tm.randn("d:16 ff:16", mesh, seed=1, requires_grad=True)
    g = tm.randn("batch:8 ff:16", mesh, seed=2)
    s = measure(lambda: tm.einsum("batch d, d ff -> batch ff", x, w))
    assert s.counts == {"all_reduce": 1}
    assert recs(s) == [("all_reduce", axes, ar(k, 8 * 16 * F32), "forward")]  # 2(k-1)/k * 8*16*4
    y = tm.einsum("batch d, d ff -> batch ff", x, w)
    # backward of an all-reduce is the identity; x and w's gradients are local
    assert measure(lambda: y.backward(gradient=g)).records == []


def test_einsum_batch_and_contracted_split():
    mesh = make_mesh("dp:2;tp:2", "batch:dp;d:tp")
    x, w = tm.randn("batch:8 d:16", mesh, seed=0), tm.randn("d:16 ff:16", mesh, seed=1)
    s = measure(lambda: tm.einsum("batch d, d ff -> batch ff", x, w))
    assert recs(s) == [("all_reduce", ("tp",), ar(2, 4 * 16 * F32), "forward")]  # local rows: 8/2


@pytest.mark.parametrize("k", [2, 4])
def test_einsum_reduce_scatter(k):
    """b, c -> c with b:tp and c:tp: b takes tp (contracted dims first), y is gathered along c,
    and the partial sums over b are reduce-scattered straight into c's layout."""
    mesh = make_mesh(f"tp:{k}", "b:tp;c:tp")
    x = tm.randn("b:8", mesh, seed=0, requires_grad=True)
    y = tm.randn("c:16", mesh, seed=1, requires_grad=True)
    g = tm.randn("c:16", mesh, seed=2)
    s = measure(lambda: tm.einsum("b, c -> c", x, y))
    assert s.counts == {"all_gather": 1, "reduce_scatter": 1}
    assert recs(s) == [
        ("all_gather", ("tp",), ag(k, 16 // k * F32), "forward"),  # y's shard of c
        ("reduce_scatter", ("tp",), rs(k, 16 * F32), "forward"),  # the full partial c
    ]
    out = tm.einsum("b, c -> c", x, y)
    s = measure(lambda: out.backward(gradient=g))
    assert recs(s) == [
        ("all_gather", ("tp",), ag(k, 16 // k * F32), "backward"),  # reduce-scatter's conjugate
        # y gathered over tp, then broadcast against b split over tp: its partial gradients
        # are summed and re-split in one reduce-scatter (not an all-reduce and a slice)
        ("reduce_scatter", ("tp",), rs(k, 16 * F32), "backward"),
    ]
    torch.testing.assert_close(y.grad.full(), x.full().sum() * g.full())


@pytest.mark.parametrize("k", [2, 4])
def test_megatron_mlp_is_one_all_reduce_each_way(k):
    mesh = make_mesh(f"tp:{k}", "ff:tp")
    x = tm.randn("batch:8 d:16", mesh, seed=0, requires_grad=True)
    w1 = tm.randn("d:16 ff:32", mesh, seed=1, requires_grad=True)
    w2 = tm.randn("ff:32 d:16", mesh, seed=2, requires_grad=True)
    g = tm.randn("batch:8 d:16", mesh, seed=3)
    with tm.comm_stats() as s:
        y = tm.einsum("batch ff, ff d -> batch d", F.gelu(tm.einsum("batch d, d ff -> batch ff", x, w1)), w2)
        y.backward(gradient=g)
    assert recs(s) == [
        ("all_reduce", ("tp",), ar(k, 8 * 16 * F32), "forward"),  # Megatron's g
        ("all_reduce", ("tp",), ar(k, 8 * 16 * F32), "backward"),  # Megatron's f: x's gradient
    ]
    assert s.bytes_by("phase") == {"forward": ar(k, 512), "backward": ar(k, 512)}


# ---- elementwise ----------------------------------------------------------------------------------
LOCAL_EW = {
    "add": lambda x, b, c: x + b,
    "relu_mul": lambda x, b, c: torch.relu(x) * b,
    "where": lambda x, b, c: torch.where(x > 0, x, b),
    "tm_where": lambda x, b, c: tm.where(c > 0, x, 0.0),
    "gelu_exp": lambda x, b, c: F.gelu(x) + torch.exp(x),
    "compare": lambda x, b, c: (x > b) & (x <= c),
    "outer": lambda x, b, c: c * b,
    "casts": lambda x, b, c: x.to(torch.float64) + x.bfloat16().float(),
    "detach": lambda x, b, c: x.detach() * 2,
    "dropout": lambda x, b, c: tm.dropout(x, 0.5, seed=1),
    "random": lambda x, b, c: tm.randn("batch:8 ff:16", x.mesh, seed=1) * tm.rand("ff:16", x.mesh, seed=2),
}


@pytest.mark.parametrize("mesh_spec", ["dp:2;tp:2", "dp:2;tp:4"])
@pytest.mark.parametrize("op", list(LOCAL_EW))
def test_elementwise_in_rules_layout_moves_nothing(op, mesh_spec):
    mesh = make_mesh(mesh_spec, "batch:dp;ff:tp")
    x, b, c = (tm.randn(d, mesh, seed=i) for i, d in enumerate(["batch:8 ff:16", "ff:16", "batch:8"]))
    s = measure(lambda: LOCAL_EW[op](x, b, c))
    assert s.records == [] and s.total_bytes == 0 and s.counts == {}


@pytest.mark.parametrize("mesh_spec,kdp,ktp", [("dp:2;tp:2", 2, 2), ("dp:2;tp:4", 2, 4)])
def test_broadcast_gradient_summed_over_the_split_axis(mesh_spec, kdp, ktp):
    """x[batch ff] + b[ff] with batch over dp: nothing forward; b's gradient (its shard of ff)
    is all-reduced over dp in backward; x's is local."""
    mesh = make_mesh(mesh_spec, "batch:dp;ff:tp")
    x = tm.randn("batch:8 ff:16", mesh, seed=0, requires_grad=True)
    b = tm.randn("ff:16", mesh, seed=1, requires_grad=True)
    g = tm.randn("batch:8 ff:16", mesh, seed=2)
    with tm.comm_stats() as s:
        y = x + b
        n_forward = len(s.records)
        y.backward(gradient=g)
    assert n_forward == 0
    assert recs(s) == [("all_reduce", ("dp",), ar(kdp, 16 // ktp * F32), "backward")]
    torch.testing.assert_close(b.grad.full(), g.full().sum(0))


def test_elementwise_relays_out_an_input_held_differently():
    """An input held in another layout is brought to the rules' layout first (here an
    all-to-all moving tp from batch to ff)."""
    mesh = make_mesh("tp:4", "ff:tp")
    x = tm.distribute(torch.randn(8, 16), "batch ff", mesh, layout="batch:tp")
    b = tm.randn("ff:16", mesh, seed=1)
    s = measure(lambda: x + b)
    assert recs(s) == [("all_to_all", ("tp",), a2a(4, 2 * 16 * F32), "forward")]


# ---- reductions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh_spec,k", [("tp:2", 2), ("tp:4", 4)])
def test_reductions_over_a_split_dim(mesh_spec, k):
    mesh = make_mesh(mesh_spec, "ff:tp")
    x = tm.randn("batch:8 ff:16", mesh, seed=0)
    xg = tm.randn("batch:8 ff:16", mesh, seed=0, requires_grad=True)
    one = ("all_reduce", ("tp",), ar(k, 8 * F32), "forward")  # the partial result: 8 floats
    assert recs(measure(lambda: x.sum("ff"))) == [one]
    assert recs(measure(lambda: x.mean("ff"))) == [one]
    assert recs(measure(lambda: x.max("ff"))) == [one]  # no gradient: just the max
    assert recs(measure(lambda: x.min("ff"))) == [one]
    # with a gradient, max also counts the ties and sums the picked values: 3 all-reduces
    assert recs(measure(lambda: xg.max("ff"))) == [one] * 3
    assert recs(measure(lambda: tm.logsumexp(x, "ff"))) == [one] * 2  # max, then sum of exp
    assert recs(measure(lambda: tm.softmax(x, "ff"))) == [one] * 2
    assert recs(measure(lambda: tm.log_softmax(x, "ff"))) == [one] * 2
    # any/all reduce uint8 flags: 8 bytes
    assert recs(measure(lambda: (x > 1).any("ff"))) == [("all_reduce", ("tp",), ar(k, 8), "forward")]
    assert recs(measure(lambda: (x > -1).all("ff"))) == [("all_reduce", ("tp",), ar(k, 8), "forward")]


def test_reductions_over_unsplit_dims_move_nothing():
    mesh = make_mesh("dp:2;tp:2", "batch:dp;ff:tp")
    x = tm.randn("batch:8 seq:4 ff:16", mesh, seed=0, requires_grad=True)
    for fn in (
        lambda: x.sum("seq"),
        lambda: x.max("seq"),
        lambda: tm.softmax(x, "seq"),
        lambda: tm.logsumexp(x, "seq"),
        lambda: (x > 0).any("seq"),
        lambda: x.mean("seq"),
    ):
        assert measure(fn).records == []


@pytest.mark.parametrize("mesh_spec,k", [("dp:2;tp:2", 4), ("dp:2;tp:4", 8)])
def test_reducing_every_dim_is_one_scalar_all_reduce(mesh_spec, k):
    mesh = make_mesh(mesh_spec, "batch:dp;ff:tp")
    x = tm.randn("batch:8 ff:16", mesh, seed=0, requires_grad=True)
    s = measure(lambda: x.sum().backward())
    assert recs(s) == [("all_reduce", ("dp", "tp"), ar(k, F32), "forward")]  # 2(k-1)/k * 4: 6 or 7
    assert measure(lambda: x.mean()).total_bytes == ar(k, F32)


# ---- rename, rearrange, relayout --------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 4])
def test_rename_split_to_replicated_all_gathers(k):
    mesh = make_mesh(f"tp:{k}", "ff:tp")
    x = tm.randn("batch:8 ff:16", mesh, seed=0, requires_grad=True)
    s = measure(lambda: x.rename(ff="hidden"))
    assert recs(s) == [("all_gather", ("tp",), ag(k, 8 * 16 // k * F32), "forward")]
    y = x.rename(ff="hidden")
    assert measure(lambda: y.backward(gradient=tm.randn("batch:8 hidden:16", mesh, seed=1))).records == []


@pytest.mark.parametrize("k", [2, 4])
def test_rename_replicated_to_split_is_local(k):
    mesh = make_mesh(f"tp:{k}", "ff:tp")
    x = tm.randn("batch:8 hidden:16", mesh, seed=0, requires_grad=True)
    assert measure(lambda: x.rename(hidden="ff")).records == []
    y = x.rename(hidden="ff")
    s = measure(lambda: y.backward(gradient=tm.randn("batch:8 ff:16", mesh, seed=1)))
    assert recs(s) == [("all_gather", ("tp",), ag(k, 8 * 16 // k * F32), "backward")]  # the slice's conjugate


def test_rename_between_axes_gathers_then_slices():
    """Split over dp -> split over tp: an all-gather over dp, then a local slice over tp (as
    docs/concepts.md documents)."""
    mesh = make_mesh("dp:2;tp:2", "a:dp;b:tp")
    x = tm.randn("a:8 c:4", mesh, seed=0)
    s = measure(lambda: x.rename(a="b"))
    assert recs(s) == [("all_gather", ("dp",), ag(2, 4 * 4 * F32), "forward")]


@pytest.mark.parametrize("mesh_spec", ["tp:2", "tp:4", "dp:2;tp:4"])
def test_local_rearrange_moves_nothing(mesh_spec):
    mesh = make_mesh(mesh_spec, "batch:dp;ff:tp;heads:tp")
    x = tm.randn("batch:8 ff:16", mesh, seed=0, requires_grad=True)
    h = tm.randn("batch:8 heads:4 dh:4", mesh, seed=1, requires_grad=True)
    with tm.comm_stats() as s:
        a = tm.rearrange(x, "batch (heads dh) -> batch heads dh", heads=4)
        b = tm.rearrange(h, "batch heads dh -> batch (heads dh):ff")
        c = tm.rearrange(x, "batch ff -> ff batch")
        a.backward(gradient=tm.randn("batch:8 heads:4 dh:4", mesh, seed=2))
        b.backward(gradient=tm.randn("batch:8 ff:16", mesh, seed=3))
        c.backward(gradient=tm.randn("ff:16 batch:8", mesh, seed=4))
    assert s.records == []
    torch.testing.assert_close(a.full(), x.full().reshape(8, 4, 4))
    torch.testing.assert_close(b.full(), h.full().reshape(8, 16))


@pytest.mark.parametrize("k", [2, 4])
def test_rearrange_relayout_gathers_the_dim(k):
    """dh (not the outermost part of ff) is split: ff is gathered, the result sliced locally."""
    mesh = make_mesh(f"tp:{k}", "ff:tp;dh:tp")
    x = tm.randn("batch:8 ff:16", mesh, seed=0)
    s = measure(lambda: tm.rearrange(x, "batch (heads dh) -> batch heads dh", heads=4))
    assert recs(s) == [("all_gather", ("tp",), ag(k, 8 * 16 // k * F32), "forward")]


@pytest.mark.parametrize("k", [2, 4])
def test_relayout_collectives(k):
    mesh = make_mesh(f"dp:2;tp:{k}", "batch:dp;ff:tp")
    x = tm.randn("batch:8 ff:16", mesh, seed=0)
    shard = 8 // 2 * 16 // k * F32
    assert recs(measure(lambda: x.relayout("batch:dp"))) == [("all_gather", ("tp",), ag(k, shard), "forward")]
    assert recs(measure(lambda: x.relayout("batch:dp;ff:tp"))) == []
    # tp moves from ff to batch: one all-to-all (batch is then split over dp, tp)
    assert recs(measure(lambda: x.relayout("batch:dp,tp"))) == [("all_to_all", ("tp",), a2a(k, shard), "forward")]
    r = tm.distribute(torch.randn(8, 16), "batch ff", mesh, layout="")
    assert recs(measure(lambda: r.relayout())) == []  # replicated -> split: local slices
    # to replicated: gather batch over dp, then ff over tp (a device then holds 2x the rows)
    assert recs(measure(lambda: x.relayout(""))) == [
        ("all_gather", ("dp",), ag(2, shard), "forward"),
        ("all_gather", ("tp",), ag(k, shard * 2), "forward"),
    ]


def test_relayout_two_axis_dim_to_two_dims_is_one_all_to_all():
    mesh = make_mesh("dp:2;tp:4", "batch:dp,tp")
    x = tm.randn("batch:8 ff:16", mesh, seed=0)
    s = measure(lambda: x.relayout("batch:dp;ff:tp"))
    assert recs(s) == [("all_to_all", ("tp",), a2a(4, 1 * 16 * F32), "forward")]


# ---- gather, one_hot ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 4])
def test_lookups_over_split_vocab_all_reduce_the_result(k):
    mesh = make_mesh(f"tp:{k}", "vocab:tp")
    table = tm.randn("vocab:16 d:8", mesh, seed=0)
    logits = tm.randn("batch:8 vocab:16", mesh, seed=1)
    ids = tm.distribute(torch.tensor([1, 9, 3, 15, 0, 2, 7, 7]), "batch", mesh)
    assert recs(measure(lambda: tm.gather(table, ids, "vocab"))) == [
        ("all_reduce", ("tp",), ar(k, 8 * 8 * F32), "forward")
    ]
    assert recs(measure(lambda: tm.gather(logits, ids, "vocab"))) == [
        ("all_reduce", ("tp",), ar(k, 8 * F32), "forward")
    ]
    assert measure(lambda: tm.one_hot(ids, "vocab:16")).records == []


def test_one_hot_moves_nothing_with_split_index():
    mesh = make_mesh("dp:2;tp:2", "batch:dp;vocab:tp")
    ids = tm.distribute(torch.arange(8) % 5, "batch", mesh)
    s = measure(lambda: tm.one_hot(ids, "vocab:16"))
    assert s.records == []
    torch.testing.assert_close(tm.one_hot(ids, "vocab:16").full(), F.one_hot(torch.arange(8) % 5, 16).float())


# ---- slice, concat, pad, shift ----------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 4])
def test_slice_concat_pad_along_split_dim_gather_it(k):
    mesh = make_mesh(f"tp:{k}", "seq:tp")
    x, y = tm.randn("seq:16 f:8", mesh, seed=0), tm.randn("seq:8 f:8", mesh, seed=1)
    one = ("all_gather", ("tp",), ag(k, 16 // k * 8 * F32), "forward")
    assert recs(measure(lambda: tm.slice(x, "seq", 4, 12))) == [one]
    assert recs(measure(lambda: tm.pad(x, "seq", 4, 4))) == [one]
    assert recs(measure(lambda: tm.concat([x, y], "seq"))) == [
        one,
        ("all_gather", ("tp",), ag(k, 8 // k * 8 * F32), "forward"),
    ]


def test_slice_concat_pad_along_unsplit_dim_move_nothing():
    mesh = make_mesh("dp:2;tp:2", "seq:tp;batch:dp")
    x, y = tm.randn("seq:16 f:8 batch:4", mesh, seed=0), tm.randn("seq:16 f:8 batch:4", mesh, seed=1)
    for fn in (lambda: tm.slice(x, "f", 2, 6), lambda: tm.pad(x, "f", 4, 4), lambda: tm.concat([x, y], "f")):
        assert measure(fn).records == []


@pytest.mark.parametrize(
    "offset,wrap,expected",
    [
        # tp:4, seq:16: 4 rows a shard, rows of 4 floats (16 bytes)
        (1, False, [16]),  # one boundary row
        (-1, True, [16]),
        (3, False, [48]),
        (4, False, [64]),  # exactly one shard: the whole block, in one exchange
        (5, False, [16, 48]),  # across a shard: 1 row from two blocks back, 3 rows from one back
        (-6, True, [32, 32]),
        (0, False, []),
        (16, True, []),  # a whole turn: the identity
        (16, False, []),  # past the end: zeros, nothing sent
        (13, False, [48]),  # 3 rows one... three blocks ahead; the 1 row four blocks ahead falls off
    ],
)
def test_shift_sends_only_the_rows_a_device_lacks(offset, wrap, expected):
    mesh = make_mesh("tp:4", "seq:tp")
    x = tm.randn("seq:16 f:4", mesh, seed=0, requires_grad=True)
    g = tm.randn("seq:16 f:4", mesh, seed=1)
    with tm.comm_stats() as s:
        y = tm.shift(x, "seq", offset, wrap=wrap)
        n = len(s.records)
        y.backward(gradient=g)
    fwd, bwd = s.records[:n], s.records[n:]
    assert [r.bytes for r in fwd] == expected and all(r.kind == "shift" and r.axes == ("tp",) for r in fwd)
    assert sorted(r.bytes for r in bwd) == sorted(expected) and all(r.phase == "backward" for r in bwd)
    full = x.full().detach()
    src = torch.arange(16) - offset
    ref = full[src % 16] * ((src >= 0) & (src < 16) | wrap)[:, None]
    torch.testing.assert_close(y.full(), ref)


# ---- one device ---------------------------------------------------------------------------------------
def test_one_device_never_communicates():
    mesh = make_mesh("dp:1;tp:1", "batch:dp;ff:tp")
    x = tm.randn("batch:8 ff:16", mesh, seed=0, requires_grad=True)
    w = tm.randn("ff:16 d:8", mesh, seed=1, requires_grad=True)
    ids = tm.distribute(torch.arange(8) % 3, "batch", mesh)
    with tm.comm_stats() as s:
        h = tm.einsum("batch ff, ff d -> batch d", tm.softmax(x, "ff"), w)
        y = tm.shift(h, "batch", 3) + tm.gather(w, ids, "ff") + x.rename(ff="hidden").max("hidden")
        (y.sum() + x.relayout("").sum()).backward()
    assert s.records == [] and s.total_bytes == 0


@pytest.mark.parametrize("dtype,size", [(torch.float64, 8), (torch.bfloat16, 2), (torch.float16, 2)])
def test_bytes_follow_the_dtype(dtype, size):
    mesh = make_mesh("tp:4", "d:tp")
    x = tm.randn("batch:8 d:16", mesh, seed=0).to(dtype)
    w = tm.randn("d:16 ff:16", mesh, seed=1).to(dtype)
    s = measure(lambda: tm.einsum("batch d, d ff -> batch ff", x, w))
    assert [(r.kind, r.bytes, r.dtype) for r in s.records] == [("all_reduce", ar(4, 8 * 16 * size), dtype)]
    assert measure(lambda: x.rename(d="e")).records[0].bytes == ag(4, 8 * 4 * size)


@pytest.mark.parametrize("k", [2, 4])
def test_reduction_into_a_dim_split_over_the_same_axis_reduce_scatters(k):
    mesh = make_mesh(f"tp:{k}", "b:tp;c:tp")
    x = tm.distribute(torch.randn(8, 16), "b c", mesh, layout="b:tp")
    assert recs(measure(lambda: x.sum("b"))) == [("reduce_scatter", ("tp",), rs(k, 16 * F32), "forward")]
    # max cannot be reduce-scattered by a sum: all-reduce of the max, then a local slice
    assert recs(measure(lambda: x.max("b"))) == [("all_reduce", ("tp",), ar(k, 16 * F32), "forward")]


# ---- uneven blocks: the same collectives, padding never counted -------------------------------
@pytest.mark.parametrize("k", [2, 4])
def test_uneven_blocks_count_only_their_data(k):
    """vocab:65 over tp:k (blocks of 33,32 or 17,16,16,16): a gather counts (k-1)/k of the
    gathered bytes; a reduction's all-reduce, the reduced tensor's; an all-to-all, the block's."""
    mesh = make_mesh(f"tp:{k}", "vocab:tp")
    x = tm.randn("batch:3 vocab:65", mesh, seed=0, requires_grad=True)
    stats = measure(lambda: x.full())
    assert [(r.kind, r.axes, r.bytes) for r in stats.records] == [("all_gather", ("tp",), (k - 1) * 3 * 65 * 4 // k)]
    stats = measure(lambda: x.sum("vocab"))
    assert [(r.kind, r.bytes) for r in stats.records] == [("all_reduce", ar(k, 3 * 4))]
    # a relayout to batch: one all-to-all of device 0's block (the largest) of the vocab
    stats = measure(lambda: tm.relayout(x, "batch:tp"))
    assert [(r.kind, r.bytes) for r in stats.records] == [("all_to_all", a2a(k, 3 * (33 if k == 2 else 17) * 4))]


def test_uneven_sizes_smaller_than_the_blocks():
    """3 over 4 devices (one block empty): gathered as 3 values, 2 of 3 sent on average per device."""
    mesh = make_mesh("tp:4", "vocab:tp")
    x = tm.randn("vocab:3", mesh, seed=0)
    assert [tuple(s.shape) for s in x.shards] == [(1,), (1,), (1,), (0,)]
    stats = measure(lambda: x.full())
    assert [(r.kind, r.bytes) for r in stats.records] == [("all_gather", 3 * 3 * 4 // 4)]


def test_rearrange_passes_an_uneven_dim_through_locally():
    """batch:5 over dp stays split through a reshape of the other dims: nothing moves."""
    mesh = make_mesh("dp:2;tp:2", "batch:dp;heads:tp")
    x = tm.randn("batch:5 ff:12", mesh, seed=0)
    stats = measure(lambda: tm.rearrange(x, "batch (heads dh) -> batch heads dh", heads=4))
    assert stats.records == []
