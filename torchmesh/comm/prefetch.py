"""FSDP prefetch: the all-gathers of the parameters the program reads next, started early.

With fully sharded parameters (`tm.nn.shard_parameters`) every read of a parameter is an
all-gather over the axes it is stored split on (and, with regather, again in backward).
Synchronous, each one stalls the computation. A `Prefetcher` learns the order of those
gathers from the first step: a sequence of (parameter, relayout) keys, grouped by the unit
(a Transformer block, say: `shard_parameters` picks them) that read them (forward), or by
the unit whose backward regathers them (backward). From then on each group's gathers run as
one flat all-gather (FSDP2's), started asynchronously (`MeshImpl.all_gather_async`) `depth`
groups ahead: when group g's second gather is taken, the next `depth` groups' start, and they
run while the rest of group g computes. When group g's first gather is taken, its started
gathers are waited for: the collectives' own buffers go (their inputs, and gloo's staging
copy of the result, which it holds while the gather runs), every parameter's gathered tensor
is cut out of the flat result (FSDP2's copy-out) and the flat goes. So at most `depth + 1`
groups' gathered parameters are alive at a time, and the next groups' buffers are not added
to those of a unit's first op: in backward that op (the widest gradient of the first block,
every activation still alive) is where a training step's memory peaks.

The model's own reads (the root's, outside the blocks) make a group wherever they run
together: the embedding's before the blocks, the final norm's and head's after them
(torchtitan's units).

Results are the synchronous gathers' own (the same collective, started earlier). A program
whose order of reads changes (a branch) re-learns it: a gather that is not where the
sequence said runs synchronously, and started gathers nobody takes are waited for and
dropped at the start of the next step's first group. Nothing is prefetched in check mode
(each collective is verified as it runs) or inside torch.compile (the compiler schedules).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch.utils.weak import WeakIdKeyDictionary

from torchmesh.comm import grad_sync, stats
from torchmesh.comm.backend import Data, Done, MeshImpl, Pending, Sizes, compiling
from torchmesh.placement.layout import TensorLayout
from torchmesh.placement.plan import Gather, Step, step_sizes

#: The unit (a block, or the model itself) whose forward is running (its id), set by
#: `shard_parameters`' hooks: the group of the gathers made now.
_MODULE: ContextVar[int] = ContextVar("torchmesh_prefetch_module", default=0)

#: (parameter, relayout steps): one gather of one parameter.
Key = tuple[int, tuple[Step, ...]]


@dataclass
class _Sequence:
    """The learned order of one phase's gathers: keys, their group numbers (0, 1, ... in
    order), and the keys of each group."""

    keys: list[Key] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    members: list[list[Key]] = field(default_factory=list)  # group -> its keys
    first: dict[Key, int] = field(default_factory=dict)  # key -> first position
    last_tag: object = None
    cursor: int = 0

    def locate(self, key: Key, tag: object) -> int:
        """The position of this gather: where the cursor is if it matches, else its first
        position (a new step, or a branch), else a new entry (learning; `tag` names its
        group: a new group starts where the tag changes)."""
        if self.cursor < len(self.keys) and self.keys[self.cursor] == key:
            pos = self.cursor
        elif key in self.first:
            pos = self.first[key]
        else:
            pos = len(self.keys)
            if not self.members or tag != self.last_tag:
                self.members.append([])
            self.keys.append(key)
            self.groups.append(len(self.members) - 1)
            self.members[-1].append(key)
            self.first[key], self.last_tag = pos, tag
        self.cursor = pos + 1
        return pos


@dataclass
class _Source:
    """A sharded parameter: its shards and stored layout (what a gather starts from)."""

    shards: Data
    layout: TensorLayout


class Prefetcher:
    """The gathers of one model's sharded parameters on one backend: their learned order and
    those in flight."""

    def __init__(self, impl: MeshImpl, depth: int) -> None:
        self.impl, self.depth = impl, depth
        self.sources: dict[int, _Source] = {}  # id(first shard) -> source
        self.phases = {"forward": _Sequence(), "backward": _Sequence()}
        self.forward_group: dict[int, int] = {}  # id(first shard) -> group of its first forward read
        self.in_flight: dict[tuple[str, Key], Pending] = {}
        self.started: set[tuple[str, int]] = set()  # (phase, group) started this step
        self.finished: set[tuple[str, int]] = set()  # (phase, group) waited for this step

    def add(self, shards: Data, layout: TensorLayout) -> None:
        """Prefetch the gathers of this parameter. The model keeps its prefetcher alive;
        the parameters point to it weakly (it holds them: a strong link would keep both)."""
        self.sources[id(shards[0])] = _Source(tuple(shards), layout)
        _PREFETCHERS[shards[0]] = weakref.ref(self)

    def take(self, data: Data, steps: tuple[Step, ...], phase: str) -> Pending | None:
        """The gather of `data` (a source's shards) by `steps` if it was started early (None:
        run it now); at its group's second gather, starts the gathers of the next `depth` groups."""
        key: Key = (id(data[0]), steps)
        seq = self.phases[phase]
        before = seq.cursor
        # forward: grouped by the module reading; backward: by the module that read in forward
        tag = self.forward_group.get(key[0]) if phase == "backward" else _MODULE.get()
        pos = seq.locate(key, tag)
        if pos < before:  # back to the start: a new step
            self._drop(phase)
        group = seq.groups[pos]
        if phase == "forward" and key[0] not in self.forward_group:
            self.forward_group[key[0]] = group
            synced = grad_sync.tracked(data)
            if synced is not None:  # its gradient is reduce-scattered with its unit's
                synced.unit = group
        if (phase, group) not in self.started and len(seq.keys) <= before:  # known, not started: all of it now
            self._start_group(phase, seq.members[group])
        self.started.add((phase, group))
        members = seq.members[group]
        if key == members[min(1, len(members) - 1)]:  # the group's second gather (its first, if alone):
            # the unit's first op has run; the next groups' gathers run while the rest computes
            for g in range(group + 1, min(group + self.depth + 1, len(seq.members))):
                if (phase, g) not in self.started:
                    self.started.add((phase, g))
                    self._start_group(phase, seq.members[g])
        if (phase, group) not in self.finished:
            self.finished.add((phase, group))
            self._finish(phase, members)
        return self.in_flight.pop((phase, key), None)

    def _start_group(self, phase: str, keys: list[Key]) -> None:
        """Start a group's gathers: those over the same axis with even blocks and one dtype
        as one all-gather of their shards laid end to end (FSDP2's flat all-gather), the
        others one by one."""
        impl = self.impl
        buckets: dict[tuple, list[tuple[Key, _Source, Gather]]] = {}
        for key in keys:
            source = self.sources.get(key[0])
            if source is None or (phase, key) in self.in_flight:
                continue
            (step,) = key[1]
            assert isinstance(step, Gather)
            (sizes,) = step_sizes(source.layout, key[1], impl.slice_mesh, impl.local_coords)
            k = impl.axis_size(step.axis)
            if sizes is None or all(n == k * t.shape[step.dim] for n, t in zip(sizes, source.shards)):
                buckets.setdefault((step.axis, source.shards[0].dtype), []).append((key, source, step))
            else:  # uneven blocks: a gather of its own
                self._start_one(phase, key, source, step, sizes)
        for (axis, _), members in buckets.items():
            if len(members) == 1:
                self._start_one(phase, *members[0], None)
                continue
            devices = len(members[0][1].shards)
            flats = tuple(torch.cat([s.shards[i].detach().reshape(-1) for _, s, _ in members]) for i in range(devices))
            with impl.op_scope(f"prefetch ({phase})"):
                _record(impl, flats, Gather(axis, 0), None, phase)
                started = _FlatGather(impl.all_gather_async(flats, axis, 0, None), impl.axis_size(axis))
            offset = 0
            for key, source, step in members:
                self.in_flight[(phase, key)] = _Piece(started, offset, source.shards, step.dim)
                offset += source.shards[0].numel()

    def _start_one(self, phase: str, key: Key, source: _Source, step: Gather, sizes: Sizes) -> None:
        impl = self.impl
        shards = tuple(t.detach() for t in source.shards)
        with impl.op_scope(f"prefetch ({phase})"):
            _record(impl, shards, step, sizes, phase)
            self.in_flight[(phase, key)] = impl.all_gather_async(shards, step.axis, step.dim, sizes)

    def _finish(self, phase: str, keys: list[Key]) -> None:
        """Wait for the started gathers of these keys (a group's, when its first is taken):
        the collectives' own buffers go (their inputs; gloo's staging copy of the result),
        each flat gather's members are cut out of it and the flat goes; the results stay
        until taken."""
        for key in keys:
            pending = self.in_flight.get((phase, key))
            if isinstance(pending, _Piece):
                pending.flat.wait()
            elif pending is not None and not isinstance(pending, Done):
                self.in_flight[(phase, key)] = Done(pending.wait())

    def _drop(self, phase: str) -> None:
        """A new step begins: gathers started for the last one and never taken are finished
        and dropped (the collective ran on every rank alike; only its result goes)."""
        for k in [k for k in self.in_flight if k[0] == phase]:
            self.in_flight.pop(k).wait()
        self.started = {s for s in self.started if s[0] != phase}
        self.finished = {s for s in self.finished if s[0] != phase}


class _FlatGather:
    """One all-gather of several parameters' shards laid end to end. Once it is waited for,
    every member's gathered tensors are cut out of it at once and the flat goes (FSDP2's
    copy-out): each member's then lives until it is taken and used."""

    def __init__(self, pending: Pending, k: int) -> None:
        self.pending: Pending | None = pending
        self.k = k
        self.members: dict[int, tuple[tuple[torch.Size, ...], int]] = {}  # offset -> (shapes, split dim)
        self.pieces: dict[int, Data] | None = None

    def wait(self) -> None:
        if self.pieces is not None:
            return
        assert self.pending is not None
        flat = self.pending.wait()
        self.pending = None  # the collective's own buffers (its input, gloo's staging copy) go
        self.pieces = {at: self._cut(flat, at, shapes, dim) for at, (shapes, dim) in self.members.items()}

    def _cut(self, flat: Data, at: int, shapes: tuple[torch.Size, ...], dim: int) -> Data:
        """A member's gathered tensors: its k blocks (which lie together in each member of
        the flat, one per device of the axis) put together along its split dim."""
        out = []
        for whole, shape in zip(flat, shapes):
            n, stride = shape.numel(), whole.numel() // self.k
            blocks = [whole[j * stride + at : j * stride + at + n].view(shape) for j in range(self.k)]
            out.append(torch.cat(blocks, dim))
        return tuple(out)

    def take(self, at: int) -> Data:
        self.wait()
        assert self.pieces is not None
        return self.pieces.pop(at)


class _Piece:
    """One parameter's gather out of a `_FlatGather`, at `offset` in each of its members."""

    def __init__(self, flat: _FlatGather, offset: int, shards: Data, dim: int) -> None:
        self.flat, self.offset = flat, offset
        flat.members[offset] = (tuple(t.shape for t in shards), dim)
        self.result: Data | None = None

    def wait(self) -> Data:
        if self.result is None:
            self.result = self.flat.take(self.offset)
        return self.result


def _record(impl: MeshImpl, shards: Data, step: Gather, sizes: Sizes, phase: str) -> None:
    if stats.recording():
        whole = None if sizes is None else (step.dim, sizes[0])
        stats.record("all_gather", (step.axis,), impl.axis_size(step.axis), shards[0], phase, whole)


_PREFETCHERS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # first shard -> weakref to its Prefetcher


def prefetched(impl: MeshImpl, data: Data, steps: tuple[Gather], phase: str) -> Pending | None:
    """The started gather of `data` by `steps` if it is a prefetched parameter's (None: run
    the gather now). Called by the executor for every single-gather relayout."""
    if not data or impl.checking or compiling() or not torch.is_tensor(data[0]):
        return None
    ref = _PREFETCHERS.get(data[0])
    prefetcher = ref() if ref is not None else None
    if prefetcher is None or prefetcher.impl is not impl or impl.axis_size(steps[0].axis) == 1:
        return None  # not a prefetched parameter; or on xla (the partitioner gathers)
    return prefetcher.take(data, steps, phase)


@contextmanager
def gathers_of(module: object):
    """The gathers made in this block belong to `module`'s group (`shard_parameters` runs
    each unit's forward in it)."""
    token = _MODULE.set(id(module))
    try:
        yield
    finally:
        _MODULE.reset(token)
