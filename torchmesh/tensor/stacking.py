"""Stacking along a new named dim and taking a dim apart: `stack`, `unstack`, `split`.

`stack` is local: every device stacks its blocks and keeps its own block of the new dim
where the rules split it. `unstack` and `split` are local when their dim is not split;
along a split dim it is all-gathered once, then each piece is cut locally and laid out by
the rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from torchmesh.comm import traced
from torchmesh.errors import ArgumentError, ArgumentTypeError, DimError, MeshError
from torchmesh.placement.dims import Dim, check_name
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.relayout import to_layout
from torchmesh.tensor.selection import dim_name
from torchmesh.tensor.slicing import _local_result, _whole_along


def stack(xs: Sequence[MeshTensor], new_dim: str, *, axis: int = 0) -> MeshTensor:
    """Stack tensors with the same dims along a new dim `new_dim` of size len(xs), placed
    at storage position `axis` (Mesh TF's `mtf.stack`). Where the rules split `new_dim`, the
    result ends split: each device stacks its blocks and keeps its own block of the new dim
    (no communication; backward all-gathers the gradient over the new dim's axes).

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="layer:tp")
    >>> xs = [tm.distribute(torch.full((2,), float(n)), "d", mesh) for n in range(3)]
    >>> y = tm.stack(xs, "layer")
    >>> y.dims, y.layout, y.full()
    (('layer', 'd'), {'layer': 'tp'}, tensor([[0., 0.],
            [1., 1.],
            [2., 2.]]))
    """
    xs = list(xs)
    if not xs or not all(isinstance(x, MeshTensor) for x in xs):
        raise ArgumentError(f"stack along {new_dim!r} needs a non-empty list of MeshTensors; got {xs!r:.200}.")
    check_name(new_dim)
    first, mesh = xs[0], xs[0].mesh
    for n, x in enumerate(xs):
        if x.mesh is not mesh:
            raise MeshError(f"stack along {new_dim!r}: tensor {n} lives on another mesh ({x.mesh} vs {mesh}).")
        if sorted(x.sizes.items()) != sorted(first.sizes.items()):
            raise DimError(
                f"stack along {new_dim!r}: every tensor needs the same dims; tensor 0 has "
                f"{first.sizes}, tensor {n} has {x.sizes}."
            )
    if new_dim in first.dims:
        raise DimError(
            f"stack along {new_dim!r}: {new_dim!r} is already a dim of the tensors {first.dims}; "
            f"name the new dim something else."
        )
    if not 0 <= axis <= first.ndim:
        raise DimError(
            f"stack along {new_dim!r}: axis={axis} is not a position in 0..{first.ndim} "
            f"(the tensors have dims {first.dims})."
        )
    dims = first.shape[:axis] + (Dim(new_dim, len(xs)),) + first.shape[axis:]
    out = mesh.layout_of(dims)
    # every input in the output's layout without the new dim (usually: as it is), first's dim order
    lay = traced.layout(first.shape, out.axes[:axis] + out.axes[axis + 1 :])
    aligned = [to_layout(_in_order(x, first.dims), lay) for x in xs]
    data = mesh.impl.slicewise(lambda *ts: torch.stack(ts, axis), *(x._data for x in aligned))
    stacked = traced.layout(dims, lay.axes[:axis] + ((),) + lay.axes[axis:])
    return to_layout(MeshTensor(data, stacked, mesh), out)


def _in_order(x: MeshTensor, names: tuple[str, ...]) -> MeshTensor:
    """x with its local storage permuted to the dim order `names` (no communication)."""
    if x.dims == names:
        return x
    perm = tuple(x.dims.index(n) for n in names)
    lay = x.tensor_layout
    moved = traced.layout(tuple(lay.dims[p] for p in perm), tuple(lay.axes[p] for p in perm))
    return MeshTensor(x.mesh.impl.slicewise(lambda t: t.permute(perm), x._data), moved, x.mesh)


def unstack(x: MeshTensor, dim: str) -> list[MeshTensor]:
    """The slices of `x` along `dim`, each without `dim` (Mesh TF's `mtf.unstack`; like
    `torch.unbind`). Local when `dim` is not split; along a split dim, one all-gather of `x`
    over its axes first (each piece is then whole on every device, laid out by the rules).

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="layer:tp")
    >>> x = tm.distribute(torch.arange(6.0).reshape(3, 2), "layer d", mesh)
    >>> [p.full() for p in tm.unstack(x, "layer")]
    [tensor([0., 1.]), tensor([2., 3.]), tensor([4., 5.])]
    """
    whole, i = _whole_along(x, dim_name(x, dim, "unstack"), "unstack")
    lay = whole.tensor_layout
    rest = traced.layout(lay.dims[:i] + lay.dims[i + 1 :], lay.axes[:i] + lay.axes[i + 1 :])
    target = x.mesh.layout_of(rest.dims)
    impl = x.mesh.impl
    return [
        to_layout(MeshTensor(impl.slicewise(lambda t, n=n: t.select(i, n), whole._data), rest, x.mesh), target)
        for n in range(x.sizes[dim])
    ]


def split(x: MeshTensor, dim: str, sizes: int | Sequence[int]) -> list[MeshTensor]:
    """Pieces of `x` along `dim`, each keeping the name `dim` with its own size, like
    `torch.split`: `sizes` is a list of piece sizes summing to the dim's size, or one int,
    the size of every piece (the last may be smaller). (Mesh TF's `mtf.split` takes a number
    of pieces instead: write `[n // pieces] * pieces`.)

    Local when `dim` is not split; along a split dim, one all-gather of `x` over its axes,
    then each piece is cut locally and sliced to the rules' layout.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="d:tp")
    >>> x = tm.distribute(torch.arange(5.0), "d", mesh)
    >>> [p.full() for p in tm.split(x, "d", [2, 3])]
    [tensor([0., 1.]), tensor([2., 3., 4.])]
    >>> [p.sizes for p in tm.split(x, "d", 2)]
    [{'d': 2}, {'d': 2}, {'d': 1}]
    """
    dim = dim_name(x, dim, "split")
    n = x.size(dim)
    pieces = _piece_sizes(sizes, n, dim, x.sizes)
    whole, i = _whole_along(x, dim, "split")
    out, start = [], 0
    for size in pieces:
        out.append(_local_result(whole, i, size, lambda t, s=start, m=size: t.narrow(i, s, m)))
        start += size
    return out


def _piece_sizes(sizes: int | Sequence[int], n: int, dim: str, have: dict) -> list[int]:
    if isinstance(sizes, int) and not isinstance(sizes, bool):
        if sizes < 1:
            raise ArgumentError(f"split along {dim!r}: a piece size must be >= 1, got {sizes}.")
        return [min(sizes, n - s) for s in range(0, n, sizes)] or [0]
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise ArgumentTypeError(
            f"split along {dim!r}: sizes={sizes!r} is a {type(sizes).__name__}; give a list of "
            f"piece sizes summing to {n}, or one int, the size of every piece."
        )
    sizes = list(sizes)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes) or sum(sizes) != n:
        raise DimError(
            f"split along {dim!r}: sizes {sizes} must be non-negative ints summing to the dim's "
            f"size {n} (the tensor is {have}); or give one int, the size of every piece."
        )
    return sizes
