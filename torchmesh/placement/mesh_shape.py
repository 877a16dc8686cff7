"""The abstract mesh: named axes with sizes ("dp:2;tp:4"), no devices, no processes.

Layout math depends only on this value, so it can be tested (and planned over) without a
single process. Devices are laid out row-major: the last axis varies fastest.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from torchmesh.errors import ParseError
from torchmesh.placement.dims import Dim, check_name


@dataclass(frozen=True, slots=True)
class MeshShape:
    """Named mesh axes and their sizes: the abstract mesh, with no devices or processes, so
    that layout arithmetic can be done (and tested) anywhere. Devices are numbered row-major.

    >>> from torchmesh import MeshShape
    >>> mesh = MeshShape.parse("dp:2;tp:4")
    >>> mesh.size, mesh.names, mesh.sizes
    (8, ('dp', 'tp'), (2, 4))
    >>> mesh.coords(5), mesh.device((1, 1))
    ((1, 1), 5)
    """

    axes: tuple[tuple[str, int], ...]
    # Derived once: hashed on every op of the eager hot path (plan caches are keyed by it).
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(self.axes))
        seen = set()
        for name, size in self.axes:
            check_name(name, "mesh axis")
            if name in seen:
                raise ParseError(f"mesh axis {name!r} appears twice in {self}; axis names are unique.")
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ParseError(f"mesh axis {name!r} has size {size!r}; an axis size is an int >= 1.")
            seen.add(name)

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self):  # rebuilt on unpickling: a string's hash differs between processes
        return (MeshShape, (self.axes,))

    @staticmethod
    def parse(spec: MeshShapeLike) -> MeshShape:
        """Read "dp:2;tp:4", a dict {"dp": 2, "tp": 4}, a MeshShape, or a sequence of Dims (Mesh TF's
        mesh `Shape`, e.g. from `mtf.convert_to_shape("b:2,m:2")`)."""
        if isinstance(spec, MeshShape):
            return spec
        if isinstance(spec, dict):
            return MeshShape(tuple((str(k), v) for k, v in spec.items()))
        if isinstance(spec, str):
            return _parse_mesh(spec)
        if isinstance(spec, (tuple, list)) and all(isinstance(d, Dim) for d in spec):
            return MeshShape(tuple((d.name, d.size) for d in spec))  # Mesh TF's mesh Shape
        raise ParseError(f"cannot read a mesh from {spec!r}: write it as 'dp:2;tp:4'.")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.axes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(s for _, s in self.axes)

    @property
    def size(self) -> int:
        """Number of devices."""
        return math.prod(self.sizes)

    def axis_size(self, axis: str) -> int:
        for n, s in self.axes:
            if n == axis:
                return s
        raise ParseError(f"mesh {self} has no axis {axis!r}; its axes are {self.names}.")

    def live_axes(self, axes: Iterable[str] | None = None) -> tuple[str, ...]:
        """The axes among `axes` (default: all of this mesh's), in their order, whose size here is
        above 1: the ones a split over them cuts. A size-1 axis (and, on xla's slicing mesh,
        every axis) leaves a dim whole, so no collective runs over it."""
        return tuple(a for a in (self.names if axes is None else axes) if self.axis_size(a) > 1)

    def coords(self, device: int) -> tuple[int, ...]:
        """Mesh coordinates of a device index (row-major)."""
        out = []
        for size in reversed(self.sizes):
            out.append(device % size)
            device //= size
        return tuple(reversed(out))

    def device(self, coords: tuple[int, ...]) -> int:
        index = 0
        for c, size in zip(coords, self.sizes):
            index = index * size + c
        return index

    def __str__(self) -> str:
        return ";".join(f"{n}:{s}" for n, s in self.axes)


MeshShapeLike = str | dict | MeshShape | tuple | list


@lru_cache(maxsize=256)
def _parse_mesh(text: str) -> MeshShape:
    axes = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, size = part.partition(":")
        name, size = name.strip(), size.strip()
        if not sep or not size.isdigit() or not size.isascii():
            raise ParseError(
                f"mesh {text!r}: cannot read axis {part!r}. Write each axis as name:size, "
                f"separated by ';', for example 'dp:2;tp:4'."
            )
        axes.append((name, int(size)))
    return MeshShape(tuple(axes))


@lru_cache(maxsize=1024)
def axis_groups(mesh: MeshShape, axes: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Device groups that communicate over `axes`: devices equal in every other coordinate.

    Each group lists its devices in the mixed-radix order of `axes` (first axis major), which
    is also the order of the blocks of a dim split over those axes.
    """
    pos = [mesh.names.index(a) for a in axes]
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for d in range(mesh.size):
        c = mesh.coords(d)
        rest = tuple(v for i, v in enumerate(c) if i not in pos)
        groups.setdefault(rest, []).append((block_index(mesh, axes, c), d))
    return tuple(tuple(d for _, d in sorted(g)) for g in groups.values())


def parts(mesh: MeshShape, axes: tuple[str, ...]) -> int:
    """Number of blocks a dim split over `axes` has (the product of their sizes)."""
    return math.prod(mesh.axis_size(a) for a in axes)


def balanced(size: int, k: int, i: int) -> tuple[int, int]:
    """[start, stop) of block `i` when `size` is split into `k` blocks whose sizes differ by at
    most one, the larger blocks first (`torch.tensor_split`'s convention): 5 over 4 is 2,1,1,1;
    3 over 4 is 1,1,1,0.

    >>> [balanced(5, 4, i) for i in range(4)]
    [(0, 2), (2, 3), (3, 4), (4, 5)]
    """
    q, r = divmod(size, k)
    start = i * q + min(i, r)
    return start, start + q + (1 if i < r else 0)


def block_sizes(size: int, k: int) -> tuple[int, ...]:
    """The sizes of the `k` blocks of a dim of `size` (see `balanced`): (33, 32) for 65 over 2."""
    q, r = divmod(size, k)
    return tuple(q + 1 if i < r else q for i in range(k))


def block_bounds(size: int, mesh: MeshShape, axes: tuple[str, ...], coords: tuple[int, ...]) -> tuple[int, int]:
    """[start, stop) of the block of a dim of `size` split over `axes` that the device at
    `coords` holds. The split is nested, major axis first: the dim is split over the first
    axis into balanced blocks (`balanced`), each of those over the next axis, and so on. So
    undoing the minor-most split (an all-gather over it) gives back the blocks of the others,
    and every block's size differs from every other's by at most one.

    >>> from torchmesh import MeshShape
    >>> mesh = MeshShape.parse("dp:2;tp:2")
    >>> [block_bounds(6, mesh, ("dp", "tp"), mesh.coords(d)) for d in range(4)]
    [(0, 2), (2, 3), (3, 5), (5, 6)]
    """
    start, stop = 0, size
    for a in axes:
        i = mesh.names.index(a)
        lo, hi = balanced(stop - start, mesh.sizes[i], coords[i])
        start, stop = start + lo, start + hi
    return start, stop


def max_block(size: int, mesh: MeshShape, axes: tuple[str, ...]) -> int:
    """The largest block of a dim of `size` split over `axes` (the one device 0 holds)."""
    for a in axes:
        size = -(-size // mesh.axis_size(a))
    return size


def block_index(mesh: MeshShape, axes: tuple[str, ...], coords: tuple[int, ...]) -> int:
    """Which block of a dim split over `axes` (first axis major) the device at `coords` holds;
    also its position in its communication group over `axes`."""
    index = 0
    for a in axes:
        i = mesh.names.index(a)
        index = index * mesh.sizes[i] + coords[i]
    return index
