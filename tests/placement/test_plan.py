"""The redistribution planner as data, its execution on sim, and the mesh math under it."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchmesh as tm
from torchmesh.placement.dims import Dim
from torchmesh.placement.layout import TensorLayout, block_index, check, local_slices
from torchmesh.placement.mesh_shape import axis_groups, parts
from torchmesh.placement.plan import AllToAll, Gather, Slice, apply_step, plan_relayout
from torchmesh.tensor.relayout import to_layout


def lay(**dims: tuple) -> TensorLayout:
    """lay(a=(8, "dp", "tp"), b=(8,)): dim a of size 8 split over dp then tp, b replicated."""
    return TensorLayout(tuple(Dim(n, v[0]) for n, v in dims.items()), tuple(tuple(v[1:]) for v in dims.values()))


# ---- plans as data ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src, dst, plan",
    [
        # split -> replicated: all-gather
        (lay(a=(8, "dp"), b=(8,)), lay(a=(8,), b=(8,)), (Gather("dp", 0),)),
        # replicated -> split: local slice
        (lay(a=(8,), b=(8,)), lay(a=(8,), b=(8, "tp")), (Slice("tp", 1),)),
        # an axis moving between dims: all-to-all
        (lay(a=(8, "dp"), b=(8,)), lay(a=(8,), b=(8, "dp")), (AllToAll("dp", 0, 1),)),
        (lay(a=(8,), b=(8, "tp")), lay(a=(8, "tp"), b=(8,)), (AllToAll("tp", 1, 0),)),
        # a dim over (dp, tp) to fewer or other axes
        (lay(a=(8, "dp", "tp")), lay(a=(8, "dp")), (Gather("tp", 0),)),
        (lay(a=(8, "dp", "tp")), lay(a=(8, "tp")), (Gather("tp", 0), Gather("dp", 0), Slice("tp", 0))),
        (lay(a=(8, "dp", "tp")), lay(a=(8,)), (Gather("tp", 0), Gather("dp", 0))),
        (
            lay(a=(8, "dp", "tp")),
            lay(a=(8, "tp", "dp")),
            (Gather("tp", 0), Gather("dp", 0), Slice("tp", 0), Slice("dp", 0)),
        ),
        (lay(a=(8, "dp")), lay(a=(8, "dp", "tp")), (Slice("tp", 0),)),
        (lay(a=(8, "tp")), lay(a=(8, "dp", "tp")), (Gather("tp", 0), Slice("dp", 0), Slice("tp", 0))),
        (lay(a=(8,)), lay(a=(8, "dp", "tp")), (Slice("dp", 0), Slice("tp", 0))),
        # (dp, tp) on one dim to dp on it and tp on another: the minor axis moves by all-to-all
        (lay(a=(8, "dp", "tp"), b=(8,)), lay(a=(8, "dp"), b=(8, "tp")), (AllToAll("tp", 0, 1),)),
        (
            lay(a=(8, "dp", "tp"), b=(8,)),
            lay(a=(8,), b=(8, "dp", "tp")),
            (Gather("tp", 0), AllToAll("dp", 0, 1), Slice("tp", 1)),
        ),
        # two axes swapping dims: the second move must wait for its dim to be gathered (regression)
        (
            lay(a=(8, "dp"), b=(8, "tp")),
            lay(a=(8, "tp"), b=(8, "dp")),
            (Gather("dp", 0), AllToAll("tp", 1, 0), Slice("dp", 1)),
        ),
        # unchanged: nothing to do
        (lay(a=(8, "dp"), b=(8, "tp")), lay(a=(8, "dp"), b=(8, "tp")), ()),
    ],
)
def test_plan_relayout_as_data(src, dst, plan):
    assert plan_relayout(src, dst) == plan
    assert run_plan(src, plan) == dst


def test_plan_rejects_different_dims():
    with pytest.raises(tm.LayoutError, match="the dims differ"):
        plan_relayout(lay(a=(8, "dp")), lay(b=(8, "dp")))


def run_plan(src: TensorLayout, plan) -> TensorLayout:
    """Apply the steps one by one, checking each is legal where it runs: a gather undoes the
    minor-most axis of its dim, an axis splits at most one dim at a time."""
    layout = src
    for step in plan:
        if isinstance(step, Gather):
            assert layout.axes[step.dim][-1:] == (step.axis,), (step, layout)
        elif isinstance(step, AllToAll):
            assert layout.axes[step.gather_dim][-1:] == (step.axis,), (step, layout)
            assert step.gather_dim != step.split_dim
        else:
            assert step.axis not in layout.used_axes, (step, layout)
        layout = apply_step(layout, step)
        axes = [a for ax in layout.axes for a in ax]
        assert len(axes) == len(set(axes)), layout
    return layout


# ---- property: random layouts on small meshes ---------------------------------------------------------

MESHES = [("dp:2;tp:2;pp:2", 8), ("dp:2;tp:3", 12), ("dp:1;tp:2", 4), ("x:4", 4)]


@st.composite
def layouts(draw, mesh: tm.MeshShape, names: tuple[str, ...], size: int):
    """A valid layout of dims `names` (each of `size`): every axis on one dim or none, in any order."""
    axes = draw(st.permutations(mesh.names))
    owner = [draw(st.integers(-1, len(names) - 1)) for _ in axes]
    per_dim = tuple(tuple(a for a, o in zip(axes, owner) if o == i) for i in range(len(names)))
    return check(TensorLayout(tuple(Dim(n, size) for n in names), per_dim), mesh, "test")


@st.composite
def relayout_cases(draw):
    spec, size = draw(st.sampled_from(MESHES))
    mesh = tm.MeshShape.parse(spec)
    names = ("a", "b", "c")[: draw(st.integers(1, 3))]
    return spec, draw(layouts(mesh, names, size)), draw(layouts(mesh, names, size))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(relayout_cases())
def test_plan_reaches_dst(case):
    _, src, dst = case
    plan = plan_relayout(src, dst)
    assert run_plan(src, plan) == dst
    assert (plan == ()) == (src == dst)
    # no axis is communicated over twice, and nothing is gathered that src and dst share as a prefix
    comm_axes = [s.axis for s in plan if not isinstance(s, Slice)]
    assert len(comm_axes) == len(set(comm_axes))
    for i, (a, b) in enumerate(zip(src.axes, dst.axes)):
        common = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
        undone = [
            s.axis
            for s in plan
            if (isinstance(s, Gather) and s.dim == i) or (isinstance(s, AllToAll) and s.gather_dim == i)
        ]
        assert sorted(undone) == sorted(a[common:])


_MESH_CACHE: dict[str, tm.Mesh] = {}


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(relayout_cases())
def test_plan_runs_on_sim(case):
    spec, src, dst = case
    mesh = _MESH_CACHE.setdefault(spec, tm.Mesh(spec))
    shape = tuple(d.size for d in src.dims)
    value = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    x = tm.distribute(value, " ".join(src.names), mesh, layout={n: ax for n, ax in zip(src.names, src.axes) if ax})
    assert x.tensor_layout == src
    plan = plan_relayout(src, dst)
    with tm.comm_stats() as stats:
        y = to_layout(x, dst)
    assert y.tensor_layout == dst
    for coords, shard in zip(mesh.impl.local_coords, y.shards):  # every device holds its block
        assert torch.equal(shard, value[local_slices(dst, mesh.shape, coords)])
    assert torch.equal(y.full(), value)
    # one collective per communicating step, none for slices or axes of size 1
    expected = {"all_gather": 0, "all_to_all": 0}
    for s in plan:
        if not isinstance(s, Slice) and mesh.shape.axis_size(s.axis) > 1:
            expected["all_gather" if isinstance(s, Gather) else "all_to_all"] += 1
    assert stats.counts == {k: v for k, v in expected.items() if v}


def test_relayout_swap_on_sim_values():
    # regression: a:dp;b:tp -> a:tp;b:dp used to run two all-to-alls and scramble the blocks
    mesh = tm.Mesh("dp:2;tp:2", rules="a:dp;b:tp")
    value = torch.arange(16.0).reshape(4, 4)
    x = tm.distribute(value, "a b", mesh)
    with tm.comm_stats() as stats:
        y = x.relayout("a:tp;b:dp")
    assert y.layout == {"a": "tp", "b": "dp"}
    assert torch.equal(y.shard(dp=1, tp=0), value[0:2, 2:4])
    assert torch.equal(y.full(), value)
    assert stats.counts == {"all_gather": 1, "all_to_all": 1}


def test_relayout_comm_bytes():
    mesh = tm.Mesh("dp:2;tp:2", rules="a:dp")
    x = tm.distribute(torch.zeros(8, 8), "a b", mesh)  # each device holds 4x8 floats = 128 bytes
    with tm.comm_stats() as stats:
        x.relayout("b:dp")
        x.relayout("")
        x.relayout("a:dp,tp")
    assert [(r.kind, r.axes, r.bytes) for r in stats.records] == [
        ("all_to_all", ("dp",), 64),  # (k-1)/k * S
        ("all_gather", ("dp",), 128),  # (k-1) * S
    ]


# ---- mesh math ----------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 4), max_size=4))
def test_coords_device_round_trip(sizes):
    mesh = tm.MeshShape(tuple((f"m{i}", s) for i, s in enumerate(sizes)))
    all_coords = [mesh.coords(d) for d in range(mesh.size)]
    assert all_coords == list(itertools.product(*(range(s) for s in sizes)))  # row-major
    assert [mesh.device(c) for c in all_coords] == list(range(mesh.size))


def test_coords_examples():
    mesh = tm.MeshShape.parse("dp:2;tp:3")
    assert mesh.size == 6 and mesh.names == ("dp", "tp") and mesh.sizes == (2, 3)
    assert mesh.coords(4) == (1, 1) and mesh.coords(2) == (0, 2)
    assert mesh.device((1, 0)) == 3
    assert tm.MeshShape.parse("").size == 1 and tm.MeshShape.parse("").coords(0) == ()
    with pytest.raises(tm.ParseError, match="mesh dp:2;tp:3 has no axis 'pp'"):
        mesh.axis_size("pp")


@pytest.mark.parametrize(
    "spec, axes, groups",
    [
        ("dp:2;tp:2", ("dp",), ((0, 2), (1, 3))),
        ("dp:2;tp:2", ("tp",), ((0, 1), (2, 3))),
        ("dp:2;tp:2", ("dp", "tp"), ((0, 1, 2, 3),)),
        ("dp:2;tp:2", ("tp", "dp"), ((0, 2, 1, 3),)),
        ("dp:2;tp:2", (), ((0,), (1,), (2,), (3,))),
        ("dp:2;tp:3", ("dp",), ((0, 3), (1, 4), (2, 5))),
        ("dp:2;tp:3", ("tp",), ((0, 1, 2), (3, 4, 5))),
        ("a:2;b:2;c:2", ("c", "a"), ((0, 4, 1, 5), (2, 6, 3, 7))),
    ],
)
def test_axis_groups(spec, axes, groups):
    assert axis_groups(tm.MeshShape.parse(spec), axes) == groups


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=3), st.data())
def test_axis_groups_properties(sizes, data):
    mesh = tm.MeshShape(tuple((f"m{i}", s) for i, s in enumerate(sizes)))
    axes = tuple(data.draw(st.permutations(mesh.names)))[: data.draw(st.integers(0, len(sizes)))]
    groups = axis_groups(mesh, axes)
    assert sorted(d for g in groups for d in g) == list(range(mesh.size))  # a partition
    others = [i for i, n in enumerate(mesh.names) if n not in axes]
    for g in groups:
        assert len(g) == parts(mesh, axes)
        assert len({tuple(mesh.coords(d)[i] for i in others) for d in g}) == 1  # equal off the axes
        for r, d in enumerate(g):  # in block order, first axis major
            assert r == block_index(mesh, axes, mesh.coords(d))
