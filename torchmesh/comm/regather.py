"""Regather in backward: an op's gathered inputs are not kept alive for its backward.

With fully sharded parameters (`tm.nn.shard_parameters`) every parameter is all-gathered
just before use. The local torch op then saves the gathered (full) parameter for its
backward, so the full parameters of every layer would stay alive until backward, undoing
the memory saving. Inside `regather_in_backward()` (which `shard_parameters` turns on for
the model's forward), an op whose input is all-gathered over an axis it is then broadcast
over (the op plan's `in_gather_rs`: exactly the fully sharded parameter case) saves, instead
of the gathered tensor, a note of where it came from; the backward gathers it again from
the stored shards (one more all-gather, recorded with phase "backward"). FSDP calls this
`reshard_after_forward`; the trade is that all-gather against the parameter memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from torchmesh.comm.backend import Data, MeshImpl, compiling
from torchmesh.comm.executor import run_steps
from torchmesh.placement.layout import TensorLayout
from torchmesh.placement.plan import Step

#: A stored layout and the relayout steps that gathered it (replayed in backward).
Relayout = tuple[TensorLayout, tuple[Step, ...]]

_ENABLED: ContextVar[bool] = ContextVar("torchmesh_regather", default=False)


@contextmanager
def regather_in_backward(enabled: bool = True):
    """Within this block, ops do not keep their gathered sharded inputs for backward. Not
    inside torch.compile (a context variable is not traced): there AOTAutograd's partitioner
    chooses what backward saves and what it recomputes."""
    if compiling():
        yield
        return
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    return not compiling() and _ENABLED.get() and torch.is_grad_enabled()


def run_regathering(
    impl: MeshImpl, compute: Callable[[], Data], sources: Sequence[tuple[Data, Data, Relayout]]
) -> Data:
    """Run `compute()`, replacing every tensor it saves for backward that is a view of a
    gathered input by a note; `sources` holds, per such input, (stored shards, gathered
    data, (its stored layout, the relayout steps that gathered it))."""
    if not impl.can_regather:
        return compute()  # e.g. XLA tensors: no storages to recognise (and XLA plans memory itself)
    op = impl.op_name()  # the op that gathered: its backward names the regather
    owners: dict[int, tuple[int, int]] = {}  # storage -> (source, device)
    for s, (_, gathered, _) in enumerate(sources):
        for d, t in enumerate(gathered):
            owners[_storage_id(t)] = (s, d)
    # Each gathered tensor's geometry: saved views are rebuilt on a tensor laid out alike.
    geometry = [[(t.shape, t.stride(), t.storage_offset()) for t in gathered] for _, gathered, _ in sources]
    # The hooks outlive this call (every saved tensor keeps its unpack hook): they must not
    # reference the gathered tensors, only the stored shards and the steps.
    stored = [(shards, steps) for shards, _, steps in sources]
    del sources
    cache: dict[int, Data] = {}

    def regathered(s: int) -> Data:
        if s not in cache:
            shards, steps = stored[s]
            with torch.no_grad(), impl.op_scope(f"regather for the backward of {op or 'an op'}"):
                cache[s] = tuple(
                    _like(t, shape, stride) for t, (shape, stride, _) in zip(_replay(impl, shards, steps), geometry[s])
                )
        return cache[s]

    def pack(t: torch.Tensor) -> Any:
        owner = owners.get(_storage_id(t)) if t.layout == torch.strided else None
        if owner is None:
            return t
        s, d = owner
        return (_Note, s, d, tuple(t.shape), t.stride(), t.storage_offset() - geometry[s][d][2], t.dtype)

    def unpack(packed: Any) -> torch.Tensor:
        if not (isinstance(packed, tuple) and packed and packed[0] is _Note):
            return packed
        _, s, d, shape, stride, offset, dtype = packed
        full = regathered(s)[d]
        return full.as_strided(shape, stride, full.storage_offset() + offset).to(dtype)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return compute()


def _storage_id(t: torch.Tensor) -> int:
    """Which storage a tensor views (its StorageImpl; unlike data_ptr, distinct on meta too)."""
    return t.untyped_storage()._cdata


class _Note:
    """Marks a saved tensor replaced by a regather (never instantiated)."""


def _replay(impl: MeshImpl, data: Data, relayout: Relayout) -> Data:
    """The relayout (stored layout, steps) once more, outside autograd, recorded as
    backward traffic."""
    src, steps = relayout
    return run_steps(impl, data, src, steps, phase="backward")


def _like(t: torch.Tensor, shape: torch.Size, stride: tuple[int, ...]) -> torch.Tensor:
    """`t`'s values in a tensor with this shape and stride (t itself when it has them)."""
    if t.shape == shape and t.stride() == stride:
        return t
    out = torch.empty_strided(shape, stride, dtype=t.dtype, device=t.device)
    return out.copy_(t)
