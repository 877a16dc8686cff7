"""Manual-sharding regions on xla: each device's block of a global tensor as a local tensor.

On xla a MeshTensor's local tensor is the global one, and the XLA partitioner cuts it. A
per-device function (`tm.local_map`) must instead see each device's block: torch-xla's
manual sharding gives exactly that (inside the region every op runs per device on its
block, as under JAX's shard_map). `to_blocks` enters the region, `from_blocks` leaves it;
both are autograd functions, each the other's conjugate (torch-xla's own calls are not
differentiable).

XLA pads the blocks of an uneven split to equal sizes (the larger blocks first, then the
remainder, then empty ones), which are not torchmesh's balanced blocks: callers refuse
uneven splits here (`even_or_refuse`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from torchmesh.errors import BackendError
from torchmesh.placement.layout import TensorLayout
from torchmesh.placement.mesh_shape import MeshShape, parts

PartitionSpec = tuple


def to_blocks(impl, t: torch.Tensor, spec: PartitionSpec) -> torch.Tensor:
    """This device's block of the global tensor `t` split by `spec`, in a manual region
    (differentiable: the gradient leaves the region as the global gradient).

    >>> import torch, torchmesh as tm
    >>> from torchmesh.xla.manual import from_blocks, to_blocks
    >>> mesh = tm.Mesh("dp:4", backend="xla")
    >>> block = to_blocks(mesh.impl, torch.arange(8.0).to(mesh.impl.default_device), ("dp",))
    >>> tuple(block.shape)
    (2,)
    >>> from_blocks(mesh.impl, block * 10, ("dp",), (8,)).cpu()
    tensor([ 0., 10., 20., 30., 40., 50., 60., 70.])
    """
    return _ToBlocks.apply(t, impl, spec)


def from_blocks(impl, t: torch.Tensor, spec: PartitionSpec, shape: tuple[int, ...]) -> torch.Tensor:
    """The global tensor of `shape` whose blocks (split by `spec`) are each device's `t` in a
    manual region (differentiable: each device's gradient is its block of the global one)."""
    return _FromBlocks.apply(t, impl, spec, tuple(shape))


def _full_to_shard(impl, t: torch.Tensor, spec: PartitionSpec) -> torch.Tensor:
    import torch_xla
    import torch_xla.distributed.spmd as xs

    u = t.clone()  # the annotation is this region's, not the tensor's (which may be laid out otherwise)
    xs.mark_sharding(u, impl.xla_mesh, spec)
    return torch_xla._XLAC._spmd_full_to_shard_shape(u)


def _shard_to_full(impl, t: torch.Tensor, spec: PartitionSpec, shape: tuple[int, ...]) -> torch.Tensor:
    import torch_xla.distributed.spmd as xs

    return xs.disable_manual_sharding(t, spec, torch.Size(shape), mesh=impl.xla_mesh).global_tensor


class _ToBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, impl, spec):
        ctx.impl, ctx.spec, ctx.shape = impl, spec, tuple(t.shape)
        return _full_to_shard(impl, t, spec)

    @staticmethod
    def backward(ctx, grad):
        return _shard_to_full(ctx.impl, grad, ctx.spec, ctx.shape), None, None


class _FromBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, impl, spec, shape):
        ctx.impl, ctx.spec = impl, spec
        return _shard_to_full(impl, t, spec, shape)

    @staticmethod
    def backward(ctx, grad):
        return _full_to_shard(ctx.impl, grad, ctx.spec), None, None, None


def even_or_refuse(layouts: Iterable[TensorLayout], mesh: MeshShape, what: str) -> None:
    """Raise BackendError unless every split dim of `layouts` divides evenly over its axes."""
    for layout in layouts:
        for d, axes in zip(layout.dims, layout.axes):
            k = parts(mesh, axes)
            if axes and d.size % k:
                raise BackendError(
                    f"{what} on xla: dim {d.name!r} of size {d.size} of the tensor {layout} is split "
                    f"over {','.join(axes)} ({k} blocks) unevenly. XLA pads uneven blocks to equal sizes, "
                    f"so the function would see padded blocks, not torchmesh's. Fix: make {d.name!r} a "
                    f"multiple of {k} (tm.pad), replicate it for this call (mesh.rules_scope), or run on "
                    f"the sim or dist backend."
                )
