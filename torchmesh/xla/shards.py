"""What each XLA device holds of a global tensor, read from torch-xla's sharding (not from
the layout), so that printing and tests show where the data really is."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchmesh.placement.layout import TensorLayout
from torchmesh.placement.mesh_shape import MeshShape, block_index, parts


@dataclass(frozen=True, slots=True)
class DeviceBlock:
    """One device's block of a global XLA tensor: the device index (row-major on the
    torchmesh mesh), its global index ranges (one slice per dim), and a CPU copy.

    >>> import torch, torchmesh as tm
    >>> from torchmesh.xla import device_blocks
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp", backend="xla")
    >>> x = tm.distribute(torch.arange(8.0).reshape(2, 4), "batch ff", mesh)
    >>> device_blocks(x.local)[1]
    DeviceBlock(device=1, index=(slice(0, 1, None), slice(2, 4, None)), value=tensor([[2., 3.]]))
    """

    device: int
    index: tuple[slice, ...]
    value: torch.Tensor


def sharding_text(t: torch.Tensor) -> str:
    """torch-xla's sharding of `t`, e.g. '{devices=[2,1,2]0,2,1,3 last_tile_dim_replicate}'
    ('' when it has none yet).

    >>> import torch, torchmesh as tm
    >>> from torchmesh.xla import sharding_text
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp", backend="xla")
    >>> sharding_text(tm.distribute(torch.zeros(2, 4), "batch ff", mesh).local)
    '{devices=[2,2]0,1,2,3}'
    """
    import torch_xla

    return torch_xla._XLAC._get_xla_sharding_spec(t)


def device_blocks(t: torch.Tensor) -> list[DeviceBlock]:
    """Every device's block of `t`, in device order (runs `t`'s pending computation).

    >>> import torch, torchmesh as tm
    >>> from torchmesh.xla import device_blocks
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp", backend="xla")
    >>> x = tm.distribute(torch.arange(8.0).reshape(2, 4), "batch ff", mesh)
    >>> [(b.device, b.value.tolist()) for b in device_blocks(x.local)]
    [(0, [[0.0, 1.0]]), (1, [[2.0, 3.0]]), (2, [[4.0, 5.0]]), (3, [[6.0, 7.0]])]
    """
    import torch_xla

    t = t.detach()
    torch_xla._XLAC._xla_sync_multi([t], [], True)
    shards = torch_xla._XLAC._get_local_shards([t])[0]
    where = torch_xla._XLAC._get_local_shard_replica_and_indices([t])[0]
    out = []
    for (data, device), (_, indices) in zip(shards, where):
        index = (
            tuple(slice(0, n) for n in t.shape)
            if indices is Ellipsis
            else tuple(slice(s.start, s.stop) for s in indices)
        )
        sizes = tuple(s.stop - s.start for s in index)
        value = data[tuple(slice(0, n) for n in sizes)] if tuple(data.shape) != sizes else data
        out.append(DeviceBlock(int(str(device).rsplit(":", 1)[-1]), index, value.cpu()))
    return sorted(out, key=lambda b: b.device)


def tile_slices(layout: TensorLayout, mesh: MeshShape, coords: tuple[int, ...]) -> tuple[slice, ...]:
    """The global index ranges XLA's SPMD partitioner gives the device at `coords`: each split
    dim in tiles of ceil(size / blocks), by the device's block index over the dim's axes.

    >>> import torchmesh as tm
    >>> from torchmesh.xla import tile_slices
    >>> mesh = tm.MeshShape.parse("tp:4")
    >>> layout = tm.TensorLayout((tm.Dim("vocab", 5),), (("tp",),))
    >>> [tile_slices(layout, mesh, (i,))[0] for i in range(4)]
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None), slice(5, 5, None)]
    """
    out = []
    for d, axes in zip(layout.dims, layout.axes):
        tile = -(-d.size // parts(mesh, axes))
        i = block_index(mesh, axes, coords)
        out.append(slice(min(i * tile, d.size), min((i + 1) * tile, d.size)))
    return tuple(out)
