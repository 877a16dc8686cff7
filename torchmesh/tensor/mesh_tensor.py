"""`MeshTensor`: a global value with named dims, stored as local shards on a mesh.

It holds three things: the mesh, its `TensorLayout` (dims and the axes splitting each), and
the backend's data (a tuple of local tensors). Operators and methods are attached from one
explicit table in `torchmesh/tensor/methods.py`; the op semantics live in the op modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from torchmesh.errors import ArgumentTypeError
from torchmesh.errors import BackendError, DimError
from torchmesh.placement.layout import TensorLayout
from torchmesh.tensor.dims import Dim

if TYPE_CHECKING:
    from torchmesh.mesh import Mesh

Data = tuple[torch.Tensor, ...]


class MeshTensor:
    """A tensor with named dims laid out on a device mesh by the mesh's layout rules.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", layout="ff:tp")
    >>> x = tm.distribute(torch.arange(8.0).reshape(2, 4), "batch ff", mesh)
    >>> x.dims, x.sizes, x.layout
    (('batch', 'ff'), {'batch': 2, 'ff': 4}, {'ff': 'tp'})
    """

    __slots__ = ("_data", "_layout", "_mesh", "__weakref__")

    def __init__(self, data: Data, layout: TensorLayout, mesh: "Mesh") -> None:
        self._data = mesh.impl.annotate(data, layout)
        self._layout = layout
        self._mesh = mesh

    # ---- what it is ---------------------------------------------------------------------------
    @property
    def dims(self) -> tuple[str, ...]:
        """Dim names in storage order."""
        return self._layout.names

    @property
    def shape(self) -> tuple[Dim, ...]:
        """The dims as `Dim(name, size)` values (Mesh TF's Shape)."""
        return self._layout.dims

    @property
    def sizes(self) -> dict[str, int]:
        """Global sizes by name, in storage order."""
        return self._layout.sizes

    @property
    def layout(self) -> dict[str, Any]:
        """{dim: axis} for the split dims (a tuple of axes where a dim is split over several)."""
        return self._layout.split_dims()

    @property
    def tensor_layout(self) -> TensorLayout:
        return self._layout

    @property
    def mesh(self) -> "Mesh":
        return self._mesh

    @property
    def ndim(self) -> int:
        return len(self._layout.dims)

    def size(self, dim: str) -> int:
        """Global size of a dim (by name: `x.size("ff")`)."""
        if isinstance(dim, int) and not isinstance(dim, bool):
            raise ArgumentTypeError(
                f"x.size({dim}): dims are named, not numbered; this tensor's dims are {self.dims}. "
                f"Fix: name the dim, x.size({self.dims[dim] if -self.ndim <= dim < self.ndim else 'ff'!r}), "
                f"or read them all from x.sizes."
            )
        if dim not in self.sizes:
            raise DimError(f"{dim!r} is not a dim of this tensor; its dims are {self.dims}.")
        return self.sizes[dim]

    def numel(self) -> int:
        n = 1
        for d in self._layout.dims:
            n *= d.size
        return n

    @property
    def dtype(self) -> torch.dtype:
        return self._data[0].dtype

    @property
    def device(self) -> torch.device:
        return self._data[0].device

    # ---- local views ----------------------------------------------------------------------
    @property
    def local(self) -> torch.Tensor:
        """This process's shard (dist), or the global XLA tensor (xla). On sim use `.shards`."""
        if len(self._data) != 1:
            raise BackendError(
                f"x.local is this process's shard, but on the sim backend this process holds all "
                f"{len(self._data)} devices' shards: use x.shards (a list in device order) or "
                f"x.shard(dp=0, tp=1)."
            )
        return self._data[0]

    @property
    def shards(self) -> list[torch.Tensor]:
        """Every local shard this process holds, in device order (all devices on sim)."""
        return list(self._data)

    def shard(self, coords: tuple[int, ...] | None = None, **axis_coords: int) -> torch.Tensor:
        """The shard of the device at these mesh coordinates: x.shard((0, 1)) or x.shard(dp=0, tp=1)
        (on xla, a CPU copy of the block that device holds)."""
        impl = self._mesh.impl
        names = self._mesh.axis_names
        if coords is None:
            unknown = set(axis_coords) - set(names)
            if unknown:
                raise DimError(f"x.shard: {sorted(unknown)} are not axes of the mesh {names}.")
            coords = tuple(axis_coords.get(n, 0) for n in names)
        coords = tuple(coords)
        for c, data in impl.device_shards(self._data)[1]:  # on xla: that device's block, read back
            if c == coords:
                return data
        raise BackendError(f"the shard at mesh coordinates {coords} is not held by this process.")

    def full(self) -> torch.Tensor:
        """The global value as one torch.Tensor (a collective on dist: call it on every rank)."""
        from torchmesh.tensor.construct import to_global

        return to_global(self)

    # ---- autograd -------------------------------------------------------------------------
    @property
    def requires_grad(self) -> bool:
        return any(t.requires_grad for t in self._data)

    def requires_grad_(self, flag: bool = True) -> "MeshTensor":
        for t in self._data:
            t.requires_grad_(flag)
        return self

    @property
    def grad(self) -> "MeshTensor | None":
        """The gradient, laid out like this tensor (None before backward)."""
        grads = [t.grad for t in self._data]
        if all(g is None for g in grads):
            return None
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(self._data, grads)]
        return MeshTensor(tuple(grads), self._layout, self._mesh)

    @grad.setter
    def grad(self, value: "MeshTensor | None") -> None:
        for i, t in enumerate(self._data):
            t.grad = None if value is None else value._data[i]

    def backward(self, gradient: "MeshTensor | None" = None, retain_graph: bool | None = None) -> None:
        """Backpropagate from this tensor; a 0-d tensor needs no `gradient`."""
        if gradient is None:
            if self.ndim:
                raise DimError(
                    f"backward() of a tensor with dims {self.dims} needs a gradient: reduce it first "
                    f"(y.sum().backward()) or pass gradient=<MeshTensor with the same dims>."
                )
            grads = tuple(torch.ones_like(t) for t in self._data)
        else:
            from torchmesh.tensor.relayout import to_layout

            grads = to_layout(gradient, self._layout)._data
        torch.autograd.backward(list(self._data), list(grads), retain_graph=retain_graph)

    def detach(self) -> "MeshTensor":
        return self._map(torch.Tensor.detach)

    # ---- helpers for op code --------------------------------------------------------------
    def _map(self, fn) -> "MeshTensor":
        """A tensor with the same layout and `fn` applied to every shard (layout-preserving ops)."""
        return MeshTensor(self._mesh.impl.slicewise(fn, self._data), self._layout, self._mesh)

    def __repr__(self) -> str:
        from torchmesh.printing import format_tensor

        return format_tensor(self)

    def __bool__(self) -> bool:
        raise ArgumentTypeError(
            "the truth value of a MeshTensor is ambiguous (and would need communication): use "
            "x.any().item() or x.all().item()."
        )

    def item(self) -> float | int | bool:
        """The value of a 0-d tensor, as a Python number."""
        if self.ndim:
            raise DimError(f"item() needs a 0-d tensor; this one has dims {self.dims}.")
        return self._data[0].item()

    def __len__(self) -> int:
        raise ArgumentTypeError("len() of a MeshTensor has no positional meaning: use x.sizes['<dim>'].")

    def __iter__(self):
        raise ArgumentTypeError("a MeshTensor is not iterable by position: use tm.slice(x, dim, start, stop).")

    __hash__ = object.__hash__
