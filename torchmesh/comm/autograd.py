"""The collectives as autograd functions, each paired with its conjugate, for every backend.

| forward            | backward                          |
|--------------------|-----------------------------------|
| all_reduce (sum)   | identity                          |
| sum_grad (identity)| all_reduce of the gradient        |
| all_gather         | split (keep own block, no comm)   |
| all_gather, input broadcast there | reduce_scatter     |
| split              | all_gather                        |
| reduce_scatter     | all_gather                        |
| all_to_all         | all_to_all back                   |
| shift by n         | shift by -n                       |

The invariant that makes these pairs exact: the gradient of a tensor replicated over an axis
is the whole gradient on every device of that axis. `sum_grad` is where an input is
broadcast against a dim split over an axis: its per-device gradients are partial sums.
Axes of size 1 short-circuit: no call, no record.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from torchmesh.comm import stats
from torchmesh.comm.backend import Data, MeshImpl, OpScope, Pending, Sizes, compiling


def _size(impl: MeshImpl, axes: tuple[str, ...]) -> int:
    k = 1
    for a in axes:
        k *= impl.axis_size(a)
    return k


def _needs_grad(ts: Data) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _rec(
    impl: MeshImpl, kind: str, axes: tuple[str, ...], ts: Data, phase: str, whole: tuple[int, int] | None = None
) -> None:
    """Before every collective: verify ranks agree (when checking), then record it. `whole`
    is (dim, gathered size) for gathers of blocks that may be uneven. Neither inside
    torch.compile: a check would read the host, a record would happen once, at tracing."""
    if compiling():
        return
    if impl.checking:
        impl.verify(kind, axes, ts[0], phase, whole)
    if stats.recording():
        stats.record(kind, axes, _size(impl, axes), ts[0], phase, whole)


def _whole(dim: int, sizes: Sizes) -> tuple[int, int] | None:
    return None if sizes is None else (dim, sizes[0])


def _sizes_along(ts: Data, dim: int) -> tuple[int, ...]:
    return tuple(t.shape[dim] for t in ts)


# ---- raw calls that also record ------------------------------------------------------------
def _all_reduce(impl, ts, axes, op, phase="forward"):
    _rec(impl, "all_reduce", axes, ts, phase)
    return impl.all_reduce(ts, axes, op)


def _all_gather(impl, ts, axis, dim, phase="forward", sizes=None):
    _rec(impl, "all_gather", (axis,), ts, phase, _whole(dim, sizes))
    return impl.all_gather(ts, axis, dim, sizes)


def _reduce_scatter(impl, ts, axis, dim, phase="forward"):
    _rec(impl, "reduce_scatter", (axis,), ts, phase)
    return impl.reduce_scatter(ts, axis, dim)


def _all_to_all(impl, ts, axis, gather_dim, split_dim, phase="forward", sizes=None):
    _rec(impl, "all_to_all", (axis,), ts, phase, _whole(gather_dim, sizes))
    return impl.all_to_all(ts, axis, gather_dim, split_dim, sizes)


def _shift(impl, ts, axes, offset, wrap, phase="forward"):
    _rec(impl, "shift", axes, ts, phase)
    return impl.shift(ts, axes, offset, wrap)


# ---- autograd pairs --------------------------------------------------------------------------
# Each pair whose backward communicates records, in forward, the op that was running
# (`impl.op_name()`, a string: nothing that keeps tensors alive) and names its backward after it.
def _backward_of(ctx) -> OpScope:
    return ctx.impl.op_scope(f"backward of {ctx.op}" if ctx.op else "backward")


class _AllReduce(Function):
    @staticmethod
    def forward(ctx, impl, axes, *ts):
        return _all_reduce(impl, ts, axes, "sum")

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *grads)


class _SumGrad(Function):
    @staticmethod
    def forward(ctx, impl, axes, *ts):
        ctx.impl, ctx.axes, ctx.op = impl, axes, impl.op_name()
        return tuple(t.view_as(t) for t in ts)

    @staticmethod
    def backward(ctx, *grads):
        with _backward_of(ctx):
            return (None, None, *_all_reduce(ctx.impl, grads, ctx.axes, "sum", "backward"))


class _AllGather(Function):
    """Backward keeps one's own block of the gradient, or, with `reduce_grad` (the input is
    broadcast over `axis` after the gather, so each device's gradient is a partial sum),
    sums it and keeps one's own block: one reduce-scatter."""

    @staticmethod
    def forward(ctx, impl, axis, dim, reduce_grad, sizes, ready, *ts):
        ctx.impl, ctx.axis, ctx.dim, ctx.reduce_grad = impl, axis, dim, reduce_grad
        ctx.op = impl.op_name() if reduce_grad else ""
        return ready.wait() if ready is not None else _all_gather(impl, ts, axis, dim, sizes=sizes)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.reduce_grad:
            with _backward_of(ctx):
                grads = _reduce_scatter(ctx.impl, tuple(g.contiguous() for g in grads), ctx.axis, ctx.dim, "backward")
                grads = tuple(g.contiguous() for g in grads)
        else:
            grads = tuple(g.contiguous() for g in ctx.impl.split(grads, ctx.axis, ctx.dim))
        return (None, None, None, None, None, None, *grads)


class _Split(Function):
    @staticmethod
    def forward(ctx, impl, axis, dim, *ts):
        ctx.impl, ctx.axis, ctx.dim, ctx.sizes = impl, axis, dim, _sizes_along(ts, dim)
        ctx.op = impl.op_name()
        return tuple(t.contiguous() for t in impl.split(ts, axis, dim))

    @staticmethod
    def backward(ctx, *grads):
        with _backward_of(ctx):
            return (None, None, None, *_all_gather(ctx.impl, grads, ctx.axis, ctx.dim, "backward", ctx.sizes))


class _ReduceScatter(Function):
    @staticmethod
    def forward(ctx, impl, axis, dim, *ts):
        ctx.impl, ctx.axis, ctx.dim, ctx.sizes = impl, axis, dim, _sizes_along(ts, dim)
        ctx.op = impl.op_name()
        return _reduce_scatter(impl, ts, axis, dim)

    @staticmethod
    def backward(ctx, *grads):
        with _backward_of(ctx):
            return (None, None, None, *_all_gather(ctx.impl, grads, ctx.axis, ctx.dim, "backward", ctx.sizes))


class _AllToAll(Function):
    @staticmethod
    def forward(ctx, impl, axis, gather_dim, split_dim, sizes, *ts):
        ctx.impl, ctx.axis, ctx.dims = impl, axis, (gather_dim, split_dim)
        ctx.sizes, ctx.op = _sizes_along(ts, split_dim), impl.op_name()
        return _all_to_all(impl, ts, axis, gather_dim, split_dim, sizes=sizes)

    @staticmethod
    def backward(ctx, *grads):
        g, s = ctx.dims
        with _backward_of(ctx):
            back = _all_to_all(ctx.impl, grads, ctx.axis, s, g, "backward", ctx.sizes)
        return (None, None, None, None, None, *back)


class _Shift(Function):
    @staticmethod
    def forward(ctx, impl, axes, offset, wrap, *ts):
        ctx.impl, ctx.axes, ctx.offset, ctx.wrap, ctx.op = impl, axes, offset, wrap, impl.op_name()
        return _shift(impl, ts, axes, offset, wrap)

    @staticmethod
    def backward(ctx, *grads):
        with _backward_of(ctx):
            back = _shift(ctx.impl, grads, ctx.axes, -ctx.offset, ctx.wrap, "backward")
        return (None, None, None, None, *back)


# ---- the functions ops call ------------------------------------------------------------------
def all_reduce(impl: MeshImpl, ts: Data, axes: tuple[str, ...], op: str = "sum") -> Data:
    """Sum (or max/min, not differentiable) over the devices of `axes`; result replicated."""
    axes = impl.live_axes(axes)
    if not axes:
        return ts
    if op == "sum" and _needs_grad(ts):
        return _AllReduce.apply(impl, axes, *ts)
    return _all_reduce(impl, ts, axes, op)


def all_reduce_fresh(impl: MeshImpl, ts: Data, axes: tuple[str, ...]) -> Data:
    """`all_reduce` (a sum over live `axes`) of an op's own result, which the caller vouches is
    fresh: no input's storage and saved by no autograd node (a matmul's or a sum's output).
    Where the backend sums in place and the result is contiguous, it is summed where it lies:
    no copy, and no autograd node, since a sum's gradient here is the identity."""
    t = ts[0]
    if not impl.all_reduces_in_place or not t.is_contiguous():
        return all_reduce(impl, ts, axes)
    if impl.checking:
        impl.verify("all_reduce", axes, t, "forward")
    if stats.recording():
        stats.record("all_reduce", axes, _size(impl, axes), t, "forward")
    return impl.all_reduce_inplace(ts, axes)


def sum_grad(impl: MeshImpl, ts: Data, axes: tuple[str, ...]) -> Data:
    """Identity forward; backward sums the gradient over `axes` (an input broadcast there)."""
    axes = impl.live_axes(axes)
    if not axes or not _needs_grad(ts):
        return ts
    return _SumGrad.apply(impl, axes, *ts)


def all_gather(
    impl: MeshImpl,
    ts: Data,
    axis: str,
    dim: int,
    phase: str = "forward",
    reduce_grad: bool = False,
    sizes: Sizes = None,
    ready: Pending | None = None,
) -> Data:
    """`phase` labels a gather run outside autograd (e.g. "backward" for a regather).
    `reduce_grad`: the gathered input is then broadcast over `axis` (a fully sharded parameter
    meeting split activations), so its gradient is reduce-scattered, not sliced. `sizes`:
    the gathered size along `dim` per local tensor, where blocks may be uneven. `ready`: this
    gather, started (and recorded) earlier (`comm.prefetch`)."""
    if impl.axis_size(axis) == 1:
        return ts
    if _needs_grad(ts):
        return _AllGather.apply(impl, axis, dim, reduce_grad, sizes, ready, *ts)
    return ready.wait() if ready is not None else _all_gather(impl, ts, axis, dim, phase, sizes)


def split(impl: MeshImpl, ts: Data, axis: str, dim: int) -> Data:
    if impl.axis_size(axis) == 1:
        return ts
    if _needs_grad(ts):
        return _Split.apply(impl, axis, dim, *ts)
    return tuple(t.contiguous() for t in impl.split(ts, axis, dim))


def reduce_scatter(impl: MeshImpl, ts: Data, axis: str, dim: int) -> Data:
    if impl.axis_size(axis) == 1:
        return ts
    if _needs_grad(ts):
        return _ReduceScatter.apply(impl, axis, dim, *ts)
    return _reduce_scatter(impl, ts, axis, dim)


def all_to_all(
    impl: MeshImpl, ts: Data, axis: str, gather_dim: int, split_dim: int, phase: str = "forward", sizes: Sizes = None
) -> Data:
    if impl.axis_size(axis) == 1:
        return ts
    if _needs_grad(ts):
        return _AllToAll.apply(impl, axis, gather_dim, split_dim, sizes, *ts)
    return _all_to_all(impl, ts, axis, gather_dim, split_dim, phase, sizes)


def shift(impl: MeshImpl, ts: Data, axes: tuple[str, ...], offset: int, wrap: bool) -> Data:
    axes = impl.live_axes(axes)
    k = _size(impl, axes)
    if wrap:  # a whole turn around the group is the identity
        offset %= k
    if offset == 0:
        return ts
    if abs(offset) >= k:  # every sender is off the group (one device: it receives nothing)
        if _needs_grad(ts):  # zeros that stay in the graph (zero gradient), as on a real group
            return tuple(
                torch.where(
                    torch.zeros((), dtype=torch.bool, device=t.device),
                    t,
                    torch.zeros((), dtype=t.dtype, device=t.device),
                )
                for t in ts
            )
        return tuple(torch.zeros_like(t) for t in ts)
    if _needs_grad(ts):
        return _Shift.apply(impl, axes, offset, wrap, *ts)
    return _shift(impl, ts, axes, offset, wrap)
