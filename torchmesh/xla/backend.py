"""torch-xla SPMD backend. Each local tensor is the global XLA tensor (`slice_mesh` has
every axis of size 1, so the shared op definitions run on global values and every
collective short-circuits); each result's layout becomes a sharding annotation and XLA's
SPMD partitioner inserts the collectives.

The mesh is a `torch_xla.distributed.spmd.Mesh` over the runtime's devices in row-major
order (device id = the device's index on the torchmesh mesh), with the same axis names;
a layout becomes the partition spec that names, for each dim, the axes splitting it.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from torchmesh.comm.backend import Data, MeshImpl
from torchmesh.errors import BackendError, MeshError
from torchmesh.placement.layout import TensorLayout
from torchmesh.placement.mesh_shape import MeshShape, parts
from torchmesh.xla.shards import device_blocks, tile_slices


def _require_torch_xla():
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        raise BackendError(
            "backend='xla' needs torch-xla, which is not installed. Install the extra: "
            "pip install 'torchmesh[xla]' (torch-xla must match your torch version exactly)."
        ) from None


_started: list[bool] = []


def start_runtime() -> None:
    """Put torch-xla in SPMD mode and give autograd its XLA device, once per process.

    Both must happen before the process's first XLA tensor and first backward pass: autograd
    sizes its per-device queues at its first backward, and a CPU backward run before then
    leaves no queue for the XLA device (an internal assert in every later XLA backward).
    The first `tm.Mesh(..., backend="xla")` calls it; call it yourself first when the process
    runs other backward passes before making the mesh.

    >>> from torchmesh.xla import start_runtime
    >>> start_runtime()   # (PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 for virtual devices)
    >>> start_runtime()   # once per process: later calls do nothing
    """
    if _started:
        return
    import torch_xla
    import torch_xla.runtime as xr

    if not xr.is_spmd():
        xr.use_spmd()
    w = torch.zeros(1, device=torch_xla.device(), requires_grad=True)
    try:
        (w * 2).sum().backward()
    except RuntimeError:
        raise BackendError(
            "the xla backend started after this process had already run a backward pass on another "
            "device, so autograd has no queue for the XLA device. Fix: create the xla Mesh (or call "
            "torchmesh.xla.start_runtime()) before the first .backward() of the process."
        ) from None
    _started.append(True)


PartitionSpec = tuple  # for each dim: None (replicated), an axis name, or a tuple of axis names


@lru_cache(maxsize=4096)
def partition_spec(axes: tuple[tuple[str, ...], ...]) -> PartitionSpec:
    """The torch-xla partition spec of a layout's axes: `(("dp",), (), ("dp", "tp"))` is
    `("dp", None, ("dp", "tp"))` (several axes for one dim: major to minor).

    >>> from torchmesh.xla import partition_spec
    >>> partition_spec((("dp",), (), ("dp", "tp")))
    ('dp', None, ('dp', 'tp'))
    """
    return tuple(None if not a else a[0] if len(a) == 1 else a for a in axes)


@lru_cache(maxsize=4096)
def placed_axes(layout: TensorLayout, mesh: MeshShape) -> tuple[tuple[str, ...], ...]:
    """The axes each dim is sharded over on XLA devices: the layout's, except for a dim that
    its axes do not divide, which is kept whole (replicated over them). torch-xla 2.9's SPMD
    partitioner aborts the process on some uneven shardings (the backward of a gather or sort
    over an uneven split) and materialises computed uneven results replicated anyway; values
    never depend on it, only memory does.

    >>> import torchmesh as tm
    >>> from torchmesh.xla import placed_axes
    >>> layout = tm.TensorLayout((tm.Dim("batch", 8), tm.Dim("vocab", 65)), (("dp",), ("tp",)))
    >>> placed_axes(layout, tm.MeshShape.parse("dp:2;tp:2"))
    (('dp',), ())
    """
    return tuple(axes if d.size % parts(mesh, axes) == 0 else () for d, axes in zip(layout.dims, layout.axes))


class XlaImpl(MeshImpl):
    """One controller holds each tensor as one global XLA tensor annotated with its sharding."""

    name = "xla"
    reads_values = False
    can_regather = False  # XLA tensors have no storages (and XLA plans memory itself)
    defers_grad_sync = False  # the compiler schedules (and may overlap) the collectives

    def __init__(self, shape: MeshShape, rules: str = "") -> None:
        _require_torch_xla()
        import numpy as np
        import torch_xla
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        start_runtime()
        n = xr.global_runtime_device_count()
        if n != shape.size:
            raise MeshError(
                f"mesh {shape} has {shape.size} devices but the XLA runtime has {n} "
                f"({xr.device_type()}). Fix: use a mesh whose axis sizes multiply to {n}, or, on CPU, "
                f"set CPU_NUM_DEVICES={shape.size} (with PJRT_DEVICE=CPU) before torch_xla is imported."
            )
        super().__init__(shape, MeshShape(tuple((name, 1) for name in shape.names)), rules)
        self.default_device = torch_xla.device()
        self.xla_mesh = xs.Mesh(np.arange(n), shape.sizes, shape.names)
        self._spec_text: dict[PartitionSpec, str] = {}

    @property
    def local_coords(self) -> tuple[tuple[int, ...], ...]:
        return ((0,) * len(self.shape.names),)

    def sync(self) -> None:
        import torch_xla

        torch_xla.sync()

    # ---- global values ---------------------------------------------------------------------
    def from_global(self, tensor: torch.Tensor, layout: TensorLayout) -> Data:
        """The tensor on the XLA device; a tensor on the autograd tape stays on it (its
        gradient flows back to the source, as on the other backends)."""
        if not tensor.requires_grad:
            tensor = tensor.detach()
        return (tensor.to(self.default_device),)

    def global_value(self, data: Data) -> torch.Tensor:
        """The value on the CPU, after running everything pending as one program (reading
        several results, say every gradient, then compiles once instead of once each)."""
        import torch_xla

        torch_xla.sync()
        return data[0].to("cpu")

    # ---- sharding annotation -----------------------------------------------------------------
    annotates = True

    def annotate(self, ts: Data, layout: TensorLayout) -> Data:
        """Mark the sharding `layout` implies on the (single) global tensor (its dims that their
        axes do not divide kept whole: see `placed_axes`)."""
        return (self.with_sharding(ts[0], partition_spec(placed_axes(layout, self.shape))),)

    def with_sharding(self, t: torch.Tensor, spec: PartitionSpec) -> torch.Tensor:
        """`t` annotated with `spec`: in place when `t` carries no sharding yet and no
        gradient flows through it (fresh data, or an op's result outside autograd); else a
        new tensor (an annotated copy, whose gradient is annotated with `spec` as well), so a
        tensor already laid out another way (a relayout that moves no data here) keeps its own."""
        import torch_xla
        import torch_xla.distributed.spmd as xs

        current = torch_xla._XLAC._get_xla_sharding_spec(t)
        if current and current == self._spec_text.get(spec):
            return t
        if not current and (t.grad_fn is None or not t.requires_grad):
            xs.mark_sharding(t, self.xla_mesh, spec)
            self._spec_text.setdefault(spec, torch_xla._XLAC._get_xla_sharding_spec(t))
            return t
        if t.requires_grad:
            return _Annotate.apply(t, self, spec)
        return self._annotated_copy(t, spec)

    def _annotated_copy(self, t: torch.Tensor, spec: PartitionSpec) -> torch.Tensor:
        import torch_xla
        import torch_xla.distributed.spmd as xs

        out = t.clone()
        xs.annotate_custom_sharding(out, self.xla_mesh, spec)
        self._spec_text.setdefault(spec, torch_xla._XLAC._get_xla_sharding_spec(out))
        return out

    # ---- what each device holds ------------------------------------------------------------------
    def block_slices(self, layout: TensorLayout, coords: tuple[int, ...]) -> tuple[slice, ...]:
        """Where XLA puts a device's block: the layout's blocks for the dims that divide evenly,
        the whole dim for the others (`placed_axes`)."""
        return tile_slices(TensorLayout(layout.dims, placed_axes(layout, self.shape)), self.shape, coords)

    def device_shards(self, data: Data) -> tuple[MeshShape, list[tuple[tuple[int, ...], torch.Tensor]]]:
        """Each device's block as torch-xla holds it (runs the pending computation): the real
        mesh, and (mesh coordinates, CPU tensor) in device order."""
        return self.shape, [(self.shape.coords(b.device), b.value) for b in device_blocks(data[0])]


class _Annotate(torch.autograd.Function):
    """An annotated copy whose gradient is annotated the same way (guides the partitioner in
    backward, as torch-xla's mark_sharding_with_gradients does)."""

    @staticmethod
    def forward(ctx, t, impl, spec):
        ctx.impl, ctx.spec = impl, spec
        return impl._annotated_copy(t, spec)

    @staticmethod
    def backward(ctx, grad):
        return ctx.impl._annotated_copy(grad, ctx.spec), None, None
