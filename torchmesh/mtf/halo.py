"""Mesh TF's `halo_exchange` and `left_halo_exchange` (its ops.py), written with `mtf.shift`,
`mtf.slice` and `mtf.concat` exactly as Mesh TF writes them: a neighbour exchange when the
blocks dim is split. Re-exported by `torchmesh.mtf.layers`; the blocked convolutions of
`torchmesh.mtf.conv_layers` use them.
"""

from __future__ import annotations

from torchmesh.mtf import ops as mtf
from torchmesh.placement.dims import Dim
from torchmesh.tensor.mesh_tensor import MeshTensor


def halo_exchange(
    x: MeshTensor, blocks_dim: Dim, block_size_dim: Dim, halo_size: int, wrap: bool = False
) -> MeshTensor:
    """Mesh TF's `halo_exchange`: each block (along blocks_dim) extended along block_size_dim
    by `halo_size` elements of the neighbouring blocks on both sides (zeros past the ends
    unless `wrap`); neighbours come by `mtf.shift` along blocks_dim, which is a neighbour
    exchange when blocks_dim is split.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="blocks:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.arange(6.0).reshape(3, 2), "blocks:3 block:2")
    >>> mtf.layers.halo_exchange(x, mtf.Dimension("blocks", 3), mtf.Dimension("block", 2), 1).full()
    tensor([[0., 0., 1., 2.],
            [1., 2., 3., 4.],
            [3., 4., 5., 0.]])
    """
    if halo_size == 0:
        return x
    partial, complete = halo_size % block_size_dim.size, halo_size // block_size_dim.size
    parts = [x]
    for i in range(1, complete + 1):
        parts = [mtf.shift(x, i, blocks_dim, wrap), *parts, mtf.shift(x, -i, blocks_dim, wrap)]
    if partial > 0:
        left = mtf.slice(x, 0, partial, block_size_dim.name)
        right = mtf.slice(x, block_size_dim.size - partial, partial, block_size_dim.name)
        parts = [
            mtf.shift(right, complete + 1, blocks_dim, wrap),
            *parts,
            mtf.shift(left, -(complete + 1), blocks_dim, wrap),
        ]
    return mtf.concat(parts, block_size_dim.name)


def left_halo_exchange(
    x: MeshTensor, blocks_dim: Dim, block_size_dim: Dim, halo_size: int, wrap: bool = False
) -> MeshTensor:
    """Mesh TF's `left_halo_exchange`: each block extended on the left only (see `halo_exchange`).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="blocks:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.arange(6.0).reshape(3, 2), "blocks:3 block:2")
    >>> mtf.layers.left_halo_exchange(x, mtf.Dimension("blocks", 3), mtf.Dimension("block", 2), 3).full()
    tensor([[0., 0., 0., 0., 1.],
            [0., 0., 1., 2., 3.],
            [1., 2., 3., 4., 5.]])
    """
    if halo_size == 0:
        return x
    partial, complete = halo_size % block_size_dim.size, halo_size // block_size_dim.size
    parts = [x]
    for i in range(1, complete + 1):
        parts = [mtf.shift(x, i, blocks_dim, wrap), *parts]
    if partial > 0:
        right = mtf.slice(x, block_size_dim.size - partial, partial, block_size_dim.name)
        parts = [mtf.shift(right, complete + 1, blocks_dim, wrap), *parts]
    return mtf.concat(parts, block_size_dim.name)
