"""The xla backend itself: the mesh over the runtime's devices, global values, printing of
each device's block, and the communication of compiled programs against sim and dist."""

from __future__ import annotations

import os

import comm_programs as programs
import pytest
import torch
from harness import run_distributed

import torchmesh as tm
from torchmesh.xla.hlo_stats import compiled_comm_stats
from torchmesh.xla.shards import device_blocks, sharding_text

DEVICES = int(os.environ.get("CPU_NUM_DEVICES", "4"))
MESH = {4: "dp:2;tp:2", 8: "dp:2;tp:4"}[DEVICES]


def test_mesh_must_have_as_many_devices_as_the_runtime():
    with pytest.raises(tm.MeshError, match=rf"mesh dp:2 has 2 devices but the XLA runtime has {DEVICES}.*CPU_NUM_DEVICES=2"):
        tm.Mesh("dp:2", backend="xla")
    with pytest.raises(ValueError):  # MeshError is a ValueError, as the SPEC says
        tm.Mesh(f"dp:{DEVICES * 2}", backend="xla")


def test_global_value_local_tensor_and_sharding():
    mesh = tm.Mesh(MESH, layout="batch:dp;ff:tp", backend="xla")
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
    mesh = tm.Mesh(MESH, layout="batch:dp;ff:tp", backend="xla")
    x = tm.distribute(torch.randn(8, 16), "batch ff", mesh)
    before = sharding_text(x.local)
    y = x.relayout("batch:tp")
    assert sharding_text(x.local) == before != sharding_text(y.local)
    assert [b.index for b in device_blocks(x.local)] != [b.index for b in device_blocks(y.local)]


def test_repr_shows_each_devices_block():
    mesh = tm.Mesh(MESH, layout="batch:dp;ff:tp", backend="xla")
    x = tm.distribute(torch.arange(4 * 8.0).reshape(4, 8), "batch ff", mesh)
    text = repr(x)
    tp = mesh.axis_size("tp")
    assert text.startswith(f"MeshTensor(batch:4 ff:8 | batch:dp;ff:tp | mesh {MESH} xla | float32)")
    assert "[dp=0,tp=0] batch[0:2] ff[0:" in text and f"[dp=1,tp={tp - 1}] batch[2:4] ff[" in text
    assert "[16., 17." in text  # the values of device (dp=1, tp=0)'s block, read from that device
    s = x.sum()  # replicated: one block, shown once
    assert repr(s).count("[dp=*,tp=*]") == 1
    assert "devices" in tm.show_layout(x)


def test_comm_stats_record_nothing_in_python_on_xla():
    """No collective runs eagerly here (the partitioner inserts them): compiled_comm_stats
    reads them from the compiled program instead."""
    mesh = tm.Mesh(MESH, layout="ff:tp", backend="xla")
    x = tm.randn("batch:8 ff:16", mesh, seed=0)
    with tm.comm_stats() as stats:
        y = x.sum("ff")
    assert stats.records == []
    compiled = compiled_comm_stats(y)
    assert compiled.counts == {"all_reduce": 1} and compiled.records[0].axes == ("tp",)
    assert compiled.records[0].phase == "compiled"
    with pytest.raises(tm.BackendError, match="comm_stats"):
        compiled_comm_stats(tm.randn("batch:4", tm.Mesh("dp:2"), seed=0))


@pytest.mark.skipif(DEVICES != 4, reason="the programs are written for dp:2;tp:2")
def test_compiled_collectives_against_sim_and_dist():
    """The same programs on xla (collectives read from the partitioned HLO), sim and 4 gloo
    processes (collectives recorded as they run), as (kind, axes, bytes per device).

    - FORWARD programs: every input and output sharding is pinned by the annotations and the
      SPEC table leaves one natural collective for each (an all-reduce of partial sums, an
      all-gather of a split dim): identical records on all three backends.
    - STEPS (forward and backward compiled as one program): the bytes over each axis of each
      kind must be equal: gradients are annotated like their inputs, so the partitioner faces
      the choices torchmesh made; it may still merge collectives (XLA's all-reduce combiner,
      on TPU) or split them, which changes counts but not those byte totals. (On CPU with
      torch-xla 2.9 the records are identical too.)
    - REPLANNED (a relayout between axes): torchmesh gathers, then an all-to-all; the
      partitioner uses collective-permutes and a smaller all-gather. Only the values must
      match (the op suite checks them); here the partitioner's plan must not send more.
    """
    xla_mesh = tm.Mesh(programs.MESH, layout=programs.RULES, backend="xla")
    xla = {name: programs.records(compiled_comm_stats(*program(xla_mesh))) for name, program in programs.PROGRAMS.items()}
    sim = programs.measured("sim")
    dist = run_distributed(programs.measured, 4, args=("dist",))
    assert all(rank == dist[0] for rank in dist)
    assert sim == dist[0]

    def by_kind_and_axes(records):
        out: dict = {}
        for kind, axes, nbytes in records:
            out[(kind, axes)] = out.get((kind, axes), 0) + nbytes
        return out

    for name in programs.FORWARD:
        assert xla[name] == dist[0][name], name
    for name in programs.STEPS:
        assert by_kind_and_axes(xla[name]) == by_kind_and_axes(dist[0][name]), name
    for name in programs.REPLANNED:
        assert xla[name] != dist[0][name]  # a different plan ...
        assert sum(r[2] for r in xla[name]) <= sum(r[2] for r in dist[0][name])  # ... never dearer
