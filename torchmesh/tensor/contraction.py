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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from torchmesh import errors
from torchmesh.comm import autograd as comm
from torchmesh.comm.backend import Data, MeshImpl, Sizes
from torchmesh.errors import DimError
from torchmesh.placement.layout import TensorLayout, check, resolve
from torchmesh.placement.mesh_shape import MeshShape
from torchmesh.placement.plan import AllToAll, Gather, Slice, Step, plan_relayout, step_sizes
from torchmesh.placement.rules import LayoutRules
from torchmesh.tensor import regather
from torchmesh.tensor.dims import Dim
from torchmesh.tensor.mesh_tensor import MeshTensor


@dataclass(frozen=True, slots=True)
class OpPlan:
    in_steps: tuple[tuple[Step, ...], ...]
    in_layouts: tuple[TensorLayout, ...]
    in_bcast: tuple[tuple[str, ...], ...]
    computed: TensorLayout
    finish: tuple[tuple, ...]
    out: TensorLayout
    #: per input, the axes of its all-gathers whose backward is a reduce-scatter (they are
    #: broadcast axes too, and left out of `in_bcast`).
    in_gather_rs: tuple[tuple[str, ...], ...] = ()


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
    finish: list[tuple] = []
    for i, (have, want) in enumerate(zip(computed.axes, out.axes)):
        for axis in want[len(have) :]:
            if axis in partial and reduce_op == "sum":
                partial.remove(axis)
                finish.append(("reduce_scatter", axis, i))
            else:
                finish.append(("split", axis, i))
    if partial:
        finish.insert(0, ("all_reduce", tuple(partial)))
    return OpPlan(tuple(in_steps), tuple(in_layouts), tuple(in_bcast), computed, tuple(finish), out,
                  tuple(in_gather_rs))


def sized_steps(impl: MeshImpl, src: TensorLayout, steps: Sequence[Step]) -> tuple[tuple[Step, Sizes], ...]:
    """The relayout steps from `src`, each with the gathered sizes its collective needs
    (None where blocks are even; see `placement.plan.step_sizes`)."""
    steps = tuple(steps)
    return tuple(zip(steps, step_sizes(src, steps, impl.slice_mesh, impl.local_coords)))


def run_steps(impl: MeshImpl, data: Data, src: TensorLayout, steps: Sequence[Step],
              gather_rs: tuple[str, ...] = ()) -> Data:
    """Execute relayout steps from layout `src` with the backend's differentiable collectives;
    all-gathers over `gather_rs` axes reduce-scatter their gradient (the input is broadcast
    there)."""
    for s, sizes in sized_steps(impl, src, steps):
        if isinstance(s, Gather):
            data = comm.all_gather(impl, data, s.axis, s.dim, reduce_grad=s.axis in gather_rs, sizes=sizes)
        elif isinstance(s, Slice):
            data = comm.split(impl, data, s.axis, s.dim)
        else:
            assert isinstance(s, AllToAll)
            data = comm.all_to_all(impl, data, s.axis, s.gather_dim, s.split_dim, sizes=sizes)
    return data


def prepare_inputs(plan: OpPlan, xs: Sequence[MeshTensor]) -> list[Data]:
    """Each input's data relaid out for the computation, with `sum_grad` where broadcast."""
    impl = xs[0]._mesh.impl
    datas = []
    for x, steps, bcast, gather_rs in zip(xs, plan.in_steps, plan.in_bcast, plan.in_gather_rs):
        d = run_steps(impl, x._data, x._layout, steps, gather_rs) if steps else x._data
        if bcast:
            d = comm.sum_grad(impl, d, bcast)
        datas.append(d)
    return datas


def finish_output(plan: OpPlan, impl: MeshImpl, data: Data, reduce_op: str = "sum") -> Data:
    """Complete partial results and slice the output to the rules' layout."""
    for step in plan.finish:
        if step[0] == "all_reduce":
            data = comm.all_reduce(impl, data, step[1], reduce_op)
        elif step[0] == "reduce_scatter":
            data = comm.reduce_scatter(impl, data, step[1], step[2])
        else:
            data = comm.split(impl, data, step[1], step[2])
    return data


def run_op(
    xs: Sequence[MeshTensor],
    out_names: tuple[str, ...],
    local_fn: Callable[..., object],
    reduce_op: str = "sum",
    what: str = "op",
    at: bool = False,
) -> MeshTensor:
    """Plan and run a slice-wise op; `local_fn(plan)` returns the per-device function
    (called with each device's mesh coordinates first when `at` is true)."""
    mesh = xs[0]._mesh
    for x in xs[1:]:
        if x._mesh is not mesh:
            raise DimError(f"{what}: inputs live on different meshes ({mesh} and {x._mesh}).")
    plan = plan_op(tuple(x._layout for x in xs), out_names, mesh.rules, mesh.shape, reduce_op, what)
    saved = mesh.impl.begin_op(plan, tuple(x._data[0].dtype for x in xs) if xs[0]._data else (),
                               lambda: f"{what} {' , '.join(str(x._layout) for x in xs)} -> {plan.out}")
    try:
        return _run_planned(plan, xs, local_fn, reduce_op, at)
    finally:
        mesh.impl.end_op(saved)


def _run_planned(plan: OpPlan, xs: Sequence[MeshTensor], local_fn: Callable[..., object],
                 reduce_op: str, at: bool) -> MeshTensor:
    mesh = xs[0]._mesh
    datas = prepare_inputs(plan, xs)
    fn, run = local_fn(plan), (mesh.impl.slicewise_at if at else mesh.impl.slicewise)
    sources = []
    if any(plan.in_gather_rs) and regather.enabled():  # fully sharded inputs: gathered again in backward
        # (not inputs no collective touched: on xla the partitioner does the gathering)
        sources = [(x._data, d, sized_steps(mesh.impl, x._layout, st))
                   for x, d, st, rs in zip(xs, datas, plan.in_steps, plan.in_gather_rs) if rs and d is not x._data]
    if sources:
        out = regather.run_regathering(mesh.impl, lambda: run(fn, *datas), sources)
    else:
        out = run(fn, *datas)
    out = finish_output(plan, mesh.impl, out, reduce_op)
    return MeshTensor(out, plan.out, mesh)
