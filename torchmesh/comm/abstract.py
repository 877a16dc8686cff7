"""The `abstract` backend: shapes only, for planning a run before renting the devices.

Like `dist`, this process holds ONE local shard per tensor, that of a representative device
(device 0, which holds the largest block of every uneven split, so memory is an upper bound), but as a
tensor on torch's `meta` device: no data, no memory, no processes. Its collectives return
correctly shaped meta tensors, so every op plans and runs exactly as on a real mesh and
`tm.comm_stats()` records each collective the real run would make, with the same bytes per
device (the bytes depend only on shapes and group sizes). A 100B-parameter model on a
512-device mesh runs a training step this way in seconds.

    mesh = tm.Mesh("dp:64;tp:8", rules="batch:dp;ff:tp", backend="abstract")

Random tensors (`tm.randn`, `tm.dropout`) draw nothing on this backend: their shards are
meta tensors too. Values cannot be read (`x.item()`, `x.full()` give meta tensors).
"""

from __future__ import annotations

import torch

from torchmesh.comm.backend import Data, MeshImpl, Sizes
from torchmesh.placement.layout import TensorLayout, local_shape
from torchmesh.placement.mesh_shape import MeshShape

META = torch.device("meta")


class AbstractImpl(MeshImpl):
    """One representative device of the mesh; Data holds its one shard, on the meta device."""

    name = "abstract"
    reads_values = False
    holds_values = False
    default_device = META

    def __init__(self, shape: MeshShape, rules: str = "") -> None:
        super().__init__(shape, rules=rules)
        self._coords = (tuple(0 for _ in shape.names),)

    @property
    def local_coords(self) -> tuple[tuple[int, ...], ...]:
        return self._coords

    # Each collective: the output shape of the real one, no values.
    def all_reduce(self, ts: Data, axes: tuple[str, ...], op: str) -> Data:
        return (_meta(ts[0]).clone(),)

    def all_gather(self, ts: Data, axis: str, dim: int, sizes: Sizes = None) -> Data:
        whole = sizes[0] if sizes else ts[0].shape[dim] * self.axis_size(axis)
        return (_resized(ts[0], {dim: whole}),)

    def reduce_scatter(self, ts: Data, axis: str, dim: int) -> Data:  # device 0: the largest block
        return (_resized(ts[0], {dim: -(-ts[0].shape[dim] // self.axis_size(axis))}),)

    def all_to_all(self, ts: Data, axis: str, gather_dim: int, split_dim: int, sizes: Sizes = None) -> Data:
        k = self.axis_size(axis)
        t = ts[0]
        whole = sizes[0] if sizes else t.shape[gather_dim] * k
        return (_resized(t, {gather_dim: whole, split_dim: -(-t.shape[split_dim] // k)}),)

    def shift(self, ts: Data, axes: tuple[str, ...], offset: int, wrap: bool) -> Data:
        return (torch.empty_like(_meta(ts[0])),)

    def from_global(self, tensor: torch.Tensor, layout: TensorLayout) -> Data:
        """The representative device's block, as a meta tensor (the values are not kept)."""
        return (torch.empty(local_shape(layout, self.slice_mesh), dtype=tensor.dtype, device=META),)


def _meta(t: torch.Tensor) -> torch.Tensor:
    return t if t.device == META else t.to(META)


def _resized(t: torch.Tensor, sizes: dict[int, int]) -> torch.Tensor:
    shape = [sizes.get(i, s) for i, s in enumerate(t.shape)]
    return torch.empty(shape, dtype=t.dtype, device=META)
