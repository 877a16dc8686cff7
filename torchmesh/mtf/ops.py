"""Mesh TF's `mesh_tensorflow/ops.py` names over torchmesh (see `torchmesh.mtf`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from torchmesh.placement.dims import Dim, DimsLike, parse_dims
from torchmesh.tensor import slicing as _slicing
from torchmesh.tensor.construct import distribute
from torchmesh.tensor.einsum import einsum
from torchmesh.tensor.elementwise import cast
from torchmesh.tensor.gather import gather as _gather
from torchmesh.tensor.gather import one_hot as _one_hot
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.reduce import (
    logsumexp,
    reduce_all,
    reduce_any,
    reduce_max,
    reduce_mean,
    reduce_min,
    reduce_sum,
    softmax,
)
from torchmesh.tensor.relayout import rename

if TYPE_CHECKING:
    from torchmesh.tensor.mesh import Mesh

Dimension = Dim


def Shape(dims: DimsLike) -> tuple[Dim, ...]:
    """A tuple of Dims (Mesh TF's `mtf.Shape`).

    >>> import torchmesh.mtf as mtf
    >>> mtf.Shape([mtf.Dimension("batch", 8), mtf.Dimension("d", 16)]) == mtf.Shape("batch:8 d:16")
    True
    """
    return parse_dims(dims)


def import_tf_tensor(mesh: Mesh, tensor: torch.Tensor, shape: DimsLike) -> MeshTensor:
    """`mtf.import_tf_tensor`: a global torch tensor laid out on the mesh.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="batch:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.zeros(8, 16), mtf.Shape("batch:8 d:16"))
    >>> x.sizes, x.layout
    ({'batch': 8, 'd': 16}, {'batch': 'b1'})
    """
    return distribute(tensor, [d.name for d in parse_dims(shape, dict(zip(_names(shape), tensor.shape)))], mesh)


def _names(shape: DimsLike) -> list[str]:
    if isinstance(shape, str):
        return [t.split(":")[0] for t in shape.replace(",", " ").split()]
    return [_name(d) for d in shape]


def _name(dim: Dim | str) -> str:
    return dim if isinstance(dim, str) else dim.name


def rename_dimension(x: MeshTensor, old_name: str, new_name: str) -> MeshTensor:
    """`mtf.rename_dimension`: `x.rename(old_name=new_name)`.

    >>> import torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.zeros("batch:4 d:8", tm.Mesh("b1:2", rules="batch:b1"))
    >>> mtf.rename_dimension(x, "d", "d_model").dims
    ('batch', 'd_model')
    """
    return rename(x, {old_name: new_name})


def shift(x: MeshTensor, offset: int, dim: Dim | str, wrap: bool) -> MeshTensor:
    """`mtf.shift(x, offset, dim, wrap)`: `tm.shift(x, dim, offset, wrap=wrap)`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.distribute(torch.arange(1.0, 5.0), "seq", tm.Mesh("b1:2", rules="seq:b1"))
    >>> mtf.shift(x, 1, "seq", wrap=True).full()
    tensor([4., 1., 2., 3.])
    """
    return _slicing.shift(x, _name(dim), offset, wrap)


def slice(x: MeshTensor, begin: int, size: int, slice_dim_name: str) -> MeshTensor:  # noqa: A001
    """`mtf.slice(x, begin, size, slice_dim_name)`: `tm.slice(x, name, begin, begin + size)`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.distribute(torch.arange(6.0), "seq", tm.Mesh("b1:2"))
    >>> mtf.slice(x, 1, 2, "seq").full()
    tensor([1., 2.])
    """
    return _slicing.slice(x, slice_dim_name, begin, begin + size)


def concat(xs: Sequence[MeshTensor], concat_dim_name: str) -> MeshTensor:
    """`mtf.concat(xs, concat_dim_name)`: `tm.concat(xs, name)`.

    >>> import torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2")
    >>> mtf.concat([tm.zeros("d:1", mesh), tm.ones("d:2", mesh)], "d").full()
    tensor([0., 1., 1.])
    """
    return _slicing.concat(xs, concat_dim_name)


def gather(weights: MeshTensor, indices: MeshTensor, dim: Dim | str) -> MeshTensor:
    """`mtf.gather(weights, indices, dim)`: look up `indices` along `dim` of `weights`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="vocab:b1")
    >>> table = tm.distribute(torch.arange(4.0), "vocab", mesh)
    >>> ids = tm.distribute(torch.tensor([3, 1]), "batch", mesh)
    >>> mtf.gather(table, ids, mtf.Dimension("vocab", 4)).full()
    tensor([3., 1.])
    """
    return _gather(weights, indices, _name(dim))


def one_hot(indices: MeshTensor, output_dim: Dim, dtype: torch.dtype = torch.float32) -> MeshTensor:
    """`mtf.one_hot(indices, output_dim)`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> ids = tm.distribute(torch.tensor([1]), "batch", tm.Mesh("b1:2", rules="vocab:b1"))
    >>> mtf.one_hot(ids, mtf.Dimension("vocab", 4)).full()
    tensor([[0., 1., 0., 0.]])
    """
    return _one_hot(indices, output_dim, dtype)


def reduce_logsumexp(x: MeshTensor, reduced_dim: Dim | str) -> MeshTensor:
    """`mtf.reduce_logsumexp(x, reduced_dim)`: `tm.logsumexp(x, name)`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.zeros("batch:1 vocab:4", tm.Mesh("b1:2", rules="vocab:b1"))
    >>> mtf.reduce_logsumexp(x, mtf.Dimension("vocab", 4)).full()
    tensor([1.3863])
    """
    return logsumexp(x, [reduced_dim])


__all__ = [
    "Dimension",
    "Shape",
    "cast",
    "concat",
    "einsum",
    "gather",
    "import_tf_tensor",
    "one_hot",
    "reduce_all",
    "reduce_any",
    "reduce_logsumexp",
    "reduce_max",
    "reduce_mean",
    "reduce_min",
    "reduce_sum",
    "rename_dimension",
    "shift",
    "slice",
    "softmax",
]
