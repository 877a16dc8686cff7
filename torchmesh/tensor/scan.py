"""Scans along a named dim: `cumsum`.

Along a split dim each device scans its own block, and adds the sum of the blocks before it
(after it, scanning in reverse): the block totals, one number per row and block, are
all-gathered over the dim's axes. Their gradient is summed back over those axes (each
device used the totals its own way): a reduce-scatter of the same few numbers in backward.
"""

from __future__ import annotations

import torch

from torchmesh.comm import autograd as comm
from torchmesh.placement.mesh_shape import block_index
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.relayout import to_layout
from torchmesh.tensor.selection import dim_name


def cumsum(x: MeshTensor, dim: str, exclusive: bool = False, reverse: bool = False) -> MeshTensor:
    """Cumulative sum along `dim`, like `torch.cumsum` (integers and bools sum as int64);
    also `x.cumsum("seq")`. `exclusive`: each element's sum leaves itself out (shifted by
    one, starting at 0); `reverse`: sums run from the end of the dim.

    Over a split dim: a local scan, plus one all-gather of the block totals (one value per
    row and block) over each of the dim's axes; backward reduce-scatters their gradient.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("sp:2", rules="seq:sp")
    >>> x = tm.distribute(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), "seq", mesh)
    >>> tm.cumsum(x, "seq").full()
    tensor([ 1.,  3.,  6., 10., 15.])
    >>> tm.cumsum(x, "seq", exclusive=True, reverse=True).full()
    tensor([14., 12.,  9.,  5.,  0.])
    """
    dim = dim_name(x, dim, "cumsum")
    lay, impl = x.tensor_layout, x.mesh.impl
    i = lay.names.index(dim)
    axes = impl.slice_mesh.live_axes(lay.axes[i])
    data = impl.slicewise(lambda t: _scan(t, i, exclusive, reverse), x._data)
    if axes:
        totals = impl.slicewise(lambda t: t.sum(i, keepdim=True, dtype=_scan_dtype(t)), x._data)
        for axis in reversed(axes):  # minor first: every block's total, in block order
            totals = comm.all_gather(impl, totals, axis, i, reduce_grad=True)

        def add_others(coords, scanned, all_totals):
            b = block_index(impl.slice_mesh, axes, coords)
            others = all_totals.narrow(i, b + 1, all_totals.shape[i] - b - 1) if reverse else all_totals.narrow(i, 0, b)
            return scanned + others.sum(i, keepdim=True)

        data = impl.slicewise_at(add_others, data, totals)
    return to_layout(MeshTensor(data, lay, x.mesh), x.mesh.layout_of(lay.dims))


def _scan_dtype(t: torch.Tensor) -> torch.dtype:
    """torch.cumsum's result dtype: integers and bools are summed as int64."""
    return t.dtype if t.dtype.is_floating_point or t.dtype.is_complex else torch.int64


def _scan(t: torch.Tensor, i: int, exclusive: bool, reverse: bool) -> torch.Tensor:
    """The scan of one block along dim i."""
    if reverse:
        t = t.flip(i)
    out = torch.cumsum(t, i, dtype=_scan_dtype(t))
    if exclusive and t.shape[i]:
        out = torch.cat([torch.zeros_like(out.narrow(i, 0, 1)), out.narrow(i, 0, t.shape[i] - 1)], i)
    return out.flip(i) if reverse else out
