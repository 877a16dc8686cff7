"""The layout of one tensor: for each of its dims, the mesh axes it is split over.

`TensorLayout` is the per-tensor value every op plans with; `resolve` derives it from the
global rules and checks its validity (docs/design.md, "Model"), raising before any communication.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from torchmesh import errors
from torchmesh.errors import LayoutError
from torchmesh.placement.dims import Dim
from torchmesh.placement.mesh_shape import (  # noqa: F401  (re-exported)
    MeshShape,
    block_bounds,
    block_index,
    max_block,
    parts,
)
from torchmesh.placement.rules import LayoutRules


@dataclass(frozen=True, slots=True)
class TensorLayout:
    """Dims of a tensor (in storage order) and, aligned with them, the axes splitting each.

    Every MeshTensor has one (`x.tensor_layout`); `str()` writes each dim as
    `name:size@axes`.

    >>> import torchmesh as tm
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp")
    >>> layout = tm.zeros("batch:8 ff:6 d:4", mesh).tensor_layout
    >>> print(layout)
    [batch:8@dp ff:6@tp d:4]
    >>> layout.axes_of("ff"), layout.split_dims()
    (('tp',), {'batch': 'dp', 'ff': 'tp'})
    """

    dims: tuple[Dim, ...]
    axes: tuple[tuple[str, ...], ...]
    # Derived once: layouts are hashed and read on every op of the eager hot path.
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(d.name for d in self.dims))
        object.__setattr__(self, "_hash", hash((self.dims, self.axes)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self):  # rebuilt on unpickling: a string's hash differs between processes
        return (TensorLayout, (self.dims, self.axes))

    @property
    def sizes(self) -> dict[str, int]:
        return {d.name: d.size for d in self.dims}

    def axes_of(self, name: str) -> tuple[str, ...]:
        return self.axes[self.names.index(name)]

    def is_split(self, name: str, mesh: MeshShape) -> bool:
        """Whether dim `name` is cut into blocks on `mesh`: split over an axis of size above 1
        there (pass the backend's `slice_mesh` to ask whether local tensors hold part of it)."""
        return bool(mesh.live_axes(self.axes_of(name)))

    @property
    def used_axes(self) -> frozenset[str]:
        return frozenset(a for ax in self.axes for a in ax)

    def split_dims(self) -> dict[str, str | tuple[str, ...]]:
        """{dim: axis} for split dims (a tuple of axes where a dim is split over several)."""
        return {d.name: (ax[0] if len(ax) == 1 else ax) for d, ax in zip(self.dims, self.axes) if ax}

    def __str__(self) -> str:
        parts = [f"{d.name}:{d.size}" + (f"@{','.join(a)}" if a else "") for d, a in zip(self.dims, self.axes)]
        return "[" + " ".join(parts) + "]"


def local_shape(layout: TensorLayout, mesh: MeshShape, coords: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The shape of the block the device at `coords` holds; without coords, the largest
    block (device 0's: blocks of an uneven split differ by at most one, larger first)."""
    if coords is None:
        return tuple(max_block(d.size, mesh, ax) for d, ax in zip(layout.dims, layout.axes))
    return tuple(s.stop - s.start for s in local_slices(layout, mesh, coords))


def local_slices(layout: TensorLayout, mesh: MeshShape, coords: tuple[int, ...]) -> tuple[slice, ...]:
    """The global index ranges of the block a device (by mesh coords) holds (see
    `block_bounds` for how uneven sizes are split)."""
    return tuple(slice(*block_bounds(d.size, mesh, ax, coords)) for d, ax in zip(layout.dims, layout.axes))


def is_even(layout: TensorLayout, mesh: MeshShape) -> bool:
    """Whether every split dim of `layout` divides evenly (every device holds the same shape)."""
    return all(d.size % parts(mesh, ax) == 0 for d, ax in zip(layout.dims, layout.axes) if ax)


@lru_cache(maxsize=2048)
def resolve(dims: tuple[Dim, ...], rules: LayoutRules, mesh: MeshShape) -> TensorLayout:
    """The layout the rules give a tensor with these dims; raises LayoutError if invalid."""
    return check(TensorLayout(dims, tuple(rules.axes_of(d.name) for d in dims)), mesh, str(rules))


def check(layout: TensorLayout, mesh: MeshShape, rules_text: str) -> TensorLayout:
    """Check the conditions of docs/design.md, "Model"; returns the layout unchanged when valid. Sizes
    need not divide: an uneven dim is split into blocks differing by at most one."""
    owner: dict[str, str] = {}
    for d, axes in zip(layout.dims, layout.axes):
        for a in axes:
            _check_axis(a, d.name, rules_text, mesh)
            if a in owner:
                raise LayoutError(errors.axis_used_twice(layout.sizes, a, owner[a], d.name, rules_text))
            owner[a] = d.name
    return layout


def check_rules_axes(rules: LayoutRules, mesh: MeshShape) -> None:
    """Every axis the rules name must be an axis of the mesh."""
    for dim, axes in rules.rules:
        for a in axes:
            _check_axis(a, dim, str(rules), mesh)


def _check_axis(axis: str, dim: str, rules_text: str, mesh: MeshShape) -> None:
    if axis not in mesh.names:
        raise LayoutError(errors.unknown_axis(axis, dim, rules_text, mesh.names))
