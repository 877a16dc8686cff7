"""The `sim` backend: one process holds every device's shard and computes each collective
exactly as the real one would, in group order. For notebooks, debuggers and tests. Uneven
blocks need nothing special here: pieces are concatenated and split (`tensor_split`) as
they are."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property, reduce

import torch

from torchmesh.comm import traced
from torchmesh.comm.backend import Data, MeshImpl, Sizes, compiling
from torchmesh.placement.layout import TensorLayout, local_slices
from torchmesh.placement.mesh_shape import axis_groups

_REDUCE: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sum": torch.add,
    "max": torch.maximum,
    "min": torch.minimum,
}


class SimImpl(MeshImpl):
    """Every device of the mesh lives in this process; Data holds one tensor per device."""

    name = "sim"
    holds_every_shard = True
    #: It keeps a tensor per device and computes every collective in one process, so a larger
    #: mesh would run for hours; plan with backend="abstract" instead.
    max_devices = 4096

    @cached_property
    def local_coords(self) -> tuple[tuple[int, ...], ...]:
        return tuple(self.shape.coords(d) for d in range(self.shape.size))

    def _groups(self, axes: tuple[str, ...]):
        if compiling():
            return traced.axis_groups_traced(self.shape, axes)
        return axis_groups(self.shape, axes)

    # ---- global values: exact gradients through the one process's replicas --------------------
    def from_global(self, tensor: torch.Tensor, layout: TensorLayout) -> Data:
        """Each device's block; a gradient flows back to `tensor` from one replica of each
        block (a replica's gradient is the whole gradient: comm/autograd.py's invariant), not
        once per replica."""
        if not (tensor.requires_grad and torch.is_grad_enabled()):
            return super().from_global(tensor, layout)
        return _FromGlobal.apply(self, layout, tensor)

    def global_value(self, data: Data) -> torch.Tensor:
        """Device 0's tensor; its gradient reaches every replica (each holds the whole value)."""
        if len(data) > 1 and any(t.requires_grad for t in data) and torch.is_grad_enabled():
            return _Replicated.apply(*data)
        return data[0]

    def all_reduce(self, ts: Data, axes: tuple[str, ...], op: str) -> Data:
        out: list = [None] * len(ts)
        fn = _REDUCE[op]
        for g in self._groups(axes):
            total = reduce(fn, (ts[i] for i in g))
            for i in g:
                out[i] = total.clone()
        return tuple(out)

    def all_gather(self, ts: Data, axis: str, dim: int, sizes: Sizes = None) -> Data:
        out: list = [None] * len(ts)
        for g in self._groups((axis,)):
            whole = torch.cat([ts[i] for i in g], dim)
            for i in g:
                out[i] = whole.clone()
        return tuple(out)

    def reduce_scatter(self, ts: Data, axis: str, dim: int) -> Data:
        out: list = [None] * len(ts)
        for g in self._groups((axis,)):
            pieces = reduce(torch.add, (ts[i] for i in g)).tensor_split(len(g), dim)
            for i, p in zip(g, pieces):
                out[i] = p.contiguous().clone()
        return tuple(out)

    def all_to_all(self, ts: Data, axis: str, gather_dim: int, split_dim: int, sizes: Sizes = None) -> Data:
        out: list = [None] * len(ts)
        for g in self._groups((axis,)):
            pieces = [ts[i].tensor_split(len(g), split_dim) for i in g]
            for r, i in enumerate(g):
                out[i] = torch.cat([p[r] for p in pieces], gather_dim).contiguous()
        return tuple(out)

    def shift(self, ts: Data, axes: tuple[str, ...], offset: int, wrap: bool) -> Data:
        out: list = [None] * len(ts)
        for g in self._groups(axes):
            k = len(g)
            for r, i in enumerate(g):
                src = r - offset
                if wrap:
                    out[i] = ts[g[src % k]].clone()
                elif 0 <= src < k:
                    out[i] = ts[g[src]].clone()
                else:
                    out[i] = torch.zeros_like(ts[i])
        return tuple(out)


class _FromGlobal(torch.autograd.Function):
    """Every device's block of a global tensor; backward assembles the global gradient from
    the canonical replica of each block (coordinate 0 on every axis the layout leaves unused)."""

    @staticmethod
    def forward(ctx, impl: SimImpl, layout: TensorLayout, tensor: torch.Tensor):
        used = set(layout.used_axes)
        unused = [i for i, n in enumerate(impl.slice_mesh.names) if n not in used]
        slices = [local_slices(layout, impl.slice_mesh, c) for c in impl.local_coords]
        ctx.canonical = [s if all(c[i] == 0 for i in unused) else None for s, c in zip(slices, impl.local_coords)]
        ctx.like = (tensor.shape, tensor.dtype, tensor.device)
        return tuple(tensor[s].clone() for s in slices)

    @staticmethod
    def backward(ctx, *grads):
        shape, dtype, device = ctx.like
        out = torch.zeros(shape, dtype=dtype, device=device)
        for s, g in zip(ctx.canonical, grads):
            if s is not None and g is not None:
                out[s] = g
        return None, None, out


class _Replicated(torch.autograd.Function):
    """Device 0's tensor of replicated data; backward gives every replica the gradient."""

    @staticmethod
    def forward(ctx, *ts):
        ctx.n = len(ts)
        return ts[0].view_as(ts[0])

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(grad.clone() for _ in range(ctx.n - 1)))
