"""Abstract evaluation of one training step: what a device computes, sends and holds.

`profile_step(builder, mesh, rules)` builds the model on a mesh with the `abstract` backend
(one representative shard per tensor, on torch's meta device: no data, no processes), runs
the loss forward and backward, and records:

- every collective, through `tm.comm_stats()` (the same records, bytes per device, as a
  real run on `sim` or `dist`), summed by (kind, axes, phase);
- the FLOPs of the device's local kernels, forward and backward, through torch's
  `FlopCounterMode` (matmuls and einsums; elementwise ops are not counted);
- memory per device: parameter shards, their gradients, optimizer state (AdamW: two
  moments per parameter; Adafactor: a row and a column accumulator per matrix, a full one
  for vectors; SGD: none), and the activations autograd saves for backward (sizes of the
  tensors `saved_tensors_hooks` sees during forward, each storage once, parameters not
  counted twice; tensors a rematerialized block keeps, `note_saved`; tensors kept under
  other saved-tensor hooks, such as FSDP's regather, `_counting_nested_hooks`, while those
  hooks' replacements, the regathered parameters, are not); and, with fully sharded
  parameters (`tm.nn.shard_parameters`), the gathered parameters alive at once: each FSDP
  unit's gathered bytes (`gathered_units`) and the largest gathered parameter, from which
  `StepProfile.gathered_bytes` bounds what prefetching keeps alive. Activations peak at
  the end of forward; the reported peak is the sum of the five, an upper bound (gradients
  fill in as activations are freed).

A model is given as a *builder*: `builder(mesh) -> (module, loss_fn)`, where `module` is a
`torch.nn.Module` (typically a `tm.nn.Module`) holding the parameters and `loss_fn()` runs
one forward pass and returns the 0-d MeshTensor loss. The builder must make its inputs and
parameters with torchmesh constructors (`tm.randn`, `tm.zeros`, `tm.nn` layers), which
draw nothing on the abstract backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from torchmesh.comm.stats import comm_stats
from torchmesh.errors import PlanningError
from torchmesh.nn.fsdp import prefetch_depth, shard_parameters
from torchmesh.nn.fsdp import units as fsdp_units
from torchmesh.nn.parameter import mesh_parameters, own_mesh_parameters
from torchmesh.placement.layout import local_shape, resolve
from torchmesh.placement.mesh_shape import MeshShape, MeshShapeLike
from torchmesh.placement.rules import RulesLike
from torchmesh.tensor.mesh import Mesh
from torchmesh.tensor.mesh_tensor import MeshTensor

Builder = Callable[[Mesh], tuple[torch.nn.Module, Callable[[], MeshTensor]]]
CommKey = tuple[str, tuple[str, ...], str]  # (kind, axes, phase)
OPTIMIZERS = ("adamw", "adafactor", "sgd")
_COUNTING: list[_SavedTensors] = []


@dataclass(frozen=True, slots=True)
class StepProfile:
    """Per-device counts of one training step (bytes, FLOPs), from abstract evaluation.

    Profiles are linear in the model's layers, so they add, subtract and scale
    (`extrapolate` uses this to evaluate a deep model from one- and two-layer ones), but for
    the gathered parameters of fully sharded models (`gathered_units`, `gathered_largest`),
    which are per unit, not summed: a deeper model has more units of the same size, so
    `combine` repeats the extra layer's units and keeps the largest parameter.

    >>> import torchmesh as tm
    >>> from torchmesh import planning
    >>> config = tm.nn.LMConfig(vocab=64, d_model=16, heads=2, d_head=8, ff=32, layers=1, seq=8)
    >>> p = planning.profile_step(planning.lm_builder(config, batch=4), "dp:2;tp:2", "batch:dp;heads:tp;ff:tp;vocab:tp")
    >>> p.counts(), p.comm_bytes, p.param_bytes
    ({'all_reduce': 11}, 15556, 9216)
    """

    mesh: MeshShape
    rules: str
    param_rules: str  # how parameters are stored on top of `rules` (FSDP), "" if as computed
    comm: tuple[tuple[CommKey, int, int], ...]  # ((kind, axes, phase), count, bytes), sorted
    flops: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    #: Fully sharded parameters: bytes per device of each FSDP unit's parameters once
    #: gathered (the model's own first, then the units that have some, in the order their
    #: forward runs; `tm.nn.shard_parameters` gathers a unit's parameters together); () if
    #: none are gathered. Not linear in layers: `combine` repeats the extra layer's units.
    gathered_units: tuple[int, ...] = ()
    gathered_largest: int = 0  # the largest gathered parameter, bytes per device
    prefetch: int = 1  # units gathered ahead (`shard_parameters(prefetch=)`)

    @property
    def comm_bytes(self) -> int:
        return sum(b for _, _, b in self.comm)

    @property
    def gathered_bytes(self) -> int:
        """Gathered parameters alive at once, bytes per device (0 unless parameters are fully
        sharded). With `prefetch` p >= 1: the p + 1 consecutive units' flat all-gather buffers
        (the unit in use and the p started ahead, in forward and again in backward), the most
        over any such window (the model's own parameters, read before and after the blocks,
        are counted next to every window of p blocks), plus the largest gathered parameter (an
        op's copy of it out of its unit's buffer). With p = 0, gathers are synchronous, one op
        at a time: the largest block (an upper bound on one op's parameters) beside the model's
        own (those read after the blocks are kept for backward, `tm.nn.shard_parameters`).

        >>> from torchmesh import planning
        >>> p = planning.StepProfile("dp:2", "", "d_model:dp", (), 0, 0, 0, 0, 0, gathered_units=(8, 100, 500, 500, 100),
        ...                          gathered_largest=50, prefetch=1)
        >>> p.gathered_bytes   # two blocks, and one parameter out of a buffer
        1050
        >>> from dataclasses import replace
        >>> replace(p, prefetch=2).gathered_bytes, replace(p, prefetch=0).gathered_bytes
        (1150, 508)
        """
        if not self.gathered_units:
            return 0
        own, blocks = self.gathered_units[0], self.gathered_units[1:]
        if self.prefetch == 0:
            return own + max(blocks, default=0)
        n = self.prefetch + 1
        return max(_window(blocks, n), own + _window(blocks, n - 1)) + self.gathered_largest

    @property
    def memory_bytes(self) -> int:
        """Peak memory per device (upper bound): parameters, gradients, optimizer state,
        activations, and the gathered parameters prefetching keeps alive (`gathered_bytes`)."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes + self.gathered_bytes

    def bytes_by_axes(self) -> dict[tuple[str, ...], int]:
        out: dict[tuple[str, ...], int] = {}
        for (_, axes, _), _, b in self.comm:
            out[axes] = out.get(axes, 0) + b
        return out

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (kind, _, _), n, _ in self.comm:
            out[kind] = out.get(kind, 0) + n
        return out

    def combine(self, other: StepProfile, a: int, b: int) -> StepProfile:
        """The profile a * self + b * other (integer weights; used to extrapolate layers).

        The gathered units do not add: with `a + b == 1` (extrapolation: self has n layers,
        other n + 1, the result n + b), the units other has beyond self's, one layer's, are
        repeated b times, and the largest gathered parameter is the larger of the two. Other
        weights are a ValueError when the profiles gather parameters.
        """
        comm: dict[CommKey, list[int]] = {}
        for weight, prof in ((a, self), (b, other)):
            for key, n, nbytes in prof.comm:
                acc = comm.setdefault(key, [0, 0])
                acc[0] += weight * n
                acc[1] += weight * nbytes
        if (self.gathered_units or other.gathered_units) and (a + b != 1 or b < 0 or self.prefetch != other.prefetch):
            raise ValueError(
                f"StepProfile.combine: gathered parameters only extrapolate over layers (a + b == 1, b >= 0, "
                f"one prefetch depth); got a={a}, b={b}, prefetch {self.prefetch} and {other.prefetch}."
            )
        return StepProfile(
            self.mesh,
            self.rules,
            self.param_rules,
            tuple(sorted((k, n, nb) for k, (n, nb) in comm.items() if n or nb)),
            **{f: a * getattr(self, f) + b * getattr(other, f) for f in _LINEAR},
            gathered_units=_more_layers(self.gathered_units, other.gathered_units, b),
            gathered_largest=max(self.gathered_largest, other.gathered_largest),
            prefetch=self.prefetch,
        )


_LINEAR = ("flops", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes")


def _window(units: tuple[int, ...], n: int) -> int:
    """The largest sum of `n` consecutive units (of all of them, if fewer)."""
    if n <= 0 or not units:
        return 0
    return max(sum(units[i : i + n]) for i in range(max(1, len(units) - n + 1)))


def _more_layers(fewer: tuple[int, ...], more: tuple[int, ...], b: int) -> tuple[int, ...]:
    """The gathered units of the model b layers past `fewer`, where `more` (one layer past
    it) is `fewer` with one layer's units inserted: those units repeated b more times. If
    `more` is not of that form (the layers differ), every unit is the largest (a bound)."""
    if b == 0 or not (fewer or more):
        return fewer
    if fewer and more and fewer[0] == more[0]:  # the model's own parameters stay as they are
        own, short, long = fewer[0], fewer[1:], more[1:]
        k = len(long) - len(short)
        for i in range(len(short) - k + 1) if k > 0 else ():
            layer = short[i : i + k]
            if long == short[: i + k] + layer + short[i + k :]:
                return (own, *short[: i + k], *layer * b, *short[i + k :])
        if k == 0 and long == short:
            return fewer
    largest = max(fewer + more)
    return (largest,) * max(len(more), len(fewer) + b * max(1, len(more) - len(fewer)))


def extrapolate(one_layer: StepProfile, two_layers: StepProfile, layers: int) -> StepProfile:
    """The profile of a model with `layers` identical layers, from its 1- and 2-layer profiles:
    p(L) = p(1) + (L - 1) (p(2) - p(1)), exact when the layers are identical.

    >>> import torchmesh as tm
    >>> from torchmesh import planning
    >>> def profile(layers):
    ...     config = tm.nn.LMConfig(vocab=64, d_model=16, heads=2, d_head=8, ff=32, layers=layers, seq=8)
    ...     return planning.profile_step(planning.lm_builder(config, batch=4), "dp:2;tp:2", "batch:dp;ff:tp")
    >>> p1, p2, p3 = profile(1), profile(2), profile(3)
    >>> deep = planning.extrapolate(p1, p2, layers=3)
    >>> (deep.param_bytes, deep.comm_bytes) == (p3.param_bytes, p3.comm_bytes)
    True
    """
    return one_layer.combine(two_layers, 2 - layers, layers - 1)


def profile_step(
    builder: Builder,
    mesh: MeshShapeLike,
    rules: RulesLike,
    optimizer: str = "adamw",
    param_rules: str = "",
    prefetch: int = 1,
) -> StepProfile:
    """Evaluate one training step of `builder`'s model abstractly on `mesh` under `rules`;
    with `param_rules` ("d_model:dp"), its parameters are stored fully sharded by them too
    (`tm.nn.shard_parameters`, gathering `prefetch` units ahead). `builder(mesh)` returns
    `(module, loss_fn)`; nothing is computed and no device is needed, and the collectives
    are those a real run records. A builder may shard the parameters itself: the memory
    estimate then uses the prefetch depth it chose (`prefetch` if it chose none).

    >>> import torchmesh as tm
    >>> from torchmesh import planning
    >>> config = tm.nn.LMConfig(vocab=64, d_model=16, heads=2, d_head=8, ff=32, layers=1, seq=8)
    >>> step = planning.lm_builder(config, batch=4)
    >>> rules = "batch:dp;heads:tp;ff:tp;vocab:tp"
    >>> profile = planning.profile_step(step, "dp:2;tp:2", rules)
    >>> with tm.comm_stats() as stats:   # the same step, run on sim
    ...     model, loss_fn = step(tm.Mesh("dp:2;tp:2", rules=rules))
    ...     loss_fn().backward()
    >>> stats.total_bytes == profile.comm_bytes
    True
    """
    if optimizer not in OPTIMIZERS:
        raise PlanningError(
            f"unknown optimizer {optimizer!r}: choose one of {OPTIMIZERS} (the state memory is counted for these)."
        )
    m = Mesh(mesh, rules=rules, backend="abstract")
    module, loss_fn = builder(m)
    if param_rules:
        shard_parameters(module, param_rules, prefetch=prefetch)
    # the depth the model's prefetcher runs (a builder may have sharded it itself)
    depth = prefetch_depth(module)
    prefetch = prefetch if depth is None else depth
    params = list(module.parameters())
    saved = _SavedTensors(params)
    units = _GatheredUnits(module, m)
    _COUNTING.append(saved)
    try:
        with comm_stats() as stats, FlopCounterMode(display=False) as flops, _counting_nested_hooks():
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack), units.ordering():
                loss = loss_fn()
            saved.counting = False  # what a recomputation saves in backward is not forward memory
            loss.backward()
    finally:
        _COUNTING.remove(saved)
    trainable = [p for p in params if p.requires_grad]
    comm: dict[CommKey, list[int]] = {}
    for r in stats.records:
        acc = comm.setdefault((r.kind, r.axes, r.phase), [0, 0])
        acc[0] += 1
        acc[1] += r.bytes
    return StepProfile(
        mesh=m.shape,
        rules=str(m.rules),
        param_rules=param_rules,
        comm=tuple(sorted((k, n, b) for k, (n, b) in comm.items())),
        flops=int(flops.get_total_flops()),
        param_bytes=_nbytes(params),
        grad_bytes=_nbytes(trainable),
        optimizer_bytes=optimizer_state_bytes(trainable, optimizer),
        activation_bytes=saved.total,
        gathered_units=units.in_order(),
        gathered_largest=units.largest,
        prefetch=prefetch,
    )


class _GatheredUnits:
    """The bytes per device of each FSDP unit's fully sharded parameters once gathered (the
    layout the rules give them, device 0's block), and the order the units' forwards run."""

    def __init__(self, module: torch.nn.Module, mesh: Mesh) -> None:
        self.units = fsdp_units(module)
        owner = {id(sub): i for i, unit in enumerate(self.units[1:], 1) for sub in unit.modules()}
        self.bytes = [0] * len(self.units)
        self.largest = 0
        for sub in module.modules():
            for name in own_mesh_parameters(sub):
                p = getattr(sub, name)
                computed = resolve(p.tensor_layout.dims, mesh.rules, mesh.shape)
                if computed == p.tensor_layout:  # stored as computed: never gathered
                    continue
                n = math.prod(local_shape(computed, mesh.shape)) * p.shards[0].element_size()
                self.bytes[owner.get(id(sub), 0)] += n
                self.largest = max(self.largest, n)
        self.order: list[int] = []

    @contextmanager
    def ordering(self) -> Iterator[None]:
        """Inside the block, note each unit (but the model) the first time its forward runs."""
        hooks = [
            unit.register_forward_pre_hook(lambda _m, _a, i=i: None if i in self.order else self.order.append(i))
            for i, unit in enumerate(self.units[1:], 1)
            if self.bytes[i]
        ]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def in_order(self) -> tuple[int, ...]:
        """The model's own gathered bytes, then each unit's that has some, in forward order
        (units never run are never gathered); () if nothing is gathered."""
        if not any(self.bytes):
            return ()
        return (self.bytes[0], *(self.bytes[i] for i in self.order))


def optimizer_state_bytes(shards: Iterable[torch.Tensor], optimizer: str) -> int:
    """Bytes of optimizer state for these local parameter shards."""
    if optimizer == "sgd":
        return 0
    if optimizer == "adamw":
        return 2 * _nbytes(shards)
    total = 0
    for p in shards:  # adafactor: factored second moments, no first moment
        if p.dim() >= 2:
            n = p.numel()
            total += (n // p.shape[-1] + n // p.shape[-2]) * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def _nbytes(ts: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def note_saved(t: torch.Tensor) -> None:
    """Count `t` as kept for backward by code the saved-tensor hooks do not see (e.g. the input
    a checkpointed block keeps, `torch.utils.checkpoint`); a no-op outside `profile_step`."""
    for saved in _COUNTING:
        saved.pack(t)


@contextmanager
def _counting_nested_hooks() -> Iterator[None]:
    """Inside the block, saved-tensor hooks pushed by torchmesh or the model (FSDP's regather
    is one) also report to the profile every tensor they keep as it is: innermost hooks
    replace outer ones, so the profile's own hooks would not see those. (torch's checkpoint
    uses its own hooks class and is not affected: its blocks' tensors are dropped.)"""
    graph: Any = torch.autograd.graph  # the module whose hooks class is swapped for the block
    original = graph.saved_tensors_hooks

    class Counted(torch.autograd.graph.saved_tensors_hooks):  # the class in place now: `original`
        def __init__(self, pack_hook, unpack_hook):
            def pack(t: torch.Tensor):
                packed = pack_hook(t)
                if packed is t:
                    note_saved(t)
                return packed

            super().__init__(pack, unpack_hook)

    graph.saved_tensors_hooks = Counted
    try:
        yield
    finally:
        graph.saved_tensors_hooks = original


class _SavedTensors:
    """saved_tensors_hooks pair summing the sizes of the distinct tensors saved for backward
    (while `counting`, that is during forward)."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self._seen: set[int] = {id(p) for p in params}
        self._keep: list[torch.Tensor] = []  # keeps ids unique while counting
        self.total = 0
        self.counting = True

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if not self.counting:
            return t
        root = t
        while root._base is not None:
            root = root._base
        if id(root) not in self._seen:
            self._seen.add(id(root))
            self._keep.append(root)
            self.total += root.numel() * root.element_size()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def model_dims(builder: Builder) -> set[str]:
    """The dim names of a model's parameters, plus 'batch' (built once, abstractly, on one device).

    >>> import torchmesh as tm
    >>> from torchmesh import planning
    >>> config = tm.nn.LMConfig(vocab=64, d_model=16, heads=2, d_head=8, ff=32, layers=1, seq=8)
    >>> sorted(planning.model_dims(planning.lm_builder(config, batch=4)))
    ['batch', 'd_head', 'd_model', 'ff', 'heads', 'seq', 'vocab']
    """
    module, _ = builder(Mesh("one:1", backend="abstract"))
    return {"batch"} | {d for _, p in mesh_parameters(module) for d in p.dims}
