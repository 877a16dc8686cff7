"""The one plan behind einsum, elementwise ops and reductions.

All three are a slice-wise computation over an *iteration space* (the union of the inputs'
dims) whose dims not in the output are summed (or max-ed). Planning, a pure cached function
of layouts and rules, decides:

1. which axes split each iteration dim: the rules' axes, reduced dims served first, a dim
   losing any axis already taken (it is then computed whole, its inputs gathered);
2. for each input, the relayout to that computation layout, and the axes over which it is
   broadcast against split dims (`sum_grad`: its gradient is summed there). An input that is
   all-gathered over such an axis (a fully sharded parameter meeting split activations) has
   its gradient summed and re-split in one reduce-scatter (`in_gather_rs`), not an
   all-reduce then a local slice;
3. for the output, the axes it is a partial sum over: reduce-scattered where the output is
   next split over that axis, else all-reduced; then sliced to the rules' layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from torchmesh import errors
from torchmesh.errors import DimError
from torchmesh.placement.dims import Dim
from torchmesh.placement.layout import TensorLayout, check, resolve
from torchmesh.placement.mesh_shape import MeshShape
from torchmesh.placement.plan import AllReduce, Gather, ReduceScatter, Slice, Step, plan_relayout
from torchmesh.placement.rules import LayoutRules


@dataclass(frozen=True, slots=True)
class OpPlan:
    in_steps: tuple[tuple[Step, ...], ...]
    in_layouts: tuple[TensorLayout, ...]
    in_bcast: tuple[tuple[str, ...], ...]
    computed: TensorLayout
    #: the steps from `computed` to `out`: complete partial sums (AllReduce, ReduceScatter)
    #: and slice to the rules' layout (Slice).
    finish: tuple[Step, ...]
    out: TensorLayout
    #: per input, the axes of its all-gathers whose backward is a reduce-scatter (they are
    #: broadcast axes too, and left out of `in_bcast`).
    in_gather_rs: tuple[tuple[str, ...], ...] = ()
    #: whether running the op (forward or backward) needs a collective (derived once: read
    #: on every op of the eager hot path)
    communicates: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        communicates = bool(
            any(self.in_steps)
            or any(self.in_bcast)
            or any(self.in_gather_rs)
            or any(not isinstance(s, Slice) for s in self.finish)
        )
        object.__setattr__(self, "communicates", communicates)


@lru_cache(maxsize=1024)
def plan_op(
    inputs: tuple[TensorLayout, ...],
    out_names: tuple[str, ...],
    rules: LayoutRules,
    mesh: MeshShape,
    reduce_op: str = "sum",
    what: str = "op",
) -> OpPlan:
    """Plan a slice-wise op over `inputs` producing dims `out_names` (others are reduced)."""
    sizes: dict[str, int] = {}
    order: list[str] = []
    for layout in inputs:
        for d in layout.dims:
            if d.name in sizes:
                if sizes[d.name] != d.size:
                    raise DimError(errors.size_mismatch(what, d.name, [sizes[d.name], d.size]))
            else:
                sizes[d.name] = d.size
                order.append(d.name)
    missing = [n for n in out_names if n not in sizes]
    if missing:
        raise DimError(errors.missing_dims(f"{what}: output", missing, order))
    reduced = [n for n in order if n not in out_names]

    assigned: dict[str, tuple[str, ...]] = {}
    taken: set[str] = set()
    for name in reduced + list(out_names):
        prefix: list[str] = []
        for axis in rules.axes_of(name):
            if axis in taken:
                break
            prefix.append(axis)
        assigned[name] = tuple(prefix)
        taken.update(prefix)

    in_layouts, in_steps, in_bcast, in_gather_rs = [], [], [], []
    for layout in inputs:
        target = check(TensorLayout(layout.dims, tuple(assigned[n] for n in layout.names)), mesh, str(rules))
        in_layouts.append(target)
        steps = plan_relayout(layout, target)
        in_steps.append(steps)
        own = target.used_axes
        bcast = tuple(a for n in order for a in assigned[n] if a not in own)
        gathered = {s.axis for s in steps if isinstance(s, Gather)}
        in_bcast.append(tuple(a for a in bcast if a not in gathered))
        in_gather_rs.append(tuple(a for a in bcast if a in gathered))

    out_dims = tuple(Dim(n, sizes[n]) for n in out_names)
    out = resolve(out_dims, rules, mesh)
    computed = check(TensorLayout(out_dims, tuple(assigned[n] for n in out_names)), mesh, str(rules))
    partial = [a for n in reduced for a in assigned[n]]
    finish: list[Step] = []
    for i, (have, want) in enumerate(zip(computed.axes, out.axes)):
        for axis in want[len(have) :]:
            if axis in partial and reduce_op == "sum":
                partial.remove(axis)
                finish.append(ReduceScatter(axis, i))
            else:
                finish.append(Slice(axis, i))
    if partial:
        finish.insert(0, AllReduce(tuple(partial), reduce_op))
    return OpPlan(
        tuple(in_steps), tuple(in_layouts), tuple(in_bcast), computed, tuple(finish), out, tuple(in_gather_rs)
    )
