"""Rotary position embeddings (RoPE) over named dims, in Hugging Face Llama's convention.

`rope(x, theta)` rotates the pairs (i, i + d/2) of `x`'s `d_head` (d = its size) at each
position p of `seq` by the angle p * theta ** (-2i / d): `x * cos + rotate_half(x) * sin`,
with `rotate_half(x) = concat(-x[d/2:], x[:d/2])`. This is the `rotate_half` form of
transformers' Llama (whose q/k projection weights are stored already permuted for it), so
weights load from Hugging Face without any permutation.

The cos and sin tables are MeshTensors with dims `seq d_head`, laid out by the rules like
any other tensor (a split `seq` gives each device the rows of its positions), so the result
does not depend on the layout. With `d_head` whole on each device and every split dim even
(the usual case) the rotation is one local function per device (`local_map`); a split
`d_head`, or a dim split unevenly (a batch of 3 over dp:2, which XLA's manual regions
cannot hand a function), takes MeshTensor slices instead: the same numbers on every backend.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from torchmesh.comm import traced
from torchmesh.comm.backend import compiling
from torchmesh.errors import DimError
from torchmesh.placement.layout import is_even
from torchmesh.tensor.construct import distribute
from torchmesh.tensor.local_map import local_map
from torchmesh.tensor.mesh import Mesh
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.slicing import concat
from torchmesh.tensor.slicing import slice as tm_slice


def rope_angles(seq: int, d_head: int, theta: float = 10000.0, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each `(seq, d_head)` float32, for positions offset .. offset + seq - 1.

    >>> import torchmesh as tm
    >>> cos, sin = tm.nn.rope.rope_angles(3, 4)
    >>> cos[0].tolist(), round(float(sin[1, 0]), 4)
    ([1.0, 1.0, 1.0, 1.0], 0.8415)
    """
    if d_head % 2:
        raise DimError(f"rope: d_head={d_head} must be even (RoPE rotates pairs of it).")
    inv_freq = 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.int64).float() / d_head))
    positions = torch.arange(offset, offset + seq, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def _make_tables(mesh: Mesh, seq: int, d_head: int, theta: float, offset: int, names: tuple[str, str]):
    cos, sin = rope_angles(seq, d_head, theta, offset)
    dims = f"{names[0]} {names[1]}"
    return distribute(cos, dims, mesh), distribute(sin, dims, mesh)


@lru_cache(maxsize=64)
def _tables(mesh: Mesh, seq: int, d_head: int, theta: float, offset: int, names: tuple[str, str], rules: str):
    return _make_tables(mesh, seq, d_head, theta, offset, names)


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    """concat(-t[..., d/2:], t[..., :d/2]) along the last dim (transformers' `rotate_half`)."""
    first, second = t.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rope(
    x: MeshTensor, theta: float = 10000.0, seq: str = "seq", head_dim: str = "d_head", offset: int = 0
) -> MeshTensor:
    """`x` with RoPE applied: each position p of dim `seq` (counted from `offset`) rotates the
    pairs of dim `head_dim`. Every other dim (batch, heads) is carried through.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;heads:tp")
    >>> q = tm.randn("batch:2 seq:5 heads:2 d_head:4", mesh, seed=0)
    >>> out = tm.nn.rope.rope(q)
    >>> cos, sin = tm.nn.rope.rope_angles(5, 4)
    >>> t = q.full().transpose(1, 2)  # transformers' (batch, heads, seq, d_head)
    >>> ref = t * cos + tm.nn.rope.rotate_half(t) * sin
    >>> torch.allclose(out.full(), ref.transpose(1, 2), atol=1e-6)
    True
    """
    for name in (seq, head_dim):
        if name not in x.dims:
            raise DimError(f"rope: x needs dims {seq!r} and {head_dim!r}; its dims are {x.dims}.")
    mesh = x.mesh
    table = (mesh, x.sizes[seq], x.sizes[head_dim], float(theta), offset, (seq, head_dim))
    if compiling():  # made in the program (a cache of MeshTensors is not traced; the compiler folds them)
        cos, sin = _make_tables(*table)
    else:
        cos, sin = _tables(*table, str(mesh.rules))
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    i = x.dims.index(head_dim)
    layout = x.tensor_layout
    even = traced.is_even_traced(layout, mesh.shape) if compiling() else is_even(layout, mesh.shape)
    if not layout.is_split(head_dim, mesh.impl.slice_mesh) and even:

        def rotate(t: torch.Tensor) -> torch.Tensor:
            return rotate_half(t.movedim(i, -1)).movedim(-1, i)

        rotated = local_map(rotate, x, out_dims=" ".join(x.dims))
    else:
        d = x.sizes[head_dim]
        rotated = concat([-tm_slice(x, head_dim, d // 2, d), tm_slice(x, head_dim, 0, d // 2)], head_dim)
    return x * cos + rotated * sin
