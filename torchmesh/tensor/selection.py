"""Selection along a named dim: `top_k`, `argmax`, `argmin`.

Along a split dim only candidates move: each device keeps the best `c` of its block
(c = min(k, the largest block); a smaller block is padded with entries that can never be
chosen), the candidates' values and global indices (int32 where the dim allows) are
all-gathered over the dim's axes, and every device picks the best k of them. Where the
candidates would weigh as much as the block itself (k above about half a block), the dim
is all-gathered instead. Ties go to the lower index on every mesh and backend (stable
sorts), so a result never depends on the layout.
"""

from __future__ import annotations

import torch

from torchmesh import errors
from torchmesh.comm import autograd as comm
from torchmesh.comm import traced
from torchmesh.comm.backend import Data
from torchmesh.errors import ArgumentTypeError, DimError
from torchmesh.placement.dims import Dim, check_name
from torchmesh.placement.layout import TensorLayout, is_even
from torchmesh.placement.mesh_shape import block_bounds, max_block, parts
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.relayout import to_layout
from torchmesh.tensor.slicing import _whole_along


def dim_name(x: MeshTensor, dim: str | Dim, what: str) -> str:
    """The name of the one dim an op works along: a name or a Dim of `x` (positions are refused
    with the names to use; a missing name with the tensor's dims)."""
    name = dim.name if isinstance(dim, Dim) else dim
    if not isinstance(name, str):
        raise ArgumentTypeError(errors.positional_dim(f"x.{what}", dim, x.dims))
    if name not in x.dims:
        raise DimError(errors.missing_dims(what, [name], x.dims))
    return name


def top_k(
    x: MeshTensor, dim: str, k: int, new_dim: str = "k", *, largest: bool = True
) -> tuple[MeshTensor, MeshTensor]:
    """The k largest values along `dim` and their global int64 indices (like `torch.topk`):
    `dim` is replaced by `new_dim` of size k, values sorted from the largest (from the
    smallest with `largest=False`). The values' gradient goes to the selected elements.

    Ties go to the lower index (stable sorts; `torch.topk` may pick another of equal
    values); NaN counts as larger than every number. Over a split dim each device sends its
    block's best min(k, block) values and indices: two all-gathers (values, indices) over
    each of the dim's axes; or, where those would weigh as much as the block (k above about
    half a block), one all-gather of the dim per axis.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="vocab:tp")
    >>> x = tm.distribute(torch.tensor([[1.0, 9.0, 3.0, 7.0, 5.0]]), "batch vocab", mesh)
    >>> values, indices = tm.top_k(x, "vocab", 2)
    >>> values.dims, values.full(), indices.full()
    (('batch', 'k'), tensor([[9., 7.]]), tensor([[1, 3]]))
    """
    dim = dim_name(x, dim, "top_k")
    check_name(new_dim)
    if new_dim != dim and new_dim in x.dims:
        raise DimError(
            f"top_k along {dim!r}: new_dim {new_dim!r} is already a dim of the tensor {x.dims}; "
            f"pick another name for the k dim (new_dim='k')."
        )
    values, indices, lay, i = _select(x, dim, k, largest, "top_k")
    dims = lay.dims[:i] + (Dim(new_dim, k),) + lay.dims[i + 1 :]
    out = traced.layout(dims, lay.axes[:i] + ((),) + lay.axes[i + 1 :])  # the k best: on every device
    target = x.mesh.layout_of(dims)
    return to_layout(MeshTensor(values, out, x.mesh), target), to_layout(MeshTensor(indices, out, x.mesh), target)


def argmax(x: MeshTensor, dim: str) -> MeshTensor:
    """The global int64 index of the largest value along `dim` (removed), the first one
    where several are equal (a NaN's, if any), like `torch.argmax`; also `x.argmax("vocab")`.
    Over a split dim it communicates as `top_k` with k=1: one candidate per block.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="vocab:tp")
    >>> x = tm.distribute(torch.tensor([[1.0, 9.0, 3.0, 9.0], [4.0, 0.0, 2.0, 8.0]]), "batch vocab", mesh)
    >>> tm.argmax(x, "vocab").full()
    tensor([1, 3])
    """
    return _index_of(x, dim, True, "argmax")


def argmin(x: MeshTensor, dim: str) -> MeshTensor:
    """The global int64 index of the smallest value along `dim` (removed), the first one
    where several are equal (a NaN's, if any), like `torch.argmin`; also `x.argmin("vocab")`.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="vocab:tp")
    >>> x = tm.distribute(torch.tensor([[1.0, 9.0, 3.0, 1.0], [4.0, 0.0, 2.0, 8.0]]), "batch vocab", mesh)
    >>> tm.argmin(x, "vocab").full()
    tensor([0, 1])
    """
    return _index_of(x, dim, False, "argmin")


def _index_of(x: MeshTensor, dim: str, largest: bool, what: str) -> MeshTensor:
    x = x.detach()
    if not largest:  # the largest of an order-reversed copy; NaN still wins, as in torch.argmin
        x = x._map(torch.neg if x.dtype.is_floating_point else torch.bitwise_not)
    _, indices, lay, i = _select(x, dim, 1, True, what)
    data = x.mesh.impl.slicewise(lambda t: t.squeeze(i), indices)
    out = traced.layout(lay.dims[:i] + lay.dims[i + 1 :], lay.axes[:i] + lay.axes[i + 1 :])
    return to_layout(MeshTensor(data, out, x.mesh), x.mesh.layout_of(out.dims))


def _select(x: MeshTensor, dim: str, k: int, largest: bool, what: str) -> tuple[Data, Data, TensorLayout, int]:
    """The best k along `dim` (values, global indices), replicated over the dim's axes; the
    other dims as in `x`. Returns both, x's layout and the dim's position."""
    dim = dim_name(x, dim, what)
    size = x.sizes[dim]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
        raise DimError(
            f"{what} along {dim!r}: k={k!r}, but {dim!r} has size {size} in the tensor {x.sizes}; "
            f"k is an int from 1 to {size}."
        )
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise ArgumentTypeError(
            f"{what} along {dim!r}: values of dtype {x.dtype} have no order here; cast first (x.to(torch.int32))."
        )
    x = _even_for_the_partitioner(x)
    impl, slicer = x.mesh.impl, x.mesh.impl.slice_mesh
    i = x.dims.index(dim)
    axes = slicer.live_axes(x.tensor_layout.axes[i])
    block = max_block(size, slicer, axes)
    c = min(k, block)
    index_dtype = torch.int32 if size < 2**31 else torch.int64  # sent as int32 where it fits
    if axes and c * (x._data[0].element_size() + index_dtype.itemsize) >= block * x._data[0].element_size():
        x, axes, c = _whole_along(x, dim, what)[0], (), k  # the candidates would outweigh the dim itself
    lay = x.tensor_layout
    pad = _never_chosen(x.dtype, largest)

    def best(coords, t):
        start, _ = block_bounds(size, slicer, lay.axes[i], coords)
        return _best(t, i, c, largest, start, size, pad)

    pairs = impl.slicewise_at(best, x._data)
    values, indices = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    if not axes:
        return values, indices, lay, i
    indices = impl.slicewise(lambda j: j.to(index_dtype), indices)
    for axis in reversed(axes):  # minor first: the blocks come back in order
        values = comm.all_gather(impl, values, axis, i)
        indices = comm.all_gather(impl, indices, axis, i)
    pairs = impl.slicewise(lambda v, j: _final(v, j.long(), i, k, largest), values, indices)
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), lay, i


def _even_for_the_partitioner(x: MeshTensor) -> MeshTensor:
    """`x`, replicated over the axes of its uneven dims where the backend's partitioner cuts
    the tensors (xla) and a gradient will flow: torch-xla 2.9 aborts the process when it
    partitions the scatter of a gather's (or sort's) backward over an uneven split (a failed
    check in spmd_partitioner_util.h; tm.gather's backward meets the same)."""
    impl, lay = x.mesh.impl, x.tensor_layout
    if impl.slice_mesh == impl.shape or not x.requires_grad or is_even(lay, impl.shape):
        return x
    axes = tuple(() if d.size % parts(impl.shape, ax) else ax for d, ax in zip(lay.dims, lay.axes))
    return to_layout(x, traced.layout(lay.dims, axes))


def _never_chosen(dtype: torch.dtype, largest: bool) -> float | int:
    """A padding value no real element loses to: ties go to the lower index, and padding
    carries the index past the end. (Floats: -inf when the largest win; NaN, which sorts
    after +inf, when the smallest do.)"""
    if dtype.is_floating_point:
        return float("-inf") if largest else float("nan")
    info = torch.iinfo(dtype)
    return info.min if largest else info.max


def _ranking(t: torch.Tensor, i: int, largest: bool) -> torch.Tensor:
    """The permutation along dim i that puts the best first: by value (NaN above every
    number, as in torch.sort on CPU), equals in index order. NaN is ranked by an explicit key,
    as backends' sorts place it differently."""
    t = t.detach()
    if not t.dtype.is_floating_point:
        return torch.sort(t, dim=i, descending=largest, stable=True)[1]
    nan = t.isnan()
    order = torch.sort(t.masked_fill(nan, 0), dim=i, descending=largest, stable=True)[1]
    by_nan = torch.sort(nan.gather(i, order).to(torch.int32), dim=i, descending=largest, stable=True)[1]
    return order.gather(i, by_nan)


def _best(t: torch.Tensor, i: int, c: int, largest: bool, start: int, size: int, pad: float | int):
    """A block's best `c` along dim i, best first and lower index first among equals, with
    global indices; padded to `c` (index `size`) when the block is smaller."""
    m = min(c, t.shape[i])
    order = _ranking(t, i, largest).narrow(i, 0, m)
    values, order = t.gather(i, order), order + start
    if m < c:
        shape = list(t.shape)
        shape[i] = c - m
        values = torch.cat([values, values.new_full(shape, pad)], i)
        order = torch.cat([order, order.new_full(shape, size)], i)
    return values, order


def _final(values: torch.Tensor, indices: torch.Tensor, i: int, k: int, largest: bool):
    """The best k candidates: put them in index order, then rank them by value."""
    by_index = torch.argsort(indices, dim=i)
    values, indices = values.gather(i, by_index), indices.gather(i, by_index)
    order = _ranking(values, i, largest).narrow(i, 0, k)
    return values.gather(i, order), indices.gather(i, order)
