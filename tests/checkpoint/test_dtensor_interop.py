"""tm.to_dtensor / tm.from_dtensor on 4 gloo processes: placements named exactly, round trips
exact (same shard, same global value), gradients through both, uneven shards shared where
torch.chunk's blocks are ours and converted where they are not, and Partial / strided
placements refused with LayoutError or materialised on request."""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed

import torchmesh as tm


def interop_body() -> str:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp", backend="dist")
    ref = tm.Mesh("dp:1;tp:1", rules="batch:dp;ff:tp", backend="sim")
    rank = dist.get_rank()

    # mesh -> DTensor -> mesh, for each kind of layout
    cases = [
        ("batch:8 ff:4 d:3", None, (Shard(0), Shard(1))),
        ("d:3 ff:4", None, (Replicate(), Shard(1))),
        ("d:3 e:2", None, (Replicate(), Replicate())),
        ("batch:8 d:3", "batch:dp,tp", (Shard(0), Shard(0))),  # one dim over both axes, mesh order
        ("d:3 ff:4", "ff:dp", (Shard(1), Replicate())),
    ]
    for seed, (dims, layout, placements) in enumerate(cases):
        x = tm.randn(dims, mesh, seed=seed, layout=layout)
        d = tm.to_dtensor(x)
        assert tuple(d.placements) == placements, (dims, layout, d.placements)
        assert d.to_local().data_ptr() == x.local.data_ptr()  # no copy
        torch.testing.assert_close(d.full_tensor(), tm.randn(dims, ref, seed=seed).full(), rtol=0, atol=0)
        back = tm.from_dtensor(d, x.dims, mesh)
        assert back.tensor_layout == x.tensor_layout and torch.equal(back.local, x.local)

    # DTensor made by torch -> mesh: the layout its placements name, values exact
    g = torch.arange(48.0).reshape(8, 6)
    d = distribute_tensor(g, mesh.impl.device_mesh, (Replicate(), Shard(0)))
    x = tm.from_dtensor(d, "batch d", mesh)
    assert x.layout == {"batch": "tp"} and torch.equal(x.full(), g)
    assert torch.equal(x.sum("batch").full(), g.sum(0))  # ops accept it as it is

    # a dim over the axes in the order DTensor cannot name
    x = tm.randn("batch:8 d:3", mesh, seed=0, layout="batch:tp,dp")
    with pytest.raises(tm.LayoutError, match=r"mesh order.*batch:dp,tp"):
        tm.to_dtensor(x)

    # Partial: refused, or reduced with materialize=True
    partial = DTensor.from_local(torch.ones(2, 3), mesh.impl.device_mesh, (Partial(), Replicate()))
    with pytest.raises(tm.LayoutError, match=r"Partial.*materialize=True"):
        tm.from_dtensor(partial, "a b", mesh)
    assert torch.equal(tm.from_dtensor(partial, "a b", mesh, materialize=True).full(), torch.full((2, 3), 2.0))

    # uneven shards. 5 over dp:2: torch.chunk's blocks (3, 2) are ours, shared with no copy
    odd = torch.arange(15.0).reshape(5, 3)
    uneven = distribute_tensor(odd, mesh.impl.device_mesh, (Shard(0), Replicate()))
    y = tm.from_dtensor(uneven, "a b", mesh)
    assert y.layout == {"a": "dp"} and torch.equal(y.full(), odd)
    assert y.local.data_ptr() == uneven.to_local().data_ptr()
    assert tm.to_dtensor(y).to_local().data_ptr() == y.local.data_ptr()
    # 5 over dp x tp (4 blocks): chunk cuts 2,2,1,0, we cut 2,1,1,1: converted both ways, exact
    five = torch.arange(10.0).reshape(5, 2)
    d5 = distribute_tensor(five, mesh.impl.device_mesh, (Shard(0), Shard(0)))
    z = tm.from_dtensor(d5, "a b", mesh)
    assert z.layout == {"a": ("dp", "tp")} and torch.equal(z.full(), five)
    assert z.local.shape[0] == (2, 1, 1, 1)[rank]
    back = tm.to_dtensor(z)
    assert tuple(back.placements) == (Shard(0), Shard(0)) and torch.equal(back.full_tensor(), five)
    assert torch.equal(back.to_local(), d5.to_local())
    w5 = tm.distribute(five, "a b", mesh, layout="a:dp,tp", requires_grad=True)
    (tm.to_dtensor(w5) * 2).sum().backward()
    assert torch.equal(w5.grad.full(), torch.full_like(five, 2.0))

    # names and meshes are checked
    with pytest.raises(tm.DimError, match="with 2 dims"):
        tm.from_dtensor(d, "batch", mesh)
    other = init_device_mesh("cpu", (4,), mesh_dim_names=("x",))
    with pytest.raises(tm.MeshError, match="DeviceMesh with axes"):
        tm.from_dtensor(distribute_tensor(g, other, (Shard(0),)), "batch d", mesh)

    # gradients flow both ways
    w = tm.randn("batch:8 ff:4", mesh, seed=3, requires_grad=True)
    (tm.to_dtensor(w) ** 2).sum().backward()
    torch.testing.assert_close(w.grad.full(), 2 * w.full().detach())
    leaf = distribute_tensor(g, mesh.impl.device_mesh, (Shard(0), Shard(1))).requires_grad_()
    (tm.from_dtensor(leaf, "batch ff", mesh) * 3).sum().backward()
    torch.testing.assert_close(leaf.grad.full_tensor(), torch.full_like(g, 3.0))
    return f"ok {rank}"


def test_dtensor_round_trips_on_gloo():
    assert run_distributed(interop_body, 4) == [f"ok {r}" for r in range(4)]


def test_dtensor_needs_the_dist_backend():
    x = tm.randn("batch:4", tm.Mesh("dp:2", rules="batch:dp"), seed=0)
    with pytest.raises(tm.BackendError, match="needs the dist backend.*x.full"):
        tm.to_dtensor(x)
