"""docs/design.md, "Model": invalid layouts (and mismatched dims) are ValueErrors raised when the tensor
is made, before any communication, with messages naming the dims, the rules and a fix.

Each failing call runs inside `tm.comm_stats()` on inputs whose layouts would need a
collective had the op got that far, so "no collective ran" is a real check.
"""

from __future__ import annotations

import pytest
import torch

import torchmesh as tm

RULES = "batch:dp;ff:tp;heads:tp"


@pytest.fixture
def mesh():
    return tm.Mesh("dp:2;tp:2", rules=RULES)


def raises_before_comm(error, match, fn):
    """fn() raises `error` (a ValueError and a TorchMeshError) matching `match`, having run no collective."""
    assert issubclass(error, ValueError) and issubclass(error, tm.TorchMeshError)
    with tm.comm_stats() as stats:
        with pytest.raises(error, match=match) as info:
            fn()
    assert stats.records == [], f"collectives ran before the error: {stats.records}"
    return str(info.value)


# ---- two dims of one tensor on the same axis -------------------------------------------------------

AXIS_TWICE = (
    r"tensor with dims \(ff:4, heads:4\) cannot be laid out: dims 'ff' and 'heads' are both split over "
    r"mesh axis 'tp' by the rules 'batch:dp;ff:tp;heads:tp'\. A mesh axis can split at most one dim of a "
    r"tensor\. Fix: rename one of the dims \(x\.rename\(heads='heads_2'\)\), or change the rules"
)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: tm.distribute(torch.zeros(4, 4), "ff heads", m),
        lambda m: tm.zeros("ff:4 heads:4", m),
        lambda m: tm.ones({"ff": 4, "heads": 4}, m),
        lambda m: tm.full("ff:4 heads:4", 1.0, m),
        lambda m: tm.randn("ff:4 heads:4", m, seed=0),
        lambda m: tm.rand("ff:4 heads:4", m, seed=0),
        lambda m: tm.from_local([torch.zeros(2, 2)] * 4, "ff heads", m),
    ],
    ids=["distribute", "zeros", "ones", "full", "randn", "rand", "from_local"],
)
def test_axis_used_twice_when_made(mesh, make):
    raises_before_comm(tm.LayoutError, AXIS_TWICE, lambda: make(mesh))


def test_axis_used_twice_by_an_op_output(mesh):
    # Inputs are valid (ff and heads each split over tp); the output would split both over tp.
    a = tm.distribute(torch.ones(2, 4), "batch ff", mesh)
    b = tm.distribute(torch.ones(2, 4), "batch heads", mesh)
    raises_before_comm(tm.LayoutError, AXIS_TWICE, lambda: tm.einsum("batch ff, batch heads -> ff heads", a, b))


def test_axis_used_twice_by_relayout_and_multi_axis_rules(mesh):
    x = tm.distribute(torch.zeros(4, 4), "batch d", mesh)
    text = raises_before_comm(
        tm.LayoutError,
        "dims 'batch' and 'd' are both split over mesh axis 'tp'",
        lambda: x.relayout("batch:tp;d:dp,tp"),
    )
    assert "tensor with dims (batch:4, d:4)" in text and "'batch:tp;d:dp,tp'" in text
    m2 = tm.Mesh("dp:2;tp:2", rules="batch:dp,tp;ff:tp")
    raises_before_comm(
        tm.LayoutError,
        r"dims 'batch' and 'ff' are both split over mesh axis 'tp' by the rules "
        r"'batch:dp,tp;ff:tp'",
        lambda: tm.zeros("batch:4 ff:4", m2),
    )


# ---- a dim not divisible by its axes: no longer an error (uneven blocks) -------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda m: tm.distribute(torch.arange(12.0).reshape(3, 4), "batch d", m),
        lambda m: tm.distribute(torch.arange(12.0).reshape(3, 4), "batch d", m, layout="batch:dp"),
    ],
    ids=["distribute", "distribute-layout"],
)
def test_uneven_split_is_made_in_balanced_blocks(mesh, make):
    """A dim of 3 over dp:2: blocks of 2 and 1 rows (the larger first), no error, no collective."""
    with tm.comm_stats() as stats:
        x = make(mesh)
    assert stats.records == [] and x.layout["batch"] == "dp"
    assert [tuple(x.shard(dp=i).shape) for i in range(2)] == [(2, 4), (1, 4)]
    assert torch.equal(x.full(), torch.arange(12.0).reshape(3, 4))


def test_uneven_over_several_axes_and_smaller_than_the_blocks():
    """6 over dp x tp (4 blocks): nested balanced blocks 2,1,2,1; 3 over 4 blocks: one is empty."""
    m = tm.Mesh("dp:2;tp:2", rules="batch:dp,tp")
    x = tm.arange("batch:6", m)
    assert [x.shard(m.shape.coords(d)).tolist() for d in range(4)] == [[0, 1], [2], [3, 4], [5]]
    y = tm.arange("batch:3", m)
    assert [y.shard(m.shape.coords(d)).tolist() for d in range(4)] == [[0], [1], [2], []]
    assert y.sum().item() == 3 and torch.equal(y.full(), torch.arange(3))


def test_uneven_by_rename(mesh):
    # e is replicated; renamed to batch it is sliced over dp into blocks of 2 and 1 rows.
    x = tm.distribute(torch.arange(12.0).reshape(3, 4), "e ff", mesh)
    y = x.rename(e="batch")
    assert y.layout["batch"] == "dp" and torch.equal(y.full(), x.full())


# ---- a rule naming an axis the mesh lacks --------------------------------------------------------


def test_unknown_axis_at_mesh_creation():
    raises_before_comm(
        tm.LayoutError,
        r"layout rules 'batch:dp;ff:tp' split dim 'ff' over mesh axis 'tp', but the mesh has only the axes "
        r"\(dp\)\. Fix: name one of the mesh's axes, or add 'tp' to the mesh\.",
        lambda: tm.Mesh("dp:2", rules="batch:dp;ff:tp"),
    )
    raises_before_comm(
        tm.LayoutError,
        r"split dim 'batch' over mesh axis 'fsdp', but the mesh has only the "
        r"axes \(dp, tp\)",
        lambda: tm.Mesh("dp:2;tp:2", rules="batch:dp,fsdp"),
    )


def test_unknown_axis_in_tensor_rules_and_scopes(mesh):
    x = tm.distribute(torch.zeros(4, 4), "batch d", mesh)
    raises_before_comm(
        tm.LayoutError,
        r"layout rules 'batch:zz' split dim 'batch' over mesh axis 'zz', but the "
        r"mesh has only the axes \(dp, tp\)",
        lambda: x.relayout("batch:zz"),
    )
    raises_before_comm(
        tm.LayoutError,
        r"split dim 'd' over mesh axis 'zz'",
        lambda: tm.distribute(torch.zeros(4, 4), "batch d", mesh, layout="batch:dp;d:zz"),
    )
    with pytest.raises(tm.LayoutError, match=r"split dim 'd' over mesh axis 'zz'"):
        with mesh.rules_scope("d:zz"):
            pass
    assert str(mesh.rules) == RULES  # the failed scope left the rules alone


# ---- einsum operands --------------------------------------------------------------------------------


def test_einsum_operand_dims_mismatch(mesh):
    # x is held split over tp along d, so running the einsum would first all-gather it.
    x = tm.distribute(torch.ones(4, 4), "batch d", mesh, layout="d:tp")
    w = tm.distribute(torch.ones(4, 8), "d ff", mesh)
    raises_before_comm(
        tm.DimError,
        r"einsum 'batch e, d ff -> batch ff': operand 0 is written \(batch e\) but the tensor has dims "
        r"\('batch', 'd'\)\. Name the tensor's dims",
        lambda: tm.einsum("batch e, d ff -> batch ff", x, w),
    )
    raises_before_comm(
        tm.DimError,
        r"einsum 'batch d, d ff -> batch ff' names 2 operands but got 1 tensors",
        lambda: tm.einsum("batch d, d ff -> batch ff", x),
    )
    # an output dim no input has is broadcast (Mesh TF's einsum), given its size; without one:
    raises_before_comm(
        tm.DimError,
        r"einsum 'batch d, d ff -> batch z': output dims \['z'\] are in no input, "
        r"so their sizes are unknown\. Give them: sizes=\{'z': <size>\}",
        lambda: tm.einsum("batch d, d ff -> batch z", x, w),
    )
    with pytest.raises(tm.ArgumentTypeError, match=r"operand 1 is a Tensor, not a MeshTensor; wrap it with "):
        tm.einsum("batch d, d ff -> batch ff", x, torch.ones(4, 8))  # a type error, not a layout one
    raises_before_comm(
        tm.DimError,
        r"dim 'd' has different sizes \[4, 5\] in different inputs",
        lambda: tm.einsum("batch d, d ff -> batch ff", x, tm.distribute(torch.ones(5, 8), "d ff", mesh)),
    )


# ---- elementwise sizes ------------------------------------------------------------------------------


def test_elementwise_size_mismatch(mesh):
    x = tm.distribute(torch.ones(4, 4), "batch d", mesh, layout="d:tp")  # would be gathered first
    y = tm.distribute(torch.ones(4, 5), "batch d", mesh)
    cond = tm.distribute(torch.ones(4, 4, dtype=torch.bool), "batch d", mesh, layout="d:tp")
    for op in (lambda: x + y, lambda: torch.add(x, y), lambda: tm.where(cond, x, y)):
        text = raises_before_comm(
            tm.DimError,
            r"dim 'd' has different sizes \[4, 5\] in different inputs\. Dims with the same name must have the "
            r"same size; rename one of them \(x\.rename\(d='\.\.\.'\)\)",
            op,
        )
        assert text.split(":")[0] in ("add", "where")


def test_plain_tensor_next_to_mesh_tensor(mesh):
    x = tm.distribute(torch.ones(4, 4), "batch d", mesh)
    raises_before_comm(
        tm.DimError,
        r"got a plain torch\.Tensor of shape \(4, 4\) next to MeshTensors.*Fix: "
        r"tm\.distribute\(tensor, '<dim names>', mesh\) first",
        lambda: x + torch.ones(4, 4),
    )
    assert torch.equal((x + torch.tensor(2.0)).full(), torch.full((4, 4), 3.0))  # 0-d tensors are fine


# ---- rename ---------------------------------------------------------------------------------------------


def test_rename_to_an_existing_name(mesh):
    x = tm.distribute(torch.ones(4, 4), "batch ff", mesh)  # renaming ff away would all-gather it
    raises_before_comm(
        tm.DimError,
        r"rename\(ff='batch'\) of the tensor with dims \(batch:4, ff:4\) gives the dims \(batch, batch\), where "
        r"'batch' appears twice; the dims of one tensor have unique names\. Fix: rename to a name the tensor does "
        r"not have, or rename its dim 'batch' too \(x\.rename\(ff='batch', batch='batch_2'\)\)\.",
        lambda: x.rename(ff="batch"),
    )
    raises_before_comm(
        tm.DimError,
        r"rename\(batch='q', ff='q'\) .* Fix: give the dims renamed to 'q' "
        r"different names\.",
        lambda: x.rename(batch="q", ff="q"),
    )
    raises_before_comm(
        tm.DimError,
        r"rename: dims \(zz\) are not dims of the tensor \(batch, ff\)\. Fix: name one "
        r"of \(batch, ff\)\.",
        lambda: x.rename(zz="a"),
    )
    raises_before_comm(tm.ParseError, r"dim name '2x' is not valid", lambda: x.rename(ff="2x"))
    # the fix the message suggests works
    y = x.rename(ff="batch", batch="batch_2")
    assert y.dims == ("batch_2", "batch") and torch.equal(y.full(), x.full())


def test_errors_are_catchable_as_value_error(mesh):
    for fn in (
        lambda: tm.zeros("ff:4 heads:4", mesh),
        lambda: tm.Dim("batch", -1),
        lambda: tm.Mesh("dp:2", rules="a:tp"),
        lambda: tm.MeshShape.parse("dp:x"),
    ):
        with pytest.raises(ValueError):
            fn()
