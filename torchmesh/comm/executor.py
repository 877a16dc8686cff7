"""The one executor of plans: run a list of typed steps (`torchmesh.placement.plan`) on a
backend's data with its differentiable collectives.

Ops, relayouts, outputs and FSDP's regather in backward all call `run_steps`; it computes
the gathered sizes uneven blocks need (`placement.plan.step_sizes`) from the source layout.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchmesh.comm import autograd as comm
from torchmesh.comm import grad_sync, prefetch, traced
from torchmesh.comm.backend import Data, MeshImpl, compiling
from torchmesh.placement.layout import TensorLayout
from torchmesh.placement.plan import AllReduce, AllToAll, Gather, ReduceScatter, Slice, Step, step_sizes


def run_steps(
    impl: MeshImpl,
    data: Data,
    src: TensorLayout,
    steps: Sequence[Step],
    gather_rs: tuple[str, ...] = (),
    phase: str = "forward",
) -> Data:
    """Execute `steps` on `data` laid out as `src`.

    All-gathers over `gather_rs` axes reduce-scatter their gradient (the input is broadcast
    there: a fully sharded parameter). `phase="backward"` records the traffic as backward's
    (FSDP's regather replays a forward relayout inside backward). A fully sharded
    parameter's gather may have been started early (`comm.prefetch`).
    """
    steps = tuple(steps)
    if not steps:
        return data
    if compiling():
        all_sizes = traced.step_sizes_traced(src, steps, impl.slice_mesh, impl.local_coords)
    else:
        all_sizes = step_sizes(src, steps, impl.slice_mesh, impl.local_coords)
    first = steps[0]
    if len(steps) == 1 and isinstance(first, Gather) and (gather_rs or phase == "backward"):
        # a fully sharded parameter (or its regather): maybe prefetched, its gradient bucketed
        ready = prefetch.prefetched(impl, data, (first,), phase)
        if first.axis in gather_rs:
            return grad_sync.gather_param(impl, data, first, all_sizes[0], ready)
        if ready is not None:
            return comm.all_gather(impl, data, first.axis, first.dim, phase, ready=ready)
    for step, sizes in zip(steps, all_sizes):
        if isinstance(step, Gather):
            data = comm.all_gather(
                impl, data, step.axis, step.dim, phase=phase, reduce_grad=step.axis in gather_rs, sizes=sizes
            )
        elif isinstance(step, Slice):
            data = comm.split(impl, data, step.axis, step.dim)
        elif isinstance(step, AllToAll):
            data = comm.all_to_all(impl, data, step.axis, step.gather_dim, step.split_dim, phase=phase, sizes=sizes)
        elif isinstance(step, AllReduce):
            data = comm.all_reduce(impl, data, step.axes, step.op)
        elif isinstance(step, ReduceScatter):
            data = comm.reduce_scatter(impl, data, step.axis, step.dim)
        else:
            raise TypeError(f"unknown plan step {step!r}")
    return data
