"""MeshTensor <-> torch DTensor on the dist backend, with no data movement.

The two describe the same thing in two vocabularies. A MeshTensor's layout says, for each
dim, which mesh axes split it; a DTensor's placements say, for each mesh axis, what it does
to the tensor. So a dim split over axis `tp` is `Shard(i)` on `tp` (i: the dim's position
in storage order), and an axis no dim uses is `Replicate()`. A dim split over several axes
(`"batch:dp,fsdp"`) is `Shard(i)` on each of them; DTensor cuts a dim over its axes in mesh
order, so this names the same blocks only when the rule lists the axes in the mesh's order
(`"batch:dp,fsdp"` on the mesh `"dp:2;fsdp:2"`); the other order raises `LayoutError`.

Uneven dims: DTensor cuts a dim into `torch.chunk` blocks (ceil(size / k), the last short or
empty), torchmesh into balanced ones (sizes differ by at most one, larger first). Where the
two agree (65 over 2, 7 over 4, every even size) the shards are shared as they are; where they
differ (5 over 4: 2,2,1,0 against 2,1,1,1) the conversion gathers that dim over its axes and
cuts it again the other way (one all-gather, local slices).

Going back, `Partial` placements (unreduced sums) have no MeshTensor layout: `from_dtensor`
refuses them with a `LayoutError`, or, with `materialize=True`, first reduces them with
DTensor itself (a collective) and carries on.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from torchmesh.errors import BackendError, DimError, LayoutError, MeshError
from torchmesh.placement.dims import Dim, dim_names
from torchmesh.placement.layout import TensorLayout, check
from torchmesh.placement.mesh_shape import MeshShape, block_bounds, parts
from torchmesh.tensor.mesh import Mesh
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.relayout import to_layout

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def placements_of(layout: TensorLayout, axis_names: tuple[str, ...]) -> tuple:
    """The DTensor placements (one per mesh axis) that hold the blocks of `layout`."""
    from torch.distributed.tensor import Replicate, Shard

    placements: list = [Replicate()] * len(axis_names)
    for i, (dim, axes) in enumerate(zip(layout.dims, layout.axes)):
        order = [axis_names.index(a) for a in axes]
        if order != sorted(order):
            raise LayoutError(
                f"dim {dim.name!r} of the tensor {layout} is split over the axes {axes} (major first), "
                f"but DTensor splits a dim over its mesh axes in mesh order {axis_names}, so it cannot "
                f"name these blocks. Fix: list the axes in mesh order in the rule "
                f"({dim.name}:{','.join(sorted(axes, key=axis_names.index))}), or x.relayout(...) first."
            )
        for j in order:
            placements[j] = Shard(i)
    return tuple(placements)


def to_dtensor(x: MeshTensor) -> DTensor:
    """The DTensor over the mesh's DeviceMesh that holds the same shards (no copy, no communication).

    Needs the dist backend (one process per device). Differentiable: gradients flow back to `x`.

    >>> # under torchrun, 4 processes:
    >>> # mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp", backend="dist")
    >>> # d = tm.to_dtensor(tm.randn("batch:8 ff:4", mesh, seed=0))
    >>> # d.placements == (Shard(dim=0), Shard(dim=1)); d.full_tensor() equals x.full()
    """
    from torch.distributed.tensor import DTensor

    mesh = x.mesh
    device_mesh = _device_mesh(mesh, "to_dtensor")
    layout = x.tensor_layout
    placements = placements_of(layout, mesh.axis_names)
    disagree = _chunk_disagrees(layout, mesh.shape)
    if disagree:  # blocks cut differently: gather those dims, let DTensor cut them (local slices)
        held = TensorLayout(layout.dims, tuple(() if i in disagree else a for i, a in enumerate(layout.axes)))
        whole = to_dtensor(to_layout(x, held))
        return whole.redistribute(device_mesh, placements)
    shape = torch.Size(d.size for d in layout.dims)
    return DTensor.from_local(
        x.local,
        device_mesh,
        placements,
        run_check=False,
        shape=shape,
        stride=_contiguous_stride(shape),
    )


def from_dtensor(d: DTensor, dims: str | Sequence[str | Dim], mesh: Mesh, materialize: bool = False) -> MeshTensor:
    """A MeshTensor over the DTensor's local shard, with the layout its placements name.

    `dims` names the DTensor's dims in order ("batch ff"); `mesh` is a dist `tm.Mesh` with the
    same axes as the DTensor's DeviceMesh. `Shard(i)` on axis `a` splits dim i over `a`,
    `Replicate()` uses no dim. The result may differ from the mesh's rules; ops relay it out
    as they need. Partial or uneven placements raise `LayoutError` unless `materialize=True`
    (then DTensor reduces or gathers them first: a collective).

    >>> # under torchrun, 4 processes, d a DTensor with placements (Shard(0), Replicate()):
    >>> # x = tm.from_dtensor(d, "batch d", mesh)   # x.layout == {"batch": "dp"}
    """
    from torch.distributed.tensor import Replicate, Shard

    device_mesh = _device_mesh(mesh, "from_dtensor")
    names = dim_names(dims)
    if len(names) != d.ndim:
        raise DimError(
            f"from_dtensor: {len(names)} dim names {names} for a DTensor with {d.ndim} dims "
            f"(shape {tuple(d.shape)}). Name every dim, outermost first."
        )
    _check_same_mesh(d, device_mesh, mesh)
    bad = _unnamed_placements(d)
    if bad:
        if not materialize:
            raise LayoutError(_unnamed_message(d, names, bad))
        placements = [Replicate() if j in bad else p for j, p in enumerate(d.placements)]
        d = d.redistribute(d.device_mesh, placements)
    axes: list[list[str]] = [[] for _ in names]
    for j, p in enumerate(d.placements):
        if isinstance(p, Shard):
            axes[p.dim].append(mesh.axis_names[j])  # mesh order: DTensor's order of the blocks
    shape = tuple(Dim(n, s) for n, s in zip(names, d.shape))
    layout = check(TensorLayout(shape, tuple(tuple(a) for a in axes)), mesh.shape, "from_dtensor")
    disagree = _chunk_disagrees(layout, mesh.shape)
    if disagree:  # DTensor's chunks are not our blocks: gather those dims, cut them our way
        kept = [Replicate() if isinstance(p, Shard) and p.dim in disagree else p for p in d.placements]
        held = TensorLayout(shape, tuple(() if i in disagree else a for i, a in enumerate(layout.axes)))
        whole = MeshTensor((d.redistribute(d.device_mesh, kept).to_local(),), held, mesh)
        return to_layout(whole, layout)
    return MeshTensor((d.to_local(),), layout, mesh)


# ---- helpers ---------------------------------------------------------------------------------


def _device_mesh(mesh: Mesh, what: str):
    device_mesh = mesh.impl.device_mesh
    if device_mesh is None:
        raise BackendError(
            f"{what} needs the dist backend (one process per device, torch's DeviceMesh); this mesh "
            f"is {mesh!r}. On sim, use x.full() for the global value, or tm.distribute(t, dims, mesh)."
        )
    return device_mesh


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def _check_same_mesh(d: DTensor, device_mesh, mesh: Mesh) -> None:
    theirs = (tuple(d.device_mesh.mesh_dim_names or ()), tuple(d.device_mesh.mesh.shape))
    ours = (mesh.axis_names, mesh.shape.sizes)
    if theirs != ours or not torch.equal(d.device_mesh.mesh, device_mesh.mesh):
        raise MeshError(
            f"from_dtensor: the DTensor lives on a DeviceMesh with axes {theirs[0]} and shape {theirs[1]} "
            f"(ranks {d.device_mesh.mesh.tolist()}), the torchmesh mesh is {mesh.shape} (ranks "
            f"{device_mesh.mesh.tolist()}). Fix: build the tm.Mesh with the DeviceMesh's axis names and "
            f"sizes, or redistribute the DTensor onto mesh.impl.device_mesh."
        )


def _unnamed_placements(d: DTensor) -> set[int]:
    """Mesh axes whose placement has no MeshTensor layout: Partial, _StridedShard and the like."""
    from torch.distributed.tensor import Replicate, Shard

    return {j for j, p in enumerate(d.placements) if type(p) is not Shard and not isinstance(p, Replicate)}


def chunk_bounds(size: int, mesh: MeshShape, axes: tuple[str, ...], coords: tuple[int, ...]) -> tuple[int, int]:
    """[start, stop) of DTensor's block (nested `torch.chunk`, axes in mesh order) of a dim."""
    start, stop = 0, size
    for a in axes:
        k, i = mesh.axis_size(a), coords[mesh.names.index(a)]
        n = stop - start
        c = -(-n // k)
        start, stop = start + min(i * c, n), start + min((i + 1) * c, n)
    return start, stop


@lru_cache(maxsize=1024)
def _chunk_disagrees(layout: TensorLayout, mesh: MeshShape) -> frozenset[int]:
    """Positions of the dims whose torchmesh blocks differ from DTensor's on some device."""
    out = set()
    for i, (d, axes) in enumerate(zip(layout.dims, layout.axes)):
        if axes and d.size % parts(mesh, axes):
            for device in range(mesh.size):
                c = mesh.coords(device)
                if block_bounds(d.size, mesh, axes, c) != chunk_bounds(d.size, mesh, axes, c):
                    out.add(i)
                    break
    return frozenset(out)


def _unnamed_message(d: DTensor, names: tuple[str, ...], bad: set[int]) -> str:
    axes = d.device_mesh.mesh_dim_names or tuple(str(j) for j in range(d.device_mesh.ndim))
    what = ", ".join(f"{d.placements[j]} on axis {axes[j]!r}" for j in sorted(bad))
    return (
        f"from_dtensor: the DTensor with dims {names} (shape {tuple(d.shape)}) has placements "
        f"{tuple(d.placements)}; {what} cannot be a MeshTensor layout (a Partial is an unreduced sum). "
        f"Fix: pass materialize=True to let DTensor reduce those axes first (a collective), or "
        f"d.redistribute(...) yourself."
    )
