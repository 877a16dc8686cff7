"""Replicated copies that must agree: `check_replicas` compares a fingerprint of every copy.

A tensor replicated over an axis has one copy per device of that axis, and torchmesh keeps
them identical: each op computes the same value on each of them, and each gradient is whole
on each of them (docs/concepts.md, "Gradients of broadcast tensors"). Copies drift apart
when something outside torchmesh writes them differently: a per-device computation whose
gradient was not summed, a rank that ran different code, a nondeterministic kernel. The
check is cheap: one 16-byte fingerprint per copy (an order-sensitive integer hash of its
bits, so equal means bitwise equal), gathered over the mesh in one small all-gather per
axis, after which every rank knows every copy's fingerprint and all raise together.

With `TORCHMESH_CHECK=1` (or a dist mesh made with `check=True`) torchmesh runs it itself
on every tensor that `tm.from_local` builds and every output of `tm.local_map`; for model
parameters call `tm.check_replicas(model)` (say after each optimizer step of a checked run).
On xla there is nothing to compare: XLA keeps one value per tensor.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from torchmesh.comm import autograd as comm
from torchmesh.comm.backend import MeshImpl
from torchmesh.errors import DimError, ReplicaMismatch
from torchmesh.tensor.mesh_tensor import MeshTensor

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def checks_on(impl: MeshImpl) -> bool:
    """Whether torchmesh checks replicas itself: the mesh checks collectives (dist), or
    TORCHMESH_CHECK is set (any backend)."""
    return impl.checking or os.environ.get("TORCHMESH_CHECK", "0") not in ("", "0")


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Two int64s that are equal for bitwise-equal tensors: the sum of the bits (read as
    integers) weighted by odd position weights, and their plain sum (wrapping, so exact and
    independent of the order of summation)."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    flat = t.contiguous().reshape(-1)
    bits = flat.view(_BITS[flat.element_size()]).to(torch.int64)
    weights = torch.arange(1, 2 * bits.numel() + 1, 2, dtype=torch.int64, device=bits.device)
    return torch.stack([(bits * weights).sum(), bits.sum()])


def check_replicas(tensors: Any, grads: bool = False) -> None:
    """`tm.check_replicas` for MeshTensors (a MeshTensor, a dict of them, or a list); the
    public function, which takes modules too, is `torchmesh.nn.parameter.check_replicas`."""
    named = _named(tensors, grads)
    by_mesh: dict[int, list[tuple[str, MeshTensor]]] = {}
    for name, x in named:
        by_mesh.setdefault(id(x._mesh), []).append((name, x))
    for group in by_mesh.values():
        _check_group(group)


def _named(tensors: Any, grads: bool) -> list[tuple[str, MeshTensor]]:
    if isinstance(tensors, MeshTensor):
        pairs = [("tensor", tensors)]
    elif isinstance(tensors, Mapping):
        pairs = list(tensors.items())
    elif isinstance(tensors, Iterable):
        pairs = [(f"tensors[{i}]", x) for i, x in enumerate(tensors)]
    else:
        pairs = [("tensors", tensors)]
    bad = [(n, type(x).__name__) for n, x in pairs if not isinstance(x, MeshTensor)]
    if bad:
        raise DimError(
            f"check_replicas takes a module, a MeshTensor, or a dict or list of MeshTensors; "
            f"{bad[0][0]!r} is a {bad[0][1]}. Fix: pass the model, or MeshTensors only."
        )
    if grads:
        pairs += [(f"{n}.grad", x.grad) for n, x in pairs if x.grad is not None]
    return pairs


def _replicated_axes(x: MeshTensor) -> tuple[str, ...]:
    impl, used = x._mesh.impl, x._layout.used_axes
    return tuple(a for a in impl.slice_mesh.live_axes() if a not in used)


def _check_group(named: list[tuple[str, MeshTensor]]) -> None:
    """One gather of every fingerprint over the mesh, then each tensor's copies compared."""
    impl = named[0][1]._mesh.impl
    live = impl.slice_mesh.live_axes()
    if not impl.holds_values:  # shapes only: nothing to compare
        return
    named = [(n, x) for n, x in named if _replicated_axes(x) and not x._data[0].is_meta]
    if not named:
        return
    ones = (1,) * len(impl.slice_mesh.names)
    data = tuple(
        torch.stack([fingerprint(x._data[i]) for _, x in named]).to(impl.default_device).reshape(len(named), 2, *ones)
        for i in range(len(impl.local_coords))
    )
    names = impl.slice_mesh.names
    with impl.op_scope("tm.check_replicas"):
        for axis in live:  # afterwards every device holds the table [tensor, 2, *mesh sizes]
            data = comm.all_gather(impl, data, axis, 2 + names.index(axis), phase="check")
    table = data[0].cpu()
    for t, (name, x) in enumerate(named):
        found = _disagreeing(table[t], x, names)
        if found:
            raise ReplicaMismatch(_drift_message(name, x, _replicated_axes(x), found))


def _disagreeing(table: torch.Tensor, x: MeshTensor, names: tuple[str, ...]) -> list[tuple[tuple, tuple]]:
    """(device coords, coords of the copy it should equal) for every copy that differs from
    the first copy of its replica group."""
    rep = {names.index(a) for a in _replicated_axes(x)}
    out = []
    for coords in itertools.product(*(range(s) for s in table.shape[1:])):
        first = tuple(0 if i in rep else c for i, c in enumerate(coords))
        this_copy: tuple[slice | int, ...] = (slice(None), *coords)
        first_copy: tuple[slice | int, ...] = (slice(None), *first)
        if not torch.equal(table[this_copy], table[first_copy]):
            out.append((coords, first))
    return out


def _drift_message(name: str, x: MeshTensor, axes: tuple[str, ...], found: list) -> str:
    names = x._mesh.impl.slice_mesh.names

    def at(c: tuple) -> str:
        return "[" + ",".join(f"{n}={v}" for n, v in zip(names, c)) + "]"

    dims = "(" + ", ".join(f"{d.name}:{d.size}" for d in x.shape) + ")"
    pairs = "; ".join(f"{at(c)} differs from {at(f)}" for c, f in found[:4])
    more = f" (and {len(found) - 4} more)" if len(found) > 4 else ""
    return (
        f"replicated copies differ: {name!r} (dims {dims}, split {x.layout}) is replicated over "
        f"{', '.join(axes)}, so every device of {'those axes' if len(axes) > 1 else 'that axis'} "
        f"must hold the same copy, but {pairs}{more}. Copies drift apart when a per-device "
        f"computation's gradient was not summed over the axis (x.shards -> tm.from_local; use "
        f"tm.local_map, whose gradients are exact), when ranks run different code, or when a "
        f"kernel is nondeterministic. Fix the cause; to resynchronise, rebuild the tensor from "
        f"one copy (tm.distribute(x.shard(...), ...))."
    )
