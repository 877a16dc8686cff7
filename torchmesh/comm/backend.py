"""The backend contract (Mesh TF's MeshImpl): slice-wise compute and six collectives.

A MeshTensor's data is a tuple of local tensors: one per device on `sim`, one (this rank's
shard) on `dist`, one (the global tensor) on `xla`. A backend supplies only the raw,
non-differentiable collectives over such tuples; `comm/autograd.py` pairs them with their
conjugates once for every backend, and the op definitions in `torchmesh/tensor/` use
nothing else.

`slice_mesh` is the mesh the local tensors are cut by. It is the real mesh on `sim` and
`dist`; on `xla` every axis has size 1 there (each local tensor is the global one, and the
XLA partitioner does the cutting), so every collective short-circuits to the identity.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from torchmesh.placement.layout import TensorLayout, local_slices
from torchmesh.placement.mesh_shape import MeshShape
from torchmesh.placement.op_plan import OpPlan

Data = tuple[torch.Tensor, ...]
#: Per local tensor, the size a dim has once gathered (None: blocks are even).
Sizes = tuple[int, ...] | None


class Pending(Protocol):
    """A collective in flight: `wait()` blocks until it is done and gives its result."""

    def wait(self) -> Data: ...


@dataclass(frozen=True)
class Done:
    """A collective that finished when it was started."""

    result: Data

    def wait(self) -> Data:
        return self.result


class MeshImpl:
    """Base class of the backends. Subclasses set `name` and the facts below, and implement the
    raw collectives. Code outside `comm/` and `xla/` reads these facts, never the backend's name
    or a device type (tests/house/test_backend_facts.py)."""

    name: str = "?"
    default_device = torch.device("cpu")

    # ---- facts: what callers may rely on ---------------------------------------------------
    #: Data holds one local tensor per device of the mesh, every one in this process (sim).
    holds_every_shard: bool = False
    #: One process per device: collectives cross processes and every rank makes the same calls (dist).
    multi_process: bool = False
    #: Whether reading a value on the host is cheap: true where tensors hold their values now
    #: (sim, dist); false on xla (a read runs the pending program) and abstract (no values).
    #: Value checks (ids in range) run only where it is, or in check mode.
    reads_values: bool = True
    #: Whether tensors have values (false on abstract: meta tensors, shapes only; nothing is drawn).
    holds_values: bool = True
    #: Whether saved tensors have storages that FSDP's regather hooks recognise (false on xla).
    can_regather: bool = True
    #: How checkpoints hold values: "global" (whole tensors) or "per_rank" (each rank's blocks, as DTensors).
    checkpoint_form: Literal["global", "per_rank"] = "global"
    #: torch's DeviceMesh over the mesh's processes, where there is one (dist): DTensor interop.
    device_mesh: Any = None
    #: The most devices a mesh of this backend may have (None: no limit of its own).
    max_devices: int | None = None
    #: Whether parameter gradients are reduced once per backward in buckets (`comm.grad_sync`)
    #: rather than at each use (false on xla, whose compiler schedules the collectives).
    defers_grad_sync: bool = True
    #: Whether `all_reduce_inplace` sums a local tensor where it lies (dist): an op's finishing
    #: all-reduce of a result it just made then needs no copy and no autograd node.
    all_reduces_in_place: bool = False
    #: Whether `annotate` does anything (xla marks shardings): new MeshTensors skip the call otherwise.
    annotates: bool = False

    # ---- check mode and the running op -------------------------------------------------------
    #: True when every collective is first verified across ranks (`verify`); ops then also
    #: set `current_op` so that errors can name them.
    checking: bool = False
    #: The running op's name while checking ("" outside ops); on dist, a marker while an agreed op runs.
    current_op: str = ""
    #: The running op, named lazily (a string or a function giving it): what errors name.
    _naming: str | Callable[[], str] = ""
    #: Whether this process prints collective output such as `tm.show` (rank 0 only on dist).
    prints: bool = True

    def __init__(self, shape: MeshShape, slice_mesh: MeshShape | None = None, rules: str = "") -> None:
        """`rules`: the mesh's layout rules as text (the dist backend agrees on them across ranks)."""
        self.shape = shape
        self.slice_mesh = slice_mesh or shape
        names, sizes = self.slice_mesh.names, self.slice_mesh.sizes
        self._axis_index = {n: i for i, n in enumerate(names)}
        self._axis_size = dict(zip(names, sizes))

    # ---- what the devices of this process are -------------------------------------------
    @property
    def local_coords(self) -> tuple[tuple[int, ...], ...]:
        """Mesh coordinates (in `slice_mesh`) of each local tensor of a Data tuple."""
        raise NotImplementedError

    def axis_size(self, axis: str) -> int:
        return self._axis_size[axis]

    def live_axes(self, axes: Iterable[str]) -> tuple[str, ...]:
        """`slice_mesh.live_axes(axes)` for axes of this mesh, by one dict lookup each (the
        collectives' hot path, eager and traced)."""
        return tuple(a for a in axes if self._axis_size[a] > 1)

    def coord(self, coords: tuple[int, ...], axis: str) -> int:
        return coords[self._axis_index[axis]]

    # ---- slice-wise computation ----------------------------------------------------------
    def slicewise(self, fn: Callable[..., torch.Tensor], *datas: Data) -> Data:
        """Apply `fn` to each device's local tensors."""
        return tuple(fn(*ts) for ts in zip(*datas))

    def slicewise_at(self, fn: Callable[..., torch.Tensor], *datas: Data) -> Data:
        """Like `slicewise`, passing each device's mesh coordinates first: fn(coords, *locals)."""
        return tuple(fn(c, *ts) for c, ts in zip(self.local_coords, zip(*datas)))

    def make(self, fn: Callable[[tuple[int, ...]], torch.Tensor]) -> Data:
        """Build data from a function of each device's coordinates."""
        return tuple(fn(c) for c in self.local_coords)

    # ---- raw collectives (no autograd; `comm/autograd.py` wraps them) ---------------------
    def all_reduce(self, ts: Data, axes: tuple[str, ...], op: str) -> Data:
        raise NotImplementedError

    def all_reduce_inplace(self, ts: Data, axes: tuple[str, ...]) -> Data:
        """Sum `ts` over `axes` in place and return them (where `all_reduces_in_place`). The
        caller owns `ts`: fresh contiguous results no autograd node has saved."""
        raise NotImplementedError

    def all_reduce_async(self, ts: Data, axes: tuple[str, ...], op: str = "sum") -> Pending:
        """Start `all_reduce` of `ts` (which it may overwrite); `.wait()` gives the result.
        Backends without asynchronous collectives finish it here."""
        return Done(self.all_reduce(ts, axes, op))

    def all_gather(self, ts: Data, axis: str, dim: int, sizes: Sizes = None) -> Data:
        """Concatenate the group's blocks along `dim`, in group order. `sizes` (one per local
        tensor) is the gathered size along `dim` when the blocks may be uneven (None: every
        block has the local size); the blocks are then that size's balanced split."""
        raise NotImplementedError

    def all_gather_async(self, ts: Data, axis: str, dim: int, sizes: Sizes = None) -> Pending:
        """Start `all_gather`; `.wait()` gives the result (FSDP prefetch). Backends without
        asynchronous collectives finish it here."""
        return Done(self.all_gather(ts, axis, dim, sizes))

    def reduce_scatter(self, ts: Data, axis: str, dim: int) -> Data:
        """Sum over the group and keep this device's balanced block along `dim`."""
        raise NotImplementedError

    def reduce_scatter_async(self, ts: Data, axis: str, dim: int) -> Pending:
        """Start `reduce_scatter` (blocks even); `.wait()` gives the result (FSDP's gradient
        buckets). Backends without asynchronous collectives finish it here."""
        return Done(self.reduce_scatter(ts, axis, dim))

    def all_to_all(self, ts: Data, axis: str, gather_dim: int, split_dim: int, sizes: Sizes = None) -> Data:
        """Split `split_dim` into the group's balanced blocks, send block j to member j, and
        concatenate what arrives along `gather_dim`; `sizes`: the gathered size along
        `gather_dim` per local tensor, as for `all_gather`."""
        raise NotImplementedError

    def shift(self, ts: Data, axes: tuple[str, ...], offset: int, wrap: bool) -> Data:
        """Each device receives the tensor of the device `offset` blocks before it along `axes`
        (block order: first axis major); devices with no such sender get zeros unless `wrap`."""
        raise NotImplementedError

    def split(self, ts: Data, axis: str, dim: int) -> Data:
        """Keep this device's block over `axis` along `dim` (local, no communication): blocks
        differ in size by at most one, the larger first (`placement.mesh_shape.balanced`)."""
        k = self.axis_size(axis)
        i = self._axis_index[axis]
        return tuple(t.tensor_split(k, dim)[c[i]] for t, c in zip(ts, self.local_coords))

    # ---- global values ------------------------------------------------------------------
    def from_global(self, tensor: torch.Tensor, layout: TensorLayout) -> Data:
        """Each device's block of a global tensor (every process passes the same tensor)."""
        return self.make(lambda c: tensor[local_slices(layout, self.slice_mesh, c)].clone())

    def global_value(self, data: Data) -> torch.Tensor:
        """The global tensor from fully replicated data."""
        return data[0]

    def device_shards(self, data: Data) -> tuple[MeshShape, list[tuple[tuple[int, ...], torch.Tensor]]]:
        """The blocks this process can show (for printing): the mesh their coordinates are on,
        and (coordinates, block) pairs. Here the local tensors; on xla, each device's block."""
        return self.slice_mesh, list(zip(self.local_coords, data))

    def block_slices(self, layout: TensorLayout, coords: tuple[int, ...]) -> tuple[slice, ...]:
        """The global index ranges the device at `coords` (on the real mesh) holds: the layout's
        balanced blocks here; on xla, the partitioner's own tiles (they differ for some uneven
        sizes)."""
        return local_slices(layout, self.shape, coords)

    # ---- hooks ----------------------------------------------------------------------------
    def annotate(self, ts: Data, layout: Any) -> Data:
        """Called on every new MeshTensor's data; the XLA backend marks its sharding here."""
        return ts

    def sync(self) -> None:
        """Called at the end of a step (`mesh.sync()`): the XLA backend runs its pending program."""

    def verify(
        self, kind: str, axes: tuple[str, ...], tensor: torch.Tensor, phase: str, whole: tuple[int, int] | None = None
    ) -> None:
        """Called before each collective when `checking`: raise unless every rank agrees."""

    def begin_op(self, plan: OpPlan, dtypes: tuple, describe: Callable[[], str]) -> tuple | None:
        """An op with this cached plan (and input dtypes) starts; `describe()` names it. When
        checking, it becomes `current_op` (named by errors) until `end_op`; the dist backend also
        agrees on each new plan with the other ranks here. Returns what `end_op` restores
        (None inside torch.compile, which traces no naming: see `compiling`)."""
        return None if compiling() else self.enter_op(plan, dtypes, describe)

    def enter_op(self, plan: OpPlan, dtypes: tuple, describe: Callable[[], str]) -> tuple:
        """`begin_op` in eager code (the caller knows torch.compile is not tracing)."""
        saved = (self.current_op, self._naming)
        if self.checking:
            self.current_op = self._naming = describe()
        else:
            self._naming = describe
        return saved

    def end_op(self, saved: tuple | None) -> None:
        """The op begun by `begin_op` ended (or raised): the op named before it is current again."""
        if saved is not None:
            self.current_op, self._naming = saved

    def op_scope(self, describe: str | Callable[[], str]) -> OpScope | contextlib.nullcontext:
        """Context manager: the collectives run in the block belong to the op `describe` names
        (a relayout, a shift, `x.full()`, the backward of an op), so a mismatch or a timeout
        names it; inside another op's scope the name is "<this> in <that>".

        >>> from torchmesh.comm.sim import SimImpl
        >>> impl = SimImpl(MeshShape.parse("dp:2"))
        >>> impl.checking = True  # (only the dist backend checks: Mesh(..., check=True))
        >>> with impl.op_scope("slice(x, 'seq', 0, 2)"), impl.op_scope(lambda: "relayout"):
        ...     impl.op_name()
        "relayout in slice(x, 'seq', 0, 2)"
        >>> impl.op_name()
        ''

        Inside torch.compile, no scope (nothing is named there): a `nullcontext`, which dynamo
        lets a graph break or a retrace cross, where it would refuse one inside a user's
        context manager.
        """
        if compiling():
            return contextlib.nullcontext()
        return OpScope(self, describe)

    def op_name(self) -> str:
        """The running op as errors name it ("" when none). Only where ranks can disagree (check
        mode, or several processes) is a lazily named op described; elsewhere nothing reads it."""
        if compiling():
            return ""
        if self.checking or not self.multi_process:
            return self.current_op
        return _text(self._naming)

    def agree_call(self, what: str) -> None:
        """Every rank must be making this call (`what`, e.g. "x.full()") now: the dist backend
        raises on every rank otherwise (a rank-0-only call), instead of hanging."""


#: Whether torch.compile is tracing the running code (`torch.compiler.is_dynamo_compiling`,
#: which dynamo reads as True; eagerly a function returning False, bound here so the check is
#: one Python call per op or collective: `is_compiling` is two, and also true under non-strict
#: torch.export, which runs this code as Python and needs no traced form). Compiled programs
#: keep the values and the collectives but none of eager's bookkeeping: op names for error
#: messages, first-use agreement and check mode (dist), `comm_stats` records and the bucketed
#: gradient reduction (docs/compile.md).
compiling = torch.compiler.is_dynamo_compiling


def _text(name: str | Callable[[], str]) -> str:
    return name() if callable(name) else name


class OpScope:
    """`MeshImpl.op_scope`: names the running op for the block (restores the previous one after)."""

    __slots__ = ("describe", "impl", "saved")

    def __init__(self, impl: MeshImpl, describe: str | Callable[[], str]) -> None:
        self.impl, self.describe = impl, describe

    def __enter__(self) -> OpScope:
        impl, describe = self.impl, self.describe
        self.saved = (impl.current_op, impl._naming)
        outer = impl._naming
        if outer:
            describe = functools.partial(_nested, describe, outer)
        if impl.checking:
            impl.current_op = impl._naming = _text(describe)
        else:
            impl._naming = describe
        return self

    def __exit__(self, *exc: object) -> None:
        self.impl.current_op, self.impl._naming = self.saved


def _nested(inner: str | Callable[[], str], outer: str | Callable[[], str]) -> str:
    return f"{_text(inner)} in {_text(outer)}"
