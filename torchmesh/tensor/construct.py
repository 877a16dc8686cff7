"""Making MeshTensors: from a global tensor, from per-device shards, and named constructors."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from torchmesh import arguments
from torchmesh.comm import autograd as comm
from torchmesh.comm import traced
from torchmesh.comm.backend import compiling
from torchmesh.errors import ArgumentError, ArgumentTypeError, DimError
from torchmesh.placement.dims import Dim, DimsLike, check_name, check_unique, dim_names, parse_dims
from torchmesh.placement.layout import TensorLayout, local_shape, local_slices, parts, resolve
from torchmesh.placement.rules import LayoutRules, RulesLike
from torchmesh.tensor import replicas
from torchmesh.tensor.mesh_tensor import MeshTensor

if TYPE_CHECKING:
    from torchmesh.tensor.mesh import Mesh


def layout_for(dims: tuple[Dim, ...], mesh: Mesh, layout: RulesLike = None) -> TensorLayout:
    """The rules' layout for these dims, or the one given by `layout` rules for this tensor."""
    if layout is None:
        return mesh.layout_of(dims)
    return resolve(dims, LayoutRules.parse(layout), mesh.shape)


def distribute(
    tensor: torch.Tensor,
    dims: str | Sequence[str | Dim],
    mesh: Mesh,
    requires_grad: bool = False,
    layout: RulesLike = None,
) -> MeshTensor:
    """Lay out a global tensor on the mesh: dims named in order, split by the mesh's rules
    (or by `layout` rules for this tensor). Each device keeps a copy of its block.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2", rules="batch:dp")
    >>> x = tm.distribute(torch.arange(4.0), "batch", mesh)
    >>> x.shard(dp=1)
    tensor([2., 3.])
    """
    if not isinstance(tensor, torch.Tensor):
        try:
            tensor = torch.as_tensor(tensor)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ArgumentTypeError(
                f"distribute(tensor, {dims!r}, mesh): the tensor is a {type(tensor).__name__} "
                f"torch cannot read ({e}). Fix: pass a torch.Tensor."
            ) from None
    names = traced.constant("dim_names", dims) if compiling() and isinstance(dims, str) else dim_names(dims)
    if len(names) != tensor.dim():
        raise DimError(
            f"distribute(tensor, {dims!r}): {len(names)} dim names {names} for a tensor with {tensor.dim()} dims "
            f"(shape {tuple(tensor.shape)}). Name every dim, outermost first."
        )
    shape = tuple(Dim(n, s) for n, s in zip(names, tensor.shape))
    lay = layout_for(shape, mesh, layout)
    data = mesh.impl.from_global(tensor, lay)
    if requires_grad:
        data = tuple(t.requires_grad_(True) for t in data)
    return MeshTensor(data, lay, mesh)


def from_local(
    shards: torch.Tensor | Sequence[torch.Tensor],
    dims: str | Sequence[str | Dim],
    mesh: Mesh,
    layout: RulesLike = None,
    requires_grad: bool = False,
) -> MeshTensor:
    """Build a MeshTensor from local shards: this rank's tensor on dist, or a list with one
    tensor per device (in device order) on sim; each is its device's block, no data moves.

    `dims` names the dims ("batch ff"): a split dim's global size is then the sum of its
    blocks over its axes (a small all-reduce of sizes, recorded like any collective); give
    sizes ("batch:3 ff:5") to skip it. Blocks of an uneven split differ by at most one, the
    larger first. Shards that require grad are refused: the gradient would stop at each
    device's shard, so a replicated tensor they came from would get a partial gradient on each
    device and its copies would drift apart; `tm.local_map` runs a per-device function with
    exact gradients. Under TORCHMESH_CHECK=1 a result's replicated copies are compared
    (`tm.check_replicas`).

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="ff:tp")
    >>> x = tm.from_local([torch.zeros(3, 2), torch.ones(3, 1)], "batch ff", mesh)
    >>> x.sizes, x.full()[0]
    ({'batch': 3, 'ff': 3}, tensor([0., 0., 1.]))
    """
    data = (shards,) if isinstance(shards, torch.Tensor) else tuple(shards)
    impl = mesh.impl
    expected = len(impl.local_coords)
    if len(data) != expected:
        raise ArgumentError(f"from_local: got {len(data)} shards, but this process holds {expected} devices.")
    named = _named_sizes(dims)
    names = tuple(n for n, _ in named)
    if any(t.dim() != len(names) for t in data):
        raise DimError(
            f"from_local: every shard must have the {len(names)} dims {names}; "
            f"got shapes {[tuple(t.shape) for t in data]}."
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in data):
        raise DimError(_from_local_grad(names))
    rules = mesh.rules if layout is None else LayoutRules.parse(layout)
    slicer = impl.slice_mesh

    def blocks(name: str) -> int:  # unknown axes are reported by layout_for below
        return parts(slicer, rules.restricted_to(slicer).axes_of(name))

    # Invalid rules raise here, before any communication (sizes as if the blocks were even).
    layout_for(tuple(Dim(n, s * blocks(n)) for n, s in zip(names, data[0].shape)), mesh, layout)
    sizes = _global_sizes(impl, data, named, rules)
    lay = layout_for(tuple(Dim(n, s) for n, s in zip(names, sizes)), mesh, layout)
    for coords, t in zip(impl.local_coords, data):
        want = local_shape(lay, slicer, coords)
        if tuple(t.shape) != want:
            at = ",".join(f"{n}={c}" for n, c in zip(slicer.names, coords))
            raise DimError(
                f"from_local: the tensor {lay} has a block of shape {want} on the device [{at}], but its "
                f"shard has shape {tuple(t.shape)}. Blocks of an uneven split differ by at most one, the "
                f"larger first; fix the shard, or the sizes in dims."
            )
    if requires_grad:
        data = tuple(t.requires_grad_(True) for t in data)
    x = MeshTensor(data, lay, mesh)
    if replicas.checks_on(impl):
        replicas.check_replicas({f"from_local({' '.join(names)})": x})
    return x


def _named_sizes(dims: str | Sequence[str | Dim] | Mapping[str, int]) -> tuple[tuple[str, int | None], ...]:
    """(name, global size or None) for "batch ff", "batch:3 ff", [Dim, "name"] or {name: size}."""
    if isinstance(dims, Mapping):
        return tuple((d.name, d.size) for d in parse_dims(dims))
    out: list[tuple[str, int | None]] = []
    for tok in dims.replace(",", " ").split() if isinstance(dims, str) else dims:
        if isinstance(tok, Dim) or (isinstance(tok, str) and ":" in tok):
            (d,) = parse_dims([tok])
            out.append((d.name, d.size))
        else:
            out.append((check_name(tok), None))
    check_unique([n for n, _ in out], f"from_local: dims {dims!r}")
    return tuple(out)


def _global_sizes(impl, data, named, rules: LayoutRules) -> list[int]:
    """Each dim's global size: given, or whole (unsplit), or the sum of its blocks over its
    axes (an all-reduce of one integer per split dim; on the abstract backend, which holds
    shapes only, blocks are taken to be even)."""
    slicer, sizes = impl.slice_mesh, []
    for i, (name, given) in enumerate(named):
        local = [t.shape[i] for t in data]
        live = slicer.live_axes(rules.axes_of(name))  # layout_for checked these axes
        if given is not None:
            sizes.append(given)
        elif not live:
            if len(set(local)) != 1:
                raise DimError(
                    f"from_local: dim {name!r} is not split, so every shard holds all of it, but "
                    f"the shards have sizes {local} along it."
                )
            sizes.append(local[0])
        elif not impl.holds_values or data[0].is_meta:  # shapes only (or shards without values)
            sizes.append(local[0] * math.prod(slicer.axis_size(a) for a in live))
        else:
            counts = tuple(torch.tensor([n], dtype=torch.int64, device=impl.default_device) for n in local)
            with impl.op_scope(f"from_local: the size of {name!r}"):
                totals = sorted({int(t.item()) for t in comm.all_reduce(impl, counts, live)})
            if len(totals) != 1:
                raise DimError(
                    f"from_local: dim {name!r} (split over {','.join(live)}) adds up to different "
                    f"sizes {totals} in different device groups; every group holds all of it."
                )
            sizes.append(totals[0])
    return sizes


def _from_local_grad(names: tuple[str, ...]) -> str:
    return (
        f"from_local: the shards for dims ({', '.join(names)}) require grad. A gradient through "
        f"from_local stops at each device's own shard, so a tensor they were computed from that is "
        f"replicated over an axis the result is split over (a weight, say) would get only each "
        f"device's part of its gradient, and its copies would drift apart after an optimizer step. "
        f"Fix: tm.local_map(fn, *inputs, out_dims=...) runs a per-device function on the inputs' "
        f"blocks with exact gradients; to start new leaves from these values instead, pass "
        f"[t.detach() for t in shards] with requires_grad=True (or build under torch.no_grad())."
    )


def _filled(dims: DimsLike, mesh: Mesh, fill, dtype, device, requires_grad, layout) -> MeshTensor:
    arguments.dtype(f"tensor {dims!r}", dtype)
    shape = parse_dims(dims)
    lay = layout_for(shape, mesh, layout)
    slicer = mesh.impl.slice_mesh
    device = device if device is not None else mesh.impl.default_device
    data = mesh.impl.make(lambda c: fill(local_shape(lay, slicer, c), dtype=dtype, device=device))
    if requires_grad:
        data = tuple(t.requires_grad_(True) for t in data)
    return MeshTensor(data, lay, mesh)


def zeros(
    dims: DimsLike,
    mesh: Mesh,
    dtype: torch.dtype | None = None,
    device: Any = None,
    requires_grad: bool = False,
    layout: RulesLike = None,
) -> MeshTensor:
    """A tensor of zeros with dims like "batch:8 d:16" (or [Dim(...)], or {"batch": 8}).

    >>> import torchmesh as tm
    >>> x = tm.zeros("batch:8 d:16", tm.Mesh("dp:2", rules="batch:dp"))
    >>> x.sizes, x.layout, tuple(x.shard(dp=0).shape)
    ({'batch': 8, 'd': 16}, {'batch': 'dp'}, (4, 16))
    """
    return _filled(dims, mesh, torch.zeros, dtype, device, requires_grad, layout)


def ones(
    dims: DimsLike,
    mesh: Mesh,
    dtype: torch.dtype | None = None,
    device: Any = None,
    requires_grad: bool = False,
    layout: RulesLike = None,
) -> MeshTensor:
    """A tensor of ones with dims like "batch:8 d:16".

    >>> import torch, torchmesh as tm
    >>> x = tm.ones({"batch": 4, "d": 2}, tm.Mesh("dp:2", rules="batch:dp"), dtype=torch.bfloat16)
    >>> x.dtype, x.sum().item()
    (torch.bfloat16, 8.0)
    """
    return _filled(dims, mesh, torch.ones, dtype, device, requires_grad, layout)


def full(
    dims: DimsLike,
    value: float,
    mesh: Mesh,
    dtype: torch.dtype | None = None,
    device: Any = None,
    requires_grad: bool = False,
    layout: RulesLike = None,
) -> MeshTensor:
    """A tensor filled with `value`.

    >>> import torchmesh as tm
    >>> tm.full("d:3", 0.5, tm.Mesh("dp:2")).full()
    tensor([0.5000, 0.5000, 0.5000])
    """
    arguments.number(f"full({dims!r}, value)", "value", value)
    return _filled(dims, mesh, lambda s, **kw: torch.full(s, value, **kw), dtype, device, requires_grad, layout)


def arange(
    dim: Dim | str, mesh: Mesh, dtype: torch.dtype | None = None, device: Any = None, layout: RulesLike = None
) -> MeshTensor:
    """The 1-d tensor 0, 1, ..., n-1 along `dim` ("pos:128" or Dim("pos", 128)); each device
    makes its own block.

    >>> import torchmesh as tm
    >>> pos = tm.arange("pos:6", tm.Mesh("sp:2", rules="pos:sp"))
    >>> pos.shard(sp=1)
    tensor([3, 4, 5])
    """
    if arguments.dtype(f"arange({dim!r})", dtype) is torch.bool:
        raise ArgumentError(
            f"arange({dim!r}, dtype=torch.bool): counting needs a numeric dtype (torch has no bool "
            f"arange). Fix: dtype=torch.int64, then == or > to make bools."
        )
    dims = parse_dims([dim]) if isinstance(dim, Dim) else parse_dims(dim)
    if len(dims) != 1:
        raise DimError(
            f"arange({dim!r}): arange makes a 1-d tensor, so it takes one dim, e.g. 'pos:128'; got {len(dims)}."
        )
    (d,) = dims
    lay = layout_for((d,), mesh, layout)
    slicer = mesh.impl.slice_mesh
    device = device if device is not None else mesh.impl.default_device

    def block(coords):
        s = local_slices(lay, slicer, coords)[0]
        return torch.arange(s.start, s.stop, dtype=dtype or torch.int64, device=device)

    return MeshTensor(mesh.impl.make(block), lay, mesh)


def _like(x: MeshTensor, fill, dtype: torch.dtype | None, requires_grad: bool) -> MeshTensor:
    """A tensor with x's dims, layout and mesh (each device's block shaped like x's), filled."""
    data = x.mesh.impl.slicewise(lambda t: fill(t, dtype=dtype or t.dtype), x._data)
    if requires_grad:
        data = tuple(t.requires_grad_(True) for t in data)
    return MeshTensor(data, x.tensor_layout, x.mesh)


def zeros_like(x: MeshTensor, dtype: torch.dtype | None = None, requires_grad: bool = False) -> MeshTensor:
    """Zeros with the dims, layout and mesh of `x` (its dtype unless `dtype` is given); no
    communication.

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.ones(5, 2), "batch d", tm.Mesh("dp:2", rules="batch:dp"))
    >>> z = tm.zeros_like(x, dtype=torch.int64)
    >>> z.sizes, z.layout, z.dtype, tuple(z.shard(dp=1).shape)
    ({'batch': 5, 'd': 2}, {'batch': 'dp'}, torch.int64, (2, 2))
    """
    return _like(x, torch.zeros_like, dtype, requires_grad)


def ones_like(x: MeshTensor, dtype: torch.dtype | None = None, requires_grad: bool = False) -> MeshTensor:
    """Ones with the dims, layout and mesh of `x`; no communication.

    >>> import torchmesh as tm
    >>> tm.ones_like(tm.zeros("d:3", tm.Mesh("dp:2"))).full()
    tensor([1., 1., 1.])
    """
    return _like(x, torch.ones_like, dtype, requires_grad)


def full_like(x: MeshTensor, value: float, dtype: torch.dtype | None = None, requires_grad: bool = False) -> MeshTensor:
    """`value` everywhere, with the dims, layout and mesh of `x`; no communication.

    >>> import torchmesh as tm
    >>> tm.full_like(tm.zeros("d:3", tm.Mesh("tp:2", rules="d:tp")), 0.5).full()
    tensor([0.5000, 0.5000, 0.5000])
    """
    return _like(x, lambda t, dtype: torch.full_like(t, value, dtype=dtype), dtype, requires_grad)
