"""The xla backend itself: the mesh over the runtime's devices, global values, printing of
each device's block, compiled communication (against sim and dist: test_four_devices.py)."""

from __future__ import annotations

import os

import pytest
import torch

import torchmesh as tm
from torchmesh.xla.hlo_stats import compiled_comm_stats
from torchmesh.xla.shards import device_blocks, sharding_text

DEVICES = int(os.environ.get("CPU_NUM_DEVICES", "4"))
MESH = {4: "dp:2;tp:2", 8: "dp:2;tp:4"}[DEVICES]


def test_mesh_must_have_as_many_devices_as_the_runtime():
    with pytest.raises(
        tm.MeshError, match=rf"mesh dp:2 has 2 devices but the XLA runtime has {DEVICES}.*CPU_NUM_DEVICES=2"
    ):
        tm.Mesh("dp:2", backend="xla")
    with pytest.raises(ValueError):  # MeshError is a ValueError (docs/design.md, "Errors")
        tm.Mesh(f"dp:{DEVICES * 2}", backend="xla")


def test_global_value_local_tensor_and_sharding():
    mesh = tm.Mesh(MESH, rules="batch:dp;ff:tp", backend="xla")
    t = torch.arange(8 * 16.0).reshape(8, 16)
    x = tm.distribute(t, "batch ff", mesh)
    assert x.local.device.type == "xla" and tuple(x.local.shape) == (8, 16)  # the global XLA tensor
    full = x.full()
    assert full.device.type == "cpu" and torch.equal(full, t)
    assert sharding_text(x.local).startswith("{devices=[2,")  # split over both axes
    y = x.rename(ff="hidden")  # replicated over tp: each device holds every column
    assert [b.index[1] for b in device_blocks(y.local)] == [slice(0, 16)] * DEVICES
    assert torch.equal(y.full(), t)


def test_relayout_leaves_the_original_sharding_alone():
    """On xla a relayout moves no data in Python: it annotates a copy, never the input."""
    mesh = tm.Mesh(MESH, rules="batch:dp;ff:tp", backend="xla")
    x = tm.distribute(torch.randn(8, 16), "batch ff", mesh)
    before = sharding_text(x.local)
    y = x.relayout("batch:tp")
    assert sharding_text(x.local) == before != sharding_text(y.local)
    assert [b.index for b in device_blocks(x.local)] != [b.index for b in device_blocks(y.local)]


def test_repr_shows_each_devices_block():
    mesh = tm.Mesh(MESH, rules="batch:dp;ff:tp", backend="xla")
    x = tm.distribute(torch.arange(4 * 8.0).reshape(4, 8), "batch ff", mesh)
    text = repr(x)
    tp = mesh.axis_size("tp")
    assert text.startswith(f"MeshTensor(batch:4 ff:8 | batch:dp;ff:tp | mesh {MESH} xla | float32)")
    assert "[dp=0,tp=0] batch[0:2] ff[0:" in text and f"[dp=1,tp={tp - 1}] batch[2:4] ff[" in text
    assert "[16., 17." in text  # the values of device (dp=1, tp=0)'s block, read from that device
    assert torch.equal(x.shard(dp=1, tp=0), x.full()[2:4, : 8 // tp])  # a CPU copy of that device's block
    s = x.sum()  # replicated: one block, shown once
    assert repr(s).count("[dp=*,tp=*]") == 1
    assert "devices" in tm.show_layout(x)


def test_comm_stats_record_nothing_in_python_on_xla():
    """No collective runs eagerly here (the partitioner inserts them): compiled_comm_stats
    reads them from the compiled program instead."""
    mesh = tm.Mesh(MESH, rules="ff:tp", backend="xla")
    x = tm.randn("batch:8 ff:16", mesh, seed=0)
    with tm.comm_stats() as stats:
        y = x.sum("ff")
    assert stats.records == []
    compiled = compiled_comm_stats(y)
    assert compiled.counts == {"all_reduce": 1} and compiled.records[0].axes == ("tp",)
    assert compiled.records[0].phase == "compiled"
    with pytest.raises(tm.BackendError, match=r"on meshes \[\"Mesh\('dp:2'.*backend='sim'\)\"\].*tm.comm_stats"):
        compiled_comm_stats(tm.randn("batch:4", tm.Mesh("dp:2"), seed=0))
    with pytest.raises(tm.BackendError, match="argument 1 is NoneType"):
        compiled_comm_stats(y, x.grad)
