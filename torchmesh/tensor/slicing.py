"""Slice, concat and pad along a named dim, and `shift` (neighbour exchange).

slice/concat/pad are local when the dim is not split; when it is, the dim is gathered
first and the result sliced back to the rules' layout (documented in docs/concepts.md).
`shift` along a split dim sends only the boundary rows to the neighbouring devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from torchmesh import errors
from torchmesh.arguments import integer
from torchmesh.comm import autograd as comm
from torchmesh.comm import traced
from torchmesh.errors import ArgumentError, DimError
from torchmesh.placement.dims import Dim
from torchmesh.tensor.mesh_tensor import MeshTensor, check_same_mesh
from torchmesh.tensor.relayout import to_layout


def _whole_along(x: MeshTensor, dim: str, what: str) -> tuple[MeshTensor, int]:
    """x with `dim` gathered (other dims as they are), and the dim's position."""
    if dim not in x.dims:
        raise DimError(errors.missing_dims(what, [dim], x.dims))
    i = x.dims.index(dim)
    lay = x.tensor_layout
    axes = lay.axes[:i] + ((),) + lay.axes[i + 1 :]
    return to_layout(x, traced.layout(lay.dims, axes)), i


def _local_result(x: MeshTensor, i: int, size: int, fn) -> MeshTensor:
    """Apply `fn` to local tensors whose dim i is whole; the result has dim i of `size`."""
    lay = x.tensor_layout
    dims = lay.dims[:i] + (Dim(lay.dims[i].name, size),) + lay.dims[i + 1 :]
    out = MeshTensor(x.mesh.impl.slicewise(fn, x._data), traced.layout(dims, lay.axes), x.mesh)
    return to_layout(out, x.mesh.layout_of(dims))


def slice(x: MeshTensor, dim: str, start: int, stop: int) -> MeshTensor:  # noqa: A001
    """Elements start..stop-1 of `dim` (Mesh TF's `mtf.slice` with begin and size).

    Local when `dim` is not split; otherwise the dim is gathered, sliced, and laid out again.

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.arange(6.0), "seq", tm.Mesh("dp:2"))
    >>> tm.slice(x, "seq", 1, 4).full()
    tensor([1., 2., 3.])
    """
    n = x.size(dim) if dim in x.dims else 0
    start = None if start is None else integer(f"slice(x, {dim!r}, start, stop)", "start", start)
    stop = None if stop is None else integer(f"slice(x, {dim!r}, start, stop)", "stop", stop)
    start, stop = _bounds(start, 0, n), _bounds(stop, n, n)  # slice.indices(n), which dynamo cannot trace
    stop = max(stop, start)
    with x.mesh.impl.op_scope(lambda: f"slice(x, {dim!r}, {start}, {stop}) of {x.tensor_layout}"):
        whole, i = _whole_along(x, dim, "slice")
        return _local_result(whole, i, stop - start, lambda t: t.narrow(i, start, stop - start))


def _bounds(i: int | None, default: int, n: int) -> int:
    """A slice bound in [0, n] (negative counts from the end, None is `default`), as Python's."""
    if i is None:
        return default
    return min(max(i + n if i < 0 else i, 0), n)


def concat(xs: Sequence[MeshTensor], dim: str) -> MeshTensor:
    """Concatenate along `dim`; every other dim must match by name and size.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2", rules="batch:dp")
    >>> a, b = tm.zeros("batch:2 d:1", mesh), tm.ones("batch:2 d:2", mesh)
    >>> tm.concat([a, b], "d").full()
    tensor([[0., 1., 1.],
            [0., 1., 1.]])
    """
    if not xs:
        raise DimError("concat needs at least one tensor.")
    first = xs[0]
    check_same_mesh(f"concat(xs, {dim!r})", list(xs))
    others = [d for d in first.shape if d.name != dim]
    for x in xs:
        if dim not in x.dims or sorted((d.name, d.size) for d in x.shape if d.name != dim) != sorted(
            (d.name, d.size) for d in others
        ):
            raise DimError(
                f"concat along {dim!r}: every tensor needs dim {dim!r} and the same other dims; "
                f"got {[x.sizes for x in xs]}."
            )
    with first.mesh.impl.op_scope(lambda: f"concat of {len(xs)} tensors along {dim!r}"):
        return _concat(xs, dim)


def _concat(xs: Sequence[MeshTensor], dim: str) -> MeshTensor:
    first = xs[0]
    wholes = [_whole_along(x, dim, "concat")[0] for x in xs]
    i = first.dims.index(dim)
    target = wholes[0].tensor_layout
    aligned = []
    for w in wholes:
        # Put each tensor in the first one's dim order and layout (other dims), then cat locally.
        perm = [w.dims.index(n) for n in first.dims]
        lay = traced.layout(tuple(w.tensor_layout.dims[p] for p in perm), tuple(w.tensor_layout.axes[p] for p in perm))
        moved = MeshTensor(w.mesh.impl.slicewise(lambda t, perm=perm: t.permute(perm), w._data), lay, w.mesh)
        want = traced.layout(lay.dims, target.axes)
        aligned.append(to_layout(moved, want))
    size = sum(x.size(dim) for x in xs)
    lay = target
    dims = lay.dims[:i] + (Dim(dim, size),) + lay.dims[i + 1 :]
    data = first.mesh.impl.slicewise(lambda *ts: torch.cat(ts, i), *(a._data for a in aligned))
    out = MeshTensor(data, traced.layout(dims, lay.axes), first.mesh)
    return to_layout(out, first.mesh.layout_of(dims))


def pad(x: MeshTensor, dim: str, before: int, after: int, value: float = 0.0) -> MeshTensor:
    """Pad `dim` with `before` and `after` elements of `value`.

    >>> import torchmesh as tm
    >>> tm.pad(tm.ones("seq:2", tm.Mesh("dp:2")), "seq", 1, 2).full()
    tensor([0., 1., 1., 0., 0.])
    """
    call = f"pad(x, {dim!r}, before, after)"
    before, after = integer(call, "before", before), integer(call, "after", after)
    if dim in x.dims and x.size(dim) + before + after < 0:
        raise ArgumentError(
            f"{call}: before={before} and after={after} (negative ones crop, as in torch) "
            f"would leave {x.size(dim) + before + after} elements of {dim!r}, which has "
            f"{x.size(dim)}. Fix: crop at most {x.size(dim)} elements in all."
        )
    if dim in x.dims and max(before, after) >= 2**62 // max(1, x.numel() // max(1, x.size(dim))):
        raise ArgumentError(
            f"{call}: before={before}, after={after} make a tensor of more than 2**62 elements, "
            f"which no device can hold. Fix: pad by a size that fits in memory."
        )
    with x.mesh.impl.op_scope(lambda: f"{call} of {x.tensor_layout}"):
        whole, i = _whole_along(x, dim, "pad")
        spec = [0, 0] * (x.ndim - 1 - i) + [before, after]
        return _local_result(whole, i, x.size(dim) + before + after, lambda t: F.pad(t, spec, value=value))


def shift(x: MeshTensor, dim: str, offset: int, wrap: bool = False) -> MeshTensor:
    """out[dim=i] = x[dim=i - offset], zero-filled (or wrapped around with `wrap`).

    Along a split dim each device receives only the rows it lacks from its neighbours
    (point-to-point), as for convolutions and local attention. A dim split into uneven
    blocks is gathered, shifted and split again instead.

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.arange(1.0, 7.0), "seq", tm.Mesh("sp:2", rules="seq:sp"))
    >>> tm.shift(x, "seq", 1).full(), tm.shift(x, "seq", -2, wrap=True).full()
    (tensor([0., 1., 2., 3., 4., 5.]), tensor([3., 4., 5., 6., 1., 2.]))
    """
    if dim not in x.dims:
        raise DimError(errors.missing_dims("shift", [dim], x.dims))
    offset = integer(f"shift(x, {dim!r}, offset)", "offset", offset)
    with x.mesh.impl.op_scope(
        lambda: f"shift(x, {dim!r}, {offset}{', wrap=True' if wrap else ''}) of {x.tensor_layout}"
    ):
        return _shift(x, dim, offset, wrap)


def _shift(x: MeshTensor, dim: str, offset: int, wrap: bool) -> MeshTensor:
    x = to_layout(x, x.mesh.layout_of(x.shape))
    impl = x.mesh.impl
    i = x.dims.index(dim)
    axes = x.tensor_layout.axes[i]
    blocks = 1
    for a in axes:
        blocks *= impl.axis_size(a)
    if x.size(dim) % blocks:  # uneven blocks: gather the dim, shift it locally, split it again
        return _shift_whole(x, dim, offset, wrap)
    length = x.size(dim) // blocks
    if length == 0:
        return x
    q, r = offset // length, offset % length  # (not divmod: torch.compile traces these on symbolic sizes)
    if r == 0:  # whole blocks move (or none): one exchange, no empty one
        return MeshTensor(comm.shift(impl, x._data, axes, q, wrap), x.tensor_layout, x.mesh)
    # Block b of the result: the last r rows of block b-q-1, then the first L-r rows of block b-q.
    head = comm.shift(impl, impl.slicewise(lambda t: t.narrow(i, length - r, r), x._data), axes, q + 1, wrap)
    tail = comm.shift(impl, impl.slicewise(lambda t: t.narrow(i, 0, length - r), x._data), axes, q, wrap)
    data = impl.slicewise(lambda a, b: torch.cat([a, b], i), head, tail)
    return MeshTensor(data, x.tensor_layout, x.mesh)


def _shift_whole(x: MeshTensor, dim: str, offset: int, wrap: bool) -> MeshTensor:
    """`shift` of a dim split into uneven blocks: gathered, shifted locally, split again (a
    boundary exchange would need pieces of several neighbours of different sizes)."""
    whole, i = _whole_along(x, dim, "shift")
    n = x.size(dim)

    def local(t: torch.Tensor) -> torch.Tensor:
        if wrap:
            return torch.roll(t, offset, i)
        k = max(-n, min(n, offset))
        kept = t.narrow(i, max(0, -k), n - abs(k))
        spec = [0, 0] * (t.dim() - 1 - i) + [max(0, k), max(0, -k)]
        return F.pad(kept, spec)

    return _local_result(whole, i, n, local)
