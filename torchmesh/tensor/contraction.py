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
            d = grad_sync.reduce_grad(impl, x._data, bcast) if bcast else x._data
        datas.append(d)
    return datas


def run_op(
    xs: Sequence[MeshTensor],
    out_names: tuple[str, ...],
    local_fn: Callable[[OpPlan], Callable[..., torch.Tensor]],
    reduce_op: str = "sum",
    what: str = "op",
    at: bool = False,
) -> MeshTensor:
    """Plan and run a slice-wise op; `local_fn(plan)` returns the per-device function
    (called with each device's mesh coordinates first when `at` is true)."""
    mesh = xs[0]._mesh
    for x in xs[1:]:
        if x._mesh is not mesh:
            raise MeshError(f"{what}: inputs live on different meshes ({mesh} and {x._mesh}).")
    layouts = tuple([x._layout for x in xs])
    if compiling():
        plan = traced.plan_op_traced(layouts, out_names, mesh.rules, mesh.shape, reduce_op, what)
    else:
        plan = plan_op(layouts, out_names, mesh.rules, mesh.shape, reduce_op, what)
        impl = mesh.impl
        if not impl.checking and local_only(plan, impl, xs):  # the eager fast path
            run = impl.slicewise_at if at else impl.slicewise
            return MeshTensor(run(local_fn(plan), *(x._data for x in xs)), plan.out, mesh)
    saved = mesh.impl.begin_op(
        plan,
        tuple([x._data[0].dtype for x in xs]) if xs[0]._data else (),
        lambda: f"{what} {' , '.join(str(x._layout) for x in xs)} -> {plan.out}",
    )
    try:
        return _run_planned(plan, xs, local_fn, reduce_op, at)
    finally:
        mesh.impl.end_op(saved)


#: id(plan) -> (plan, the backend's slice mesh, whether running the plan there is the
#: slice-wise call alone, the inputs whose gradient it would sum over axes of size above 1):
#: `local_only`'s cache. The plan is kept, so its id is not reused.
_LOCAL_ONLY: dict[int, tuple[OpPlan, object, bool, tuple[int, ...]]] = {}


def local_only(plan: OpPlan, impl: MeshImpl, xs: Sequence[MeshTensor] = ()) -> bool:
    """Whether `plan` runs on `impl`, for inputs `xs`, as its slice-wise computation and
    nothing else: no input relayout or regather, finishing steps (all-reduces) only over
    axes of size 1 there, and no gradient sum (an input broadcast over an axis that needs no
    gradient: a replicated activation under no_grad, a constant). Then no collective runs,
    so there is nothing to agree on with the other ranks or to name in an error, and
    `run_op` skips that machinery (the eager hot path of reductions over unsplit dims and of
    einsums needing no communication)."""
    entry = _LOCAL_ONLY.get(id(plan))
    if entry is None or entry[0] is not plan or entry[1] is not impl.slice_mesh:
        if len(_LOCAL_ONLY) > 256:  # small: it keeps plans alive (a new sequence length is a new plan)
            _LOCAL_ONLY.clear()
        local = (
            not any(plan.in_steps)
            and not any(plan.in_gather_rs)
            and all(isinstance(s, AllReduce) and not impl.live_axes(s.axes) for s in plan.finish)
            and plan.out == plan.computed
        )
        summed = tuple(i for i, axes in enumerate(plan.in_bcast) if impl.live_axes(axes))
        entry = _LOCAL_ONLY[id(plan)] = (plan, impl.slice_mesh, local, summed)
    if not entry[2]:
        return False
    summed = entry[3]
    if not summed:
        return True
    if len(xs) != len(plan.in_bcast):  # asked without the inputs (a reduction's cache): a sum may run
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(xs[i]._data and xs[i]._data[0].requires_grad for i in summed)


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
