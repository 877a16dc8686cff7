"""Layout-invariant initialisation: every parameter draws from its own seed.

A model is built from one integer *model seed*. Each parameter's seed is derived from the
model seed and the parameter's qualified name (`"blocks.0.attn.wq"`) by a fixed hash, and
its values come from `tm.randn(..., seed=that)`, which gives the same values on any mesh
and layout. So the same model seed gives the same global weights on every mesh and backend,
whatever the order modules are built in, and adding a layer does not change the others.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch

from torchmesh.tensor.construct import ones, zeros
from torchmesh.tensor.dims import DimsLike
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.random import _mix, randn

if TYPE_CHECKING:
    from torchmesh.mesh import Mesh


def derive_seed(seed: int, name: str) -> int:
    """The seed of the part `name` of something seeded with `seed` (a stable hash, the same
    in every process and Python run: no `hash()`, which is salted per process)."""
    return _mix(int(seed), zlib.crc32(name.encode()))


def normal(dims: DimsLike, mesh: "Mesh", seed: int, std: float, dtype: torch.dtype | None = None) -> MeshTensor:
    """A trainable tensor of normal values with standard deviation `std`, identical on any mesh."""
    return (randn(dims, mesh, seed=seed, dtype=dtype) * std).detach().requires_grad_()


def zeros_param(dims: DimsLike, mesh: "Mesh", dtype: torch.dtype | None = None) -> MeshTensor:
    """A trainable tensor of zeros (biases)."""
    return zeros(dims, mesh, dtype=dtype, requires_grad=True)


def ones_param(dims: DimsLike, mesh: "Mesh", dtype: torch.dtype | None = None) -> MeshTensor:
    """A trainable tensor of ones (norm scales)."""
    return ones(dims, mesh, dtype=dtype, requires_grad=True)
