"""Layout-invariant initialisation: every parameter draws from its own seed.

A model is built from one integer *model seed*. Each parameter's seed is derived from the
model seed and the parameter's qualified name (`"blocks.0.attn.wq"`) by a fixed hash, and
its values come from `tm.randn(..., seed=that)`, which gives the same values on any mesh
and layout. So the same model seed gives the same global weights on every mesh and backend,
whatever the order modules are built in, and adding a layer does not change the others.

A layer built without a seed (`seed=None`, the default) draws its model seed from torch's
default generator (`layer_seed`), as torch.nn layers draw their weights: `torch.manual_seed(s)`
makes the initialisation reproducible, and two layers built in a row differ. Under torchrun
every rank must draw the same seed, so every rank calls `torch.manual_seed` with the same
value; a mesh spanning several processes checks that they agree (one small all-reduce).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch

from torchmesh import errors
from torchmesh.errors import CollectiveMismatch
from torchmesh.placement.dims import DimsLike
from torchmesh.tensor.construct import ones, zeros
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.random import mix_seed, randn

if TYPE_CHECKING:
    from torchmesh.tensor.mesh import Mesh


def derive_seed(seed: int, name: str) -> int:
    """The seed of the part `name` of something seeded with `seed` (a stable hash, the same
    in every process and Python run: no `hash()`, which is salted per process)."""
    return mix_seed(int(seed), zlib.crc32(name.encode()))


def layer_seed(seed: int | None, mesh: Mesh, what: str) -> int:
    """`seed`, or (None) a seed drawn from torch's default generator, the same on every rank
    that seeded torch alike (checked where the mesh spans several processes).

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="ff:tp")
    >>> torch.manual_seed(0); a = tm.nn.init.layer_seed(None, mesh, "Linear")
    >>> torch.manual_seed(0); b = tm.nn.init.layer_seed(None, mesh, "Linear")
    >>> a == b, tm.nn.init.layer_seed(7, mesh, "Linear")
    (True, 7)
    """
    if seed is not None:
        return int(seed)
    drawn = int(torch.randint(0, 2**62, ()))
    _check_ranks_agree(drawn, mesh, what)
    return drawn


def _check_ranks_agree(seed: int, mesh: Mesh, what: str) -> None:
    """Raise on every rank if the processes of `mesh` drew different seeds (an all-reduce of
    (seed, -seed) by max gives the largest and the smallest). Nothing to check where this
    process holds every device (sim, xla) or where values are not computed (abstract): only
    where there are several processes."""
    impl = mesh.impl
    axes = impl.slice_mesh.live_axes()
    if not impl.multi_process or not axes:
        return
    pair = torch.tensor([seed, -seed], dtype=torch.int64)
    data = impl.make(lambda coords: pair.to(impl.default_device))
    agreed = impl.all_reduce(data, axes, "max")[0]
    high, neg_low = agreed.tolist()
    if high != -neg_low:
        raise CollectiveMismatch(errors.seeds_disagree(what, -neg_low, high))


def normal(dims: DimsLike, mesh: Mesh, seed: int, std: float, dtype: torch.dtype | None = None) -> MeshTensor:
    """A trainable tensor of normal values with standard deviation `std`, identical on any mesh."""
    return (randn(dims, mesh, seed=seed, dtype=dtype) * std).detach().requires_grad_()


def zeros_param(dims: DimsLike, mesh: Mesh, dtype: torch.dtype | None = None) -> MeshTensor:
    """A trainable tensor of zeros (biases)."""
    return zeros(dims, mesh, dtype=dtype, requires_grad=True)


def ones_param(dims: DimsLike, mesh: Mesh, dtype: torch.dtype | None = None) -> MeshTensor:
    """A trainable tensor of ones (norm scales)."""
    return ones(dims, mesh, dtype=dtype, requires_grad=True)
