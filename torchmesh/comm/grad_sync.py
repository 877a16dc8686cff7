"""Deferred, bucketed reduction of parameter gradients (DDP's idea, for named dims).

A parameter replicated over an axis that its activations split (`dp` for data parallelism)
gets, at each use, a partial gradient on every device of that axis; the plain rule
(`comm.autograd.sum_grad`) all-reduces it at every use. For a module's parameters that is
one collective per parameter per use: 47 a step on the demo LM, two for a tied embedding.

Here a use of a parameter (an op input that is the parameter itself, broadcast over `axes`)
instead adds its partial gradient to a side buffer (`ParamSync.partial`) and hands autograd
nothing for the parameter. A 0-d `anchor` tensor, input to every such use, tells when the
last use of this backward is done: its gradient accumulator runs once all of them have,
and its hook moves the buffer into a bucket. A bucket (same axes and dtype, up to
`bucket_bytes` per device) is flattened and all-reduced asynchronously as soon as it is
full; at the end of backward (an autograd engine callback) the rest is launched, all are
waited for, and the sums are added to the parameters' `.grad`. Any other path to the
parameter (ops that relay it out first, `local_map`, ...) keeps the plain rule, so
`.grad` is always the plain-rule gradient plus the deferred sums: exact on every mix.

Each use's buffer collects every use of the backward (a tied embedding's lookup and
output projection): one all-reduce of their sum, not one per use.

Fully sharded parameters (`tm.nn.shard_parameters`) are all-gathered before use; their
gradient is reduce-scattered back (FSDP). Those reduce-scatters are deferred alike: each
use adds the gathered-shape partial gradient to the buffer, and a reduce-scatter bucket
(same axis and dtype) lays its parameters' blocks out member by member (FSDP2's chunk-cat)
so that one reduce-scatter leaves each device its block of every parameter. Where FSDP
prefetch knows the units (blocks) that read the parameters, a bucket holds one unit's (or,
under `UNIT_BUCKET_BYTES`, several): it is launched as soon as the next unit's gradients
come, and the full-size gradients go. `torch.autograd.grad`
(which runs no accumulator) and a reducer that is switched off fall back to the plain rule.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd import Function
from torch.autograd.graph import Node
from torch.utils.weak import WeakIdKeyDictionary

from torchmesh.comm.autograd import (
    _all_gather,
    _all_reduce,
    _backward_of,
    _needs_grad,
    _rec,
    _reduce_scatter,
    all_gather,
    sum_grad,
)
from torchmesh.comm.backend import Data, MeshImpl, Pending, Sizes, compiling
from torchmesh.placement.plan import Gather

#: DDP's default bucket size.
DEFAULT_BUCKET_MB = 25.0
#: A reduce-scatter bucket smaller than this at the end of its unit waits for the next
#: unit's gradients: tiny collectives cost their latency and save no memory to speak of.
UNIT_BUCKET_BYTES = 2**20


@dataclass
class GradSync:
    """One per backend instance: whether parameter gradients are deferred and bucketed,
    the bucket size, and this backward's buckets. `tm.nn.configure_grad_sync` sets it."""

    impl: MeshImpl
    enabled: bool = True
    bucket_bytes: int = int(DEFAULT_BUCKET_MB * 2**20)
    open: dict[tuple, _Bucket | _ScatterBucket] = field(default_factory=dict)
    launched: list[_Bucket | _ScatterBucket] = field(default_factory=list)
    callback_queued: bool = False

    def ready(self, param: ParamSync) -> None:
        """`param`'s uses in this backward are all done: bucket its partial sums."""
        for (kind, axes, dim), grads in param.partial.items():
            key = (kind, axes, grads[0].dtype, grads[0].device)
            bucket = self.open.get(key)
            if isinstance(bucket, _ScatterBucket) and bucket.unit != param.unit and bucket.bytes >= UNIT_BUCKET_BYTES:
                # FSDP: a unit's (a block's) gradients are done: scatter them, free the full-size ones
                # (and those of the units scattered before, whose reduce-scatters are done by now)
                for earlier in self.launched:
                    if isinstance(earlier, _ScatterBucket):
                        earlier.settle()
                self.launched.append(bucket.launch(self.impl))
                bucket = None
            if bucket is None:
                bucket = self.open[key] = _Bucket(axes) if kind == "all_reduce" else _ScatterBucket(axes[0], param.unit)
            bucket.add(param, grads, dim)
            if bucket.bytes >= self.bucket_bytes:
                self.launched.append(bucket.launch(self.impl))
                del self.open[key]
        param.partial = {}
        if not self.callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
            self.callback_queued = True

    def finish(self) -> None:
        """End of backward: launch what is left, wait for every bucket, add the sums to `.grad`."""
        self.callback_queued = False
        for bucket in self.open.values():
            self.launched.append(bucket.launch(self.impl))
        self.open.clear()
        launched, self.launched = self.launched, []
        for bucket in launched:
            bucket.deliver()


_SYNCS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # MeshImpl -> GradSync
_PARAMS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # first shard -> ParamSync


def grad_sync(impl: MeshImpl) -> GradSync:
    """The reducer of `impl` (created on first use)."""
    sync = _SYNCS.get(impl)
    if sync is None:
        sync = _SYNCS[impl] = GradSync(impl)
    return sync


class ParamSync:
    """A parameter's deferred-gradient state: its shards (one per local device), the anchor
    every deferred use takes as input, and this backward's partial sums per (collective,
    axes, dim)."""

    def __init__(self, impl: MeshImpl, shards: Sequence[torch.Tensor]) -> None:
        self.reducer = grad_sync(impl)
        # Weakly: `_PARAMS` is keyed weakly by the first shard, and a value that held its key
        # would keep every parameter (and the model's memory) alive after the model is deleted.
        self._shards = tuple(weakref.ref(t) for t in shards)
        device = shards[0].device
        self.anchor = torch.zeros((), device=device, requires_grad=True)
        self.zero = torch.zeros((), device=device)
        self.partial: dict[tuple[str, tuple[str, ...], int], Data] = {}
        #: The unit (block) that reads it, where FSDP prefetch has learned it (`comm.prefetch`):
        #: a reduce-scatter bucket holds one unit's gradients.
        self.unit: int | None = None
        # The anchor's gradient accumulator, kept alive so the engine can be asked whether
        # this backward runs it (it does not under torch.autograd.grad).
        view = self.anchor.view_as(self.anchor)
        accumulator = view.grad_fn.next_functions[0][0] if view.grad_fn is not None else None
        assert accumulator is not None
        self.accumulator: Node = accumulator
        self.anchor.register_post_accumulate_grad_hook(self._uses_done)

    @property
    def shards(self) -> tuple[torch.Tensor, ...]:
        """The parameter's shards (alive while the parameter is: its backward runs)."""
        return tuple(ref() for ref in self._shards)  # type: ignore[misc]

    def deferring(self) -> bool:
        """Whether this backward defers: the reducer is on and the anchor's accumulator runs."""
        return self.reducer.enabled and torch._C._will_engine_execute_node(self.accumulator)

    def add(self, key: tuple[str, tuple[str, ...], int], grads: Data) -> None:
        have = self.partial.get(key)
        self.partial[key] = grads if have is None else tuple(a + b for a, b in zip(have, grads))

    def _uses_done(self, anchor: torch.Tensor) -> None:
        anchor.grad = None
        if self.partial:
            self.reducer.ready(self)


def track(impl: MeshImpl, shards: Sequence[torch.Tensor]) -> None:
    """Defer the gradient reduction of the parameter whose local shards are `shards` (leaf
    tensors that require grad), on backends that defer (`impl.defers_grad_sync`)."""
    if impl.defers_grad_sync and shards and all(t.requires_grad and t.is_leaf for t in shards):
        _PARAMS[shards[0]] = ParamSync(impl, shards)


def tracked(ts: Data) -> ParamSync | None:
    """The deferred-gradient state of a parameter whose shards are exactly `ts`, if any."""
    if not ts:
        return None
    param = _PARAMS.get(ts[0])
    if param is None or len(param.shards) != len(ts) or any(a is not b for a, b in zip(param.shards, ts)):
        return None
    return param


def gather_param(impl: MeshImpl, ts: Data, step: Gather, sizes: Sizes, ready: Pending | None) -> Data:
    """The all-gather of a fully sharded parameter's shards `ts` (broadcast over the axis
    after it: its gradient is reduce-scattered), deferred and bucketed when `ts` are a
    tracked parameter's, its reducer is on and the blocks are even; `ready`: the gather,
    started earlier (`comm.prefetch`)."""
    param = None if compiling() else tracked(ts)
    k = impl.axis_size(step.axis)
    even = sizes is None or all(n % k == 0 for n in sizes)
    if param is None or not param.reducer.enabled or not even or k == 1 or not _needs_grad(ts):
        return all_gather(impl, ts, step.axis, step.dim, reduce_grad=True, sizes=sizes, ready=ready)
    return _DeferredGather.apply(impl, step, sizes, ready, param, param.anchor, *ts)


class _DeferredGather(Function):
    @staticmethod
    def forward(ctx: Any, impl: MeshImpl, step: Gather, sizes: Sizes, ready, param: ParamSync, anchor, *ts):
        ctx.impl, ctx.step, ctx.param, ctx.op = impl, step, param, impl.op_name()
        if ready is not None:
            return ready.wait()
        return _all_gather(impl, ts, step.axis, step.dim, sizes=sizes)

    @staticmethod
    def backward(ctx: Any, *grads):
        param: ParamSync = ctx.param
        step: Gather = ctx.step
        if param.deferring():
            param.add(("reduce_scatter", (step.axis,), step.dim), grads)
            return (None, None, None, None, None, param.zero, *(None for _ in grads))
        with _backward_of(ctx):
            grads = _reduce_scatter(ctx.impl, tuple(g.contiguous() for g in grads), step.axis, step.dim, "backward")
        return (None, None, None, None, None, None, *(g.contiguous() for g in grads))


def reduce_grad(impl: MeshImpl, ts: Data, axes: tuple[str, ...]) -> Data:
    """`sum_grad` for an op input: deferred and bucketed when `ts` are a tracked parameter's
    shards and its reducer is on, the plain per-use all-reduce otherwise."""
    if compiling():  # engine callbacks and weak-keyed state do not trace: the plain rule (docs/compile.md)
        return sum_grad(impl, ts, axes)
    param = tracked(ts)
    axes = impl.live_axes(axes)
    if param is None or not param.reducer.enabled or not axes or not _needs_grad(ts):
        return sum_grad(impl, ts, axes)
    return _DeferredSumGrad.apply(impl, axes, param, param.anchor, *ts)


class _DeferredSumGrad(Function):
    @staticmethod
    def forward(ctx: Any, impl: MeshImpl, axes: tuple[str, ...], param: ParamSync, anchor: torch.Tensor, *ts):
        ctx.impl, ctx.axes, ctx.param, ctx.op = impl, axes, param, impl.op_name()
        return tuple(t.view_as(t) for t in ts)

    @staticmethod
    def backward(ctx: Any, *grads):
        param: ParamSync = ctx.param
        if param.deferring():
            param.add(("all_reduce", ctx.axes, 0), grads)
            return (None, None, None, param.zero, *(None for _ in grads))
        with _backward_of(ctx):
            return (None, None, None, None, *_all_reduce(ctx.impl, grads, ctx.axes, "sum", "backward"))


class _Bucket:
    """Partial sums of several parameters over the same axes, flattened per device into one
    all-reduce."""

    def __init__(self, axes: tuple[str, ...]) -> None:
        self.axes = axes
        self.entries: list[tuple[ParamSync, Data]] = []
        self.bytes = 0
        self.pending: Any = None

    def add(self, param: ParamSync, grads: Data, dim: int = 0) -> None:
        self.entries.append((param, grads))
        self.bytes += grads[0].numel() * grads[0].element_size()

    def launch(self, impl: MeshImpl) -> _Bucket:
        devices = len(self.entries[0][1])
        flats = tuple(torch.cat([g[i].reshape(-1) for _, g in self.entries]) for i in range(devices))
        with impl.op_scope("gradient bucket"):
            _rec(impl, "all_reduce", self.axes, flats, "backward")
            self.pending = impl.all_reduce_async(flats, self.axes)
        return self

    def deliver(self) -> None:
        sums = self.pending.wait()
        offsets = [0] * len(sums)  # per device: uneven blocks differ in size between devices
        for param, grads in self.entries:
            for i, (shard, total, g) in enumerate(zip(param.shards, sums, grads)):
                n = g.numel()
                piece = total[offsets[i] : offsets[i] + n].view(shard.shape)
                offsets[i] += n
                if shard.grad is None:
                    shard.grad = piece
                else:
                    shard.grad.add_(piece)


class _ScatterBucket:
    """Gathered-shape partial gradients of several parameters stored split over `axis`,
    reduce-scattered in one collective: per device, the k blocks of every parameter (along
    its split dim) are laid out block by block (all parameters' block 0, then block 1, ...),
    so member j receives the sum of every parameter's block j, in order. Once launched it
    keeps only the gradients' shapes; once settled, only the sums (`settle`)."""

    def __init__(self, axis: str, unit: int | None) -> None:
        self.axis, self.unit = axis, unit
        self.entries: list[tuple[ParamSync, Data, int]] = []
        self.shapes: list[tuple[ParamSync, tuple[torch.Size, ...], int]] = []
        self.bytes = 0
        self.pending: Any = None
        self.sums: Data | None = None

    def add(self, param: ParamSync, grads: Data, dim: int = 0) -> None:
        self.entries.append((param, grads, dim))
        self.bytes += grads[0].numel() * grads[0].element_size()

    def launch(self, impl: MeshImpl) -> _ScatterBucket:
        k = impl.axis_size(self.axis)
        flats = tuple(
            torch.cat([g[i].movedim(dim, 0).reshape(k, -1) for _, g, dim in self.entries], dim=1).reshape(-1)
            for i in range(len(self.entries[0][1]))
        )
        with impl.op_scope("gradient bucket"):
            _rec(impl, "reduce_scatter", (self.axis,), flats, "backward")
            self.pending = impl.reduce_scatter_async(flats, self.axis, 0)
        # the full-size gradients go (the flats hold their values until the collective is done)
        self.shapes = [(param, tuple(g.shape for g in grads), dim) for param, grads, dim in self.entries]
        self.entries = []
        return self

    def settle(self) -> None:
        """Wait for the reduce-scatter; keep its sums, let its buffers (the full-size flats) go."""
        if self.sums is None:
            self.sums = self.pending.wait()
            self.pending = None

    def deliver(self) -> None:
        self.settle()
        assert self.sums is not None
        offsets = [0] * len(self.sums)
        for param, shapes, dim in self.shapes:
            for i, (shard, total, shape) in enumerate(zip(param.shards, self.sums, shapes)):
                moved = (shape[dim], *shape[:dim], *shape[dim + 1 :])  # the shape moved to put dim first
                n = shape.numel() // moved[0] * shard.shape[dim]
                piece = total[offsets[i] : offsets[i] + n].view(shard.shape[dim], *moved[1:]).movedim(0, dim)
                piece = piece.contiguous()  # the parameter's own layout (a copy only when dim > 0)
                offsets[i] += n
                if shard.grad is None:
                    shard.grad = piece
                else:
                    shard.grad.add_(piece)
