"""Making MeshTensors: from a global tensor, from per-device shards, and named constructors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from torchmesh.errors import DimError
from torchmesh.placement.layout import TensorLayout, check, local_shape, local_slices
from torchmesh.placement.plan import plan_relayout
from torchmesh.placement.rules import LayoutRules, RulesLike
from torchmesh.tensor.dims import Dim, DimsLike, parse_dims, parse_names
from torchmesh.tensor.mesh_tensor import MeshTensor

if TYPE_CHECKING:
    from torchmesh.mesh import Mesh


def layout_for(dims: tuple[Dim, ...], mesh: "Mesh", layout: RulesLike = None) -> TensorLayout:
    """The rules' layout for these dims, or the one given by `layout` rules for this tensor."""
    if layout is None:
        return mesh.layout_of(dims)
    rules = LayoutRules.parse(layout)
    return check(TensorLayout(dims, tuple(rules.axes_of(d.name) for d in dims)), mesh.shape, str(rules))


def _names(dims: "str | Sequence[str | Dim]") -> tuple[str, ...]:
    if isinstance(dims, str):
        return parse_names(dims)
    return tuple(getattr(d, "name", d) for d in dims)


def distribute(
    tensor: torch.Tensor,
    dims: "str | Sequence[str | Dim]",
    mesh: "Mesh",
    requires_grad: bool = False,
    layout: RulesLike = None,
) -> MeshTensor:
    """Lay out a global tensor on the mesh: dims named in order, split by the mesh's rules
    (or by `layout` rules for this tensor). Each device keeps a copy of its block.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2", layout="batch:dp")
    >>> x = tm.distribute(torch.arange(4.0), "batch", mesh)
    >>> x.shard(dp=1)
    tensor([2., 3.])
    """
    if not isinstance(tensor, torch.Tensor):
        tensor = torch.as_tensor(tensor)
    names = _names(dims)
    if len(names) != tensor.dim():
        raise DimError(
            f"distribute: {len(names)} dim names {names} for a tensor with {tensor.dim()} dims "
            f"(shape {tuple(tensor.shape)}). Name every dim, outermost first."
        )
    shape = tuple(Dim(n, s) for n, s in zip(names, tensor.shape))
    lay = layout_for(shape, mesh, layout)
    data = mesh.impl.from_global(tensor, lay)
    if requires_grad:
        data = tuple(t.requires_grad_(True) for t in data)
    return MeshTensor(data, lay, mesh)


def from_local(
    shards: "torch.Tensor | Sequence[torch.Tensor]",
    dims: "str | Sequence[str | Dim]",
    mesh: "Mesh",
    layout: RulesLike = None,
    requires_grad: bool = False,
) -> MeshTensor:
    """Build a MeshTensor from local shards: this rank's tensor on dist, or a list with one
    tensor per device (in device order) on sim. Global sizes are local sizes times the
    number of blocks; no data moves, so the shards must already be consistent.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", layout="ff:tp")
    >>> x = tm.from_local([torch.zeros(3, 2), torch.ones(3, 2)], "batch ff", mesh)
    >>> x.sizes, x.full()[0]
    ({'batch': 3, 'ff': 4}, tensor([0., 0., 1., 1.]))
    """
    data = (shards,) if isinstance(shards, torch.Tensor) else tuple(shards)
    expected = len(mesh.impl.local_coords)
    if len(data) != expected:
        raise DimError(f"from_local: got {len(data)} shards, but this process holds {expected} devices.")
    names = _names(dims)
    if any(t.dim() != len(names) for t in data) or len({tuple(t.shape) for t in data}) != 1:
        raise DimError(f"from_local: every shard must have the {len(names)} dims {names} and one shape; "
                       f"got shapes {[tuple(t.shape) for t in data]}.")
    rules = mesh.rules if layout is None else LayoutRules.parse(layout)
    slicer = mesh.impl.slice_mesh

    def blocks(name: str) -> int:  # unknown axes are reported by layout_for below
        return math.prod(slicer.axis_size(a) for a in rules.axes_of(name) if a in slicer.names)

    shape = tuple(Dim(n, s * blocks(n)) for n, s in zip(names, data[0].shape))
    lay = layout_for(shape, mesh, layout)
    if requires_grad:
        data = tuple(t.requires_grad_(True) for t in data)
    return MeshTensor(data, lay, mesh)


def to_global(x: MeshTensor) -> torch.Tensor:
    """The global value: gather every split axis (a collective on dist), then one local tensor."""
    replicated = TensorLayout(x._layout.dims, tuple(() for _ in x._layout.dims))
    from torchmesh.tensor.contraction import run_steps

    data = run_steps(x._mesh.impl, x._data, x._layout, plan_relayout(x._layout, replicated))
    return x._mesh.impl.global_value(data)


def _filled(dims: DimsLike, mesh: "Mesh", fill, dtype, device, requires_grad, layout) -> MeshTensor:
    shape = parse_dims(dims)
    lay = layout_for(shape, mesh, layout)
    slicer = mesh.impl.slice_mesh
    device = device if device is not None else mesh.impl.default_device
    data = mesh.impl.make(lambda c: fill(local_shape(lay, slicer, c), dtype=dtype, device=device))
    if requires_grad:
        data = tuple(t.requires_grad_(True) for t in data)
    return MeshTensor(data, lay, mesh)


def zeros(dims: DimsLike, mesh: "Mesh", dtype: torch.dtype | None = None, device: Any = None,
          requires_grad: bool = False, layout: RulesLike = None) -> MeshTensor:
    """A tensor of zeros with dims like "batch:8 d:16" (or [Dim(...)], or {"batch": 8}).

    >>> import torchmesh as tm
    >>> x = tm.zeros("batch:8 d:16", tm.Mesh("dp:2", layout="batch:dp"))
    >>> x.sizes, x.layout, tuple(x.shard(dp=0).shape)
    ({'batch': 8, 'd': 16}, {'batch': 'dp'}, (4, 16))
    """
    return _filled(dims, mesh, torch.zeros, dtype, device, requires_grad, layout)


def ones(dims: DimsLike, mesh: "Mesh", dtype: torch.dtype | None = None, device: Any = None,
         requires_grad: bool = False, layout: RulesLike = None) -> MeshTensor:
    """A tensor of ones with dims like "batch:8 d:16".

    >>> import torch, torchmesh as tm
    >>> x = tm.ones({"batch": 4, "d": 2}, tm.Mesh("dp:2", layout="batch:dp"), dtype=torch.bfloat16)
    >>> x.dtype, x.sum().item()
    (torch.bfloat16, 8.0)
    """
    return _filled(dims, mesh, torch.ones, dtype, device, requires_grad, layout)


def full(dims: DimsLike, value: float, mesh: "Mesh", dtype: torch.dtype | None = None, device: Any = None,
         requires_grad: bool = False, layout: RulesLike = None) -> MeshTensor:
    """A tensor filled with `value`.

    >>> import torchmesh as tm
    >>> tm.full("d:3", 0.5, tm.Mesh("dp:2")).full()
    tensor([0.5000, 0.5000, 0.5000])
    """
    return _filled(dims, mesh, lambda s, **kw: torch.full(s, value, **kw), dtype, device, requires_grad, layout)


def arange(dim: "Dim | str", mesh: "Mesh", dtype: torch.dtype | None = None, device: Any = None,
           layout: RulesLike = None) -> MeshTensor:
    """The 1-d tensor 0, 1, ..., n-1 along `dim` ("pos:128" or Dim("pos", 128)); each device
    makes its own block.

    >>> import torchmesh as tm
    >>> pos = tm.arange("pos:6", tm.Mesh("sp:2", layout="pos:sp"))
    >>> pos.shard(sp=1)
    tensor([3, 4, 5])
    """
    (d,) = parse_dims([dim]) if isinstance(dim, Dim) else parse_dims(dim)
    lay = layout_for((d,), mesh, layout)
    slicer = mesh.impl.slice_mesh
    device = device if device is not None else mesh.impl.default_device

    def block(coords):
        s = local_slices(lay, slicer, coords)[0]
        return torch.arange(s.start, s.stop, dtype=dtype or torch.int64, device=device)

    return MeshTensor(mesh.impl.make(block), lay, mesh)
