"""Redistribution planning: a pure function from (layout A, layout B) to collective steps.

The steps are the one vocabulary of every plan (relayouts here, ops' outputs in `op_plan`):
Gather, Slice and AllToAll change how one mesh axis splits one dim; AllReduce and
ReduceScatter complete partial sums. `torchmesh.comm.executor.run_steps` runs a list of them.
Steps are plain data, so plans are unit-tested without processes and cached on their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from torchmesh.errors import LayoutError
from torchmesh.placement.layout import TensorLayout
from torchmesh.placement.mesh_shape import MeshShape, block_bounds, parts


@dataclass(frozen=True, slots=True)
class Gather:
    """All-gather over `axis` along dim position `dim`: its minor-most split axis is undone."""

    axis: str
    dim: int


@dataclass(frozen=True, slots=True)
class Slice:
    """Keep this device's block over `axis` along dim position `dim` (no communication)."""

    axis: str
    dim: int


@dataclass(frozen=True, slots=True)
class AllToAll:
    """Move the split over `axis` from dim `gather_dim` (its minor-most axis) to `split_dim`."""

    axis: str
    gather_dim: int
    split_dim: int


@dataclass(frozen=True, slots=True)
class AllReduce:
    """Complete a partial result over `axes` (summed, or max/min-ed: `op`); the layout stays."""

    axes: tuple[str, ...]
    op: str = "sum"


@dataclass(frozen=True, slots=True)
class ReduceScatter:
    """Sum a partial result over `axis` and keep this device's block along dim position `dim`."""

    axis: str
    dim: int


Step = Gather | Slice | AllToAll | AllReduce | ReduceScatter


@lru_cache(maxsize=2048)
def plan_relayout(src: TensorLayout, dst: TensorLayout) -> tuple[Step, ...]:
    """The steps that turn a tensor laid out as `src` into one laid out as `dst`.

    Per dim, axes beyond the longest common prefix of src and dst are gathered (minor
    first) and dst's extra axes are then sliced (major first). A gather and a slice of the
    same axis become one all-to-all when nothing in between touches the sliced dim.
    """
    if src.dims != dst.dims:
        raise LayoutError(f"cannot relayout {src} to {dst}: the dims differ.")
    gathers: list[Gather] = []
    slices: list[Slice] = []
    for i, (a, b) in enumerate(zip(src.axes, dst.axes)):
        common = 0
        while common < min(len(a), len(b)) and a[common] == b[common]:
            common += 1
        gathers.extend(Gather(ax, i) for ax in reversed(a[common:]))
        slices.extend(Slice(ax, i) for ax in b[common:])
    return _fuse(gathers, slices)


def _fuse(gathers: list[Gather], slices: list[Slice]) -> tuple[Step, ...]:
    steps: list[Step] = list(gathers)
    remaining: list[Slice] = []
    first_slice_of_dim: set[int] = set()
    for s in slices:
        first = s.dim not in first_slice_of_dim
        first_slice_of_dim.add(s.dim)
        # The slice may move up to its axis' gather only if it is the first slice of its dim
        # and its dim is not gathered after that point (by a gather, or by an all-to-all
        # already fused from another dim's slice).
        j = next((k for k, g in enumerate(steps) if isinstance(g, Gather) and g.axis == s.axis), None)
        if first and j is not None and not any(_gathers(g) == s.dim for g in steps[j + 1 :]):
            g = steps[j]
            assert isinstance(g, Gather)  # j was chosen as a Gather's index
            steps[j] = AllToAll(s.axis, g.dim, s.dim)
        else:
            remaining.append(s)
    return tuple(steps) + tuple(remaining)


def _gathers(step: Step) -> int | None:
    """The dim position a step gathers (undoes a split of), if any."""
    if isinstance(step, Gather):
        return step.dim
    if isinstance(step, AllToAll):
        return step.gather_dim
    return None


def apply_step(layout: TensorLayout, step: Step) -> TensorLayout:
    """The layout after one step (used to check plans and to build intermediate layouts)."""
    axes = list(layout.axes)
    if isinstance(step, Gather):
        assert axes[step.dim][-1] == step.axis
        axes[step.dim] = axes[step.dim][:-1]
    elif isinstance(step, (Slice, ReduceScatter)):
        axes[step.dim] = axes[step.dim] + (step.axis,)
    elif isinstance(step, AllToAll):
        assert axes[step.gather_dim][-1] == step.axis
        axes[step.gather_dim] = axes[step.gather_dim][:-1]
        axes[step.split_dim] = axes[step.split_dim] + (step.axis,)
    return TensorLayout(layout.dims, tuple(axes))


@lru_cache(maxsize=2048)
def step_sizes(
    src: TensorLayout, steps: tuple[Step, ...], mesh: MeshShape, coords: tuple[tuple[int, ...], ...]
) -> tuple[tuple[int, ...] | None, ...]:
    """For each step that gathers (Gather, AllToAll), the size its gathered dim has afterwards
    on each device at `coords`, or None where the blocks are even (the collective then needs
    no sizes). Collectives of uneven blocks need it: a device cannot tell the sizes of the
    others' blocks from its own.

    >>> from torchmesh import MeshShape, TensorLayout, Dim
    >>> lay = TensorLayout((Dim("vocab", 5),), (("tp",),))
    >>> step_sizes(lay, (Gather("tp", 0),), MeshShape.parse("tp:2"), ((0,), (1,)))
    ((5, 5),)
    """
    out: list[tuple[int, ...] | None] = []
    layout = src
    for step in steps:
        after = apply_step(layout, step)
        dim = step.dim if isinstance(step, Gather) else step.gather_dim if isinstance(step, AllToAll) else None
        if dim is None or layout.dims[dim].size % parts(mesh, layout.axes[dim]) == 0:
            out.append(None)
        else:
            size, axes = layout.dims[dim].size, after.axes[dim]
            out.append(tuple(hi - lo for lo, hi in (block_bounds(size, mesh, axes, c) for c in coords)))
        layout = after
    return tuple(out)
