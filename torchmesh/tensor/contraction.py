"""Running a planned slice-wise op (einsum, elementwise ops, reductions): relay the inputs
out for the computation, compute per device, finish the output (the plan itself is
`torchmesh.placement.op_plan`, a pure cached function of layouts and rules)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from torchmesh.comm import autograd as comm
from torchmesh.comm import grad_sync, regather, traced
from torchmesh.comm.backend import Data, MeshImpl, compiling
from torchmesh.comm.executor import run_steps
from torchmesh.errors import MeshError
from torchmesh.placement.op_plan import OpPlan, plan_op
from torchmesh.placement.plan import AllReduce
from torchmesh.tensor.mesh_tensor import MeshTensor


def prepare_inputs(plan: OpPlan, xs: Sequence[MeshTensor]) -> list[Data]:
    """Each input's data relaid out for the computation, its gradient summed where broadcast
    (a parameter used as it is laid out: deferred to one bucketed all-reduce per backward)."""
    impl = xs[0]._mesh.impl
    datas = []
    for x, steps, bcast, gather_rs in zip(xs, plan.in_steps, plan.in_bcast, plan.in_gather_rs):
        if steps:
            d = run_steps(impl, x._data, x._layout, steps, gather_rs)
            d = comm.sum_grad(impl, d, bcast) if bcast else d
        else:
            live = impl.live_axes(bcast) if bcast else ()
            d = summed_input(impl, x, live) if live else x._data
        datas.append(d)
    return datas


def summed_input(impl: MeshImpl, x: MeshTensor, axes: tuple[str, ...]) -> Data:
    """x's data as an op input broadcast over the live `axes`: its gradient summed there
    (`grad_sync.reduce_grad`; a tracked parameter's sum is deferred to its bucket). The
    summed form is kept on x, so every op that reads x so shares it and autograd adds their
    gradients up before the sum: one all-reduce for all of them (the q, k and v projections
    of one activation: one, not three, as a fused QKV weight gives). Kept while x's data is
    not changed in place (a weight the optimizer steps is summed anew in the next step)."""
    if compiling():  # nothing is kept on tensors in a traced program
        return grad_sync.reduce_grad(impl, x._data, axes)
    kept = x._summed
    versions = tuple([t._version for t in x._data])
    if kept is not None and kept[0] == axes and kept[2] == versions:
        return kept[1]
    data = grad_sync.reduce_grad(impl, x._data, axes)
    if data is not x._data and grad_sync.tracked(x._data) is None:
        x._summed = (axes, data, versions)  # a tensor changed in place since (an optimizer step) sums anew
    return data


def run_op(
    xs: Sequence[MeshTensor],
    out_names: tuple[str, ...],
    local_fn: Callable[[OpPlan], Callable[..., torch.Tensor]],
    reduce_op: str = "sum",
    what: str = "op",
    at: bool = False,
    cache_key: tuple | None = None,
    fresh: bool = False,
) -> MeshTensor:
    """Plan and run a slice-wise op; `local_fn(plan)` returns the per-device function
    (called with each device's mesh coordinates first when `at` is true).

    Eagerly, a simple plan (`EagerPlan`) runs in `run_simple`; with a `cache_key` the run is
    kept, and `cached_run(cache_key, xs)` repeats it without planning again. The key is the
    caller's name for this call: the op's name and what decides `out_names` and
    `local_fn(plan)` (an einsum's equation), then `id()` of every input's layout and of the
    first input's mesh. `fresh`: the per-device function's results are its own (see
    `comm.all_reduce_fresh`), so a finishing sum may overwrite them."""
    mesh = xs[0]._mesh
    for x in xs[1:]:
        if x._mesh is not mesh:
            raise MeshError(f"{what}: inputs live on different meshes ({mesh} and {x._mesh}).")
    layouts = tuple([x._layout for x in xs])
    if compiling():
        plan = traced.plan_op_traced(layouts, out_names, mesh.rules, mesh.shape, reduce_op, what)
    else:
        rules = mesh.rules
        plan = plan_op(layouts, out_names, rules, mesh.shape, reduce_op, what)
        impl = mesh.impl
        if not impl.checking:
            eager = eager_plan(plan, impl)
            if eager.simple:
                run = _Run(layouts, mesh, rules, eager, local_fn(plan), at, fresh, what)
                if cache_key is not None:
                    if len(_RUNS) >= 512:  # small: a new sequence length is a new entry
                        _RUNS.clear()
                    _RUNS[cache_key] = run
                return run_simple(eager, xs, run.fn, at, fresh, run.describe)
    saved = mesh.impl.begin_op(
        plan,
        tuple([x._data[0].dtype for x in xs]) if xs[0]._data else (),
        lambda: f"{what} {' , '.join(str(x._layout) for x in xs)} -> {plan.out}",
    )
    try:
        return _run_planned(plan, xs, local_fn, reduce_op, at)
    finally:
        mesh.impl.end_op(saved)


class EagerPlan:
    """How `plan` runs eagerly where the local tensors are cut by `slice_mesh`, derived once per
    plan and backend (`eager_plan`).

    It is `simple` when running it takes nothing but the slice-wise call, the gradient sum of
    inputs broadcast over axes of size above 1 there (`summed`: (input, axes) pairs) and at
    most one finishing sum over such axes (`reduce_axes`): no input relayout or regather, the
    output laid out as computed. Simple plans run in `run_simple`, past the general
    executor; those with neither sum are `local`: no collective at all."""

    __slots__ = ("local", "plan", "reduce_axes", "simple", "slice_mesh", "summed")

    def __init__(self, plan: OpPlan, impl: MeshImpl) -> None:
        self.plan, self.slice_mesh = plan, impl.slice_mesh
        finishing = [s for s in plan.finish if isinstance(s, AllReduce) and impl.live_axes(s.axes)]
        self.simple = (
            not any(plan.in_steps)
            and not any(plan.in_gather_rs)
            and all(isinstance(s, AllReduce) for s in plan.finish)
            and len(finishing) <= 1
            and all(s.op == "sum" for s in finishing)
            and plan.out == plan.computed
        )
        self.reduce_axes = impl.live_axes(finishing[0].axes) if finishing else ()
        self.summed = tuple((i, impl.live_axes(axes)) for i, axes in enumerate(plan.in_bcast) if impl.live_axes(axes))
        self.local = self.simple and not self.reduce_axes and not self.summed


#: (id(plan), id(slice mesh)) -> its EagerPlan, which keeps both alive (so the ids are not reused).
_EAGER: dict[tuple[int, int], EagerPlan] = {}


def eager_plan(plan: OpPlan, impl: MeshImpl) -> EagerPlan:
    """`plan` on `impl`, as run eagerly (cached)."""
    entry = _EAGER.get((id(plan), id(impl.slice_mesh)))
    if entry is None:
        if len(_EAGER) > 256:  # small: it keeps plans alive (a new sequence length is a new plan)
            _EAGER.clear()
        entry = _EAGER[(id(plan), id(impl.slice_mesh))] = EagerPlan(plan, impl)
    return entry


def _sums_grad(eager: EagerPlan, xs: Sequence[MeshTensor]) -> bool:
    """Whether an input broadcast over a live axis needs its gradient summed in this call."""
    if not torch.is_grad_enabled():
        return False
    for i, _ in eager.summed:
        data = xs[i]._data
        if data and data[0].requires_grad:
            return True
    return False


def run_simple(
    eager: EagerPlan,
    xs: Sequence[MeshTensor],
    fn: Callable[..., torch.Tensor],
    at: bool,
    fresh: bool,
    describe: Callable[[], str],
) -> MeshTensor:
    """Run a simple plan (`EagerPlan.simple`) eagerly: the slice-wise call between the
    gradient sums of broadcast inputs and one finishing sum, inside the op's scope (its
    agreement and name, `MeshImpl.enter_op`) when it communicates."""
    mesh = xs[0]._mesh
    impl = mesh.impl
    plan = eager.plan
    run = impl.slicewise_at if at else impl.slicewise
    n = len(xs)
    datas = [xs[0]._data, xs[1]._data] if n == 2 else [xs[0]._data] if n == 1 else [x._data for x in xs]
    sums = bool(eager.summed) and _sums_grad(eager, xs)
    if not eager.reduce_axes and not sums:
        return MeshTensor(run(fn, *datas), plan.out, mesh)
    if not datas[0]:
        dtypes: tuple = ()
    elif n == 2:
        dtypes = (datas[0][0].dtype, datas[1][0].dtype)
    else:
        dtypes = tuple([d[0].dtype for d in datas])
    saved = impl.enter_op(plan, dtypes, describe)
    try:
        if sums:
            for i, axes in eager.summed:
                datas[i] = summed_input(impl, xs[i], axes)
        out = run(fn, *datas)
        if eager.reduce_axes:
            reduce = comm.all_reduce_fresh if fresh else comm.all_reduce
            out = reduce(impl, out, eager.reduce_axes)
    finally:
        impl.end_op(saved)
    return MeshTensor(out, plan.out, mesh)


class _Run:
    """An eager op planned once for these input layouts on this mesh under these rules: its
    simple plan and per-device function (`run_op`'s `cache_key`)."""

    __slots__ = ("at", "eager", "fn", "fresh", "layouts", "mesh", "rules", "what")

    def __init__(self, layouts, mesh, rules, eager: EagerPlan, fn, at: bool, fresh: bool, what: str) -> None:
        self.layouts, self.mesh, self.rules, self.eager = layouts, mesh, rules, eager
        self.fn, self.at, self.fresh, self.what = fn, at, fresh, what

    def describe(self) -> str:
        return f"{self.what} {' , '.join(str(lay) for lay in self.layouts)} -> {self.eager.plan.out}"


#: cache_key -> _Run (`run_op`). A key names its inputs' layouts and mesh by id; the run keeps
#: them alive, so an id in a key is not reused while the key is.
_RUNS: dict[tuple, _Run] = {}


def cached_run(key: tuple, xs: Sequence[MeshTensor]) -> MeshTensor | None:
    """The result of the op `key` names (see `run_op`), run as planned before; None where it
    has not been, or no longer applies (another mesh, scoped rules, check mode): the caller
    then runs it in full. Eager only."""
    run = _RUNS.get(key)
    if run is None:
        return None
    mesh = run.mesh
    for x in xs:
        if x._mesh is not mesh:
            return None
    if mesh.impl.checking or mesh.rules is not run.rules:
        return None
    return run_simple(run.eager, xs, run.fn, run.at, run.fresh, run.describe)


def _run_planned(
    plan: OpPlan,
    xs: Sequence[MeshTensor],
    local_fn: Callable[[OpPlan], Callable[..., torch.Tensor]],
    reduce_op: str,
    at: bool,
) -> MeshTensor:
    mesh = xs[0]._mesh
    datas = prepare_inputs(plan, xs)
    fn, run = local_fn(plan), (mesh.impl.slicewise_at if at else mesh.impl.slicewise)
    sources = []
    if any(plan.in_gather_rs) and regather.enabled():  # fully sharded inputs: gathered again in backward
        # (not inputs no collective touched: on xla the partitioner does the gathering)
        sources = [
            (x._data, d, (x._layout, st))
            for x, d, st, rs in zip(xs, datas, plan.in_steps, plan.in_gather_rs)
            if rs and d is not x._data
        ]
    if sources:
        out = regather.run_regathering(mesh.impl, lambda: run(fn, *datas), sources)
    else:
        out = run(fn, *datas)
    out = run_steps(mesh.impl, out, plan.computed, plan.finish)
    return MeshTensor(out, plan.out, mesh)
