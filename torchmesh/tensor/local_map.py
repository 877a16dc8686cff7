"""`tm.local_map`: a torch function run on each device's blocks, with exact gradients.

The supported escape hatch for a computation torchmesh has no op for (a depthwise
convolution, a custom kernel): `fn` receives each device's blocks of the inputs as plain
torch tensors and returns that device's blocks of the outputs. It is valid when each output
block depends only on the matching blocks of the inputs (docs/concepts.md, "Per-device
functions").

Inputs are first laid out by the rules, outputs are laid out by the rules for their dims.
Gradients follow the rule every op follows: an input replicated over an axis that splits an
output is broadcast there, so each device's gradient of it is a partial sum, summed over the
axis in backward (`sum_grad`); an output replicated over such an axis sends its gradient back
from the first device of the axis only, so that the sum counts it once.

On sim `fn` runs once per device, on dist once per process; on xla once, traced inside a
manual-sharding region where every tensor is a device's block (`torchmesh/xla/manual.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch.autograd import Function

from torchmesh import errors
from torchmesh.comm import grad_sync, traced
from torchmesh.comm.backend import MeshImpl, compiling
from torchmesh.errors import DimError, LayoutError, MeshError, ParseError
from torchmesh.placement.dims import Dim, check_name, check_unique
from torchmesh.placement.layout import TensorLayout, check, local_shape
from torchmesh.placement.mesh_shape import MeshShape, parts
from torchmesh.placement.rules import LayoutRules
from torchmesh.tensor import replicas
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.relayout import to_layout
from torchmesh.xla.backend import partition_spec
from torchmesh.xla.manual import even_or_refuse, from_blocks, to_blocks

#: One output's dims: (name, global size, or None where the blocks tell it).
OutDims = tuple[tuple[str, "int | None"], ...]


@dataclass(frozen=True, slots=True)
class LocalMapPlan:
    """How gradients cross the per-device function: per input, the axes its gradient is
    summed over; per output, its axes (per dim) and the axes over which only the first
    device passes its gradient back."""

    in_bcast: tuple[tuple[str, ...], ...]
    out_axes: tuple[tuple[tuple[str, ...], ...], ...]
    out_once: tuple[tuple[str, ...], ...]


def local_map(fn: Callable[..., Any], *args: Any, out_dims: str | Sequence[str]) -> Any:
    """Run `fn` on each device's blocks: it gets the local blocks of the MeshTensor arguments
    (plain tensors, dims in each input's order; other arguments as they are) and returns the
    local blocks of the outputs, whose dims `out_dims` names ("batch seq ch", or a tuple of
    such strings for several outputs). A dim an input has keeps its size; a new dim's size is
    read from the blocks, except for a new dim the rules split, written "name:size" (a block
    does not tell the global size of an uneven split). `fn` must be blockwise: each output
    block depends only on the matching blocks of the inputs. Gradients are exact.

    A depthwise convolution along a replicated `seq`, batch split over dp and channels over tp:

    >>> import torch, torch.nn.functional as F, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ch:tp")
    >>> def conv(x, w):                       # x: [batch, seq, ch] block, w: [ch, k] block
    ...     y = F.conv1d(x.transpose(1, 2), w.unsqueeze(1), padding=1, groups=x.shape[2])
    ...     return y.transpose(1, 2)
    >>> x_value, w_value = torch.randn(4, 8, 6), torch.randn(6, 3)
    >>> x = tm.distribute(x_value, "batch seq ch", mesh)
    >>> w = tm.distribute(w_value, "ch k", mesh, requires_grad=True)
    >>> y = tm.local_map(conv, x, w, out_dims="batch seq ch")
    >>> y.layout, torch.allclose(y.full(), conv(x_value, w_value), atol=1e-6)
    ({'batch': 'dp', 'ch': 'tp'}, True)
    >>> (y * y).sum().backward()             # w's gradient: summed over dp, where batch is split
    >>> w_ref = w_value.clone().requires_grad_()
    >>> (conv(x_value, w_ref) ** 2).sum().backward()
    >>> torch.allclose(w.grad.full(), w_ref.grad, atol=1e-5)
    True
    """
    what = f"local_map({getattr(fn, '__name__', type(fn).__name__)})"
    slots = [i for i, a in enumerate(args) if isinstance(a, MeshTensor)]
    xs = [args[i] for i in slots]
    _check_inputs(args, xs, what)
    mesh = xs[0]._mesh
    single = isinstance(out_dims, str)
    outs = _out_dims(out_dims, xs, mesh.rules, mesh.shape, what)
    xs = [to_layout(x, mesh.layout_of(x.shape)) for x in xs]
    layouts, out_names = tuple(x._layout for x in xs), tuple(tuple(n for n, _ in o) for o in outs)
    if compiling():
        frozen = tuple(traced.freeze_layout(lay) for lay in layouts)
        rules, shape = traced.freeze_rules(mesh.rules), traced.freeze_shape(mesh.shape)
        plan = traced.constant(_PLAN, frozen, out_names, rules, shape, what)
    else:
        plan = plan_local_map(layouts, out_names, mesh.rules, mesh.shape, what)
    for o, axes in zip(outs, plan.out_axes):  # two dims on one axis: an error before fn runs
        check(_known_layout(o, axes), mesh.shape, str(mesh.rules))
    impl = mesh.impl

    def call(blocks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        full = list(args)
        for i, b in zip(slots, blocks):
            full[i] = b
        return _as_outputs(fn(*full), len(outs), single, what)

    # Where the local tensors are the devices' blocks (sim, dist) fn runs on them; where they
    # are global (xla) fn runs inside a manual-sharding region.
    run = _run_on_blocks if impl.slice_mesh == impl.shape else _run_manual
    with impl.op_scope(what):
        results = run(impl, call, plan, xs, outs, what)
    ys = tuple(MeshTensor(data, layout, mesh) for data, layout in results)
    if replicas.checks_on(impl):
        replicas.check_replicas({f"{what} output {j}": y for j, y in enumerate(ys)})
    return ys[0] if single else ys


@lru_cache(maxsize=1024)
def plan_local_map(
    inputs: tuple[TensorLayout, ...],
    outputs: tuple[tuple[str, ...], ...],
    rules: LayoutRules,
    mesh: MeshShape,
    what: str = "local_map",
) -> LocalMapPlan:
    """Which gradients are summed where, from the inputs' layouts and the outputs' dims."""
    live = set(mesh.live_axes())
    out_axes = tuple(tuple(rules.axes_of(n) for n in names) for names in outputs)
    out_used = [{a for axes in o for a in axes} & live for o in out_axes]
    splitting = set().union(*out_used)
    for x in inputs:
        lost = sorted((x.used_axes & live) - splitting)
        if lost:
            raise LayoutError(_unmatched_split(what, x, lost, outputs))
    in_bcast = tuple(tuple(a for a in mesh.names if a in splitting and a not in x.used_axes) for x in inputs)
    summed = {a for b in in_bcast for a in b}
    out_once = tuple(tuple(a for a in mesh.names if a in summed and a not in used) for used in out_used)
    return LocalMapPlan(in_bcast, out_axes, out_once)


_PLAN = traced.planner(plan_local_map)


# ---- sim, dist: fn on each local block ---------------------------------------------------------
def _run_on_blocks(impl: MeshImpl, call, plan: LocalMapPlan, xs: list[MeshTensor], outs, what):
    datas = [grad_sync.reduce_grad(impl, x._data, b) for x, b in zip(xs, plan.in_bcast)]
    per_device = impl.slicewise_at(lambda coords, *blocks: call(blocks), *datas)
    results = []
    for j, (names_sizes, axes, once) in enumerate(zip(outs, plan.out_axes, plan.out_once)):
        blocks = [out[j] for out in per_device]
        layout = _out_layout(names_sizes, axes, [b.shape for b in blocks], what, j)
        data = []
        for coords, b in zip(impl.local_coords, blocks):
            want = local_shape(layout, impl.slice_mesh, coords)
            if tuple(b.shape) != want:
                raise DimError(_wrong_block(what, j, layout, tuple(b.shape), want, coords, impl.slice_mesh))
            if any(impl.coord(coords, a) for a in once) and b.requires_grad:
                b = _NoGradBack.apply(b)
            data.append(b)
        results.append((tuple(data), layout))
    return results


class _NoGradBack(Function):
    """Identity forward; a zero gradient backward (a copy of a replicated output whose
    gradient another device of the axis already passes back)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


# ---- xla: fn on each device's block inside a manual-sharding region ------------------------------
def _run_manual(impl: MeshImpl, call, plan: LocalMapPlan, xs: list[MeshTensor], outs, what):
    mesh = impl.shape
    even_or_refuse([x._layout for x in xs], mesh, what)
    even_or_refuse([_known_layout(o, axes) for o, axes in zip(outs, plan.out_axes)], mesh, what)
    blocks = []
    for x, bcast in zip(xs, plan.in_bcast):
        t, layout = x._data[0], x._layout
        spec = partition_spec(layout.axes)
        if bcast:  # one copy per block of the broadcast axes: expand's backward sums their gradients
            t = t.unsqueeze(0).expand(parts(mesh, bcast), *t.shape)
            blocks.append(to_blocks(impl, t, partition_spec((bcast, *layout.axes))).squeeze(0))
        else:
            blocks.append(to_blocks(impl, t, spec))
    results = []
    for j, (b, names_sizes, axes, once) in enumerate(zip(call(blocks), outs, plan.out_axes, plan.out_once)):
        layout = _out_layout(names_sizes, axes, [b.shape], what, j)
        want = local_shape(layout, mesh)
        if tuple(b.shape) != want:
            raise DimError(_wrong_block(what, j, layout, tuple(b.shape), want, (0,) * len(mesh.names), mesh))
        shape = tuple(d.size for d in layout.dims)
        if once:  # the copies stacked over `once`; the first one's gradient is the whole gradient
            y = from_blocks(impl, b.unsqueeze(0), partition_spec((once, *axes)), (parts(mesh, once), *shape))[0]
        else:
            y = from_blocks(impl, b, partition_spec(axes), shape)
        results.append(((y,), layout))
    return results


def _known_layout(names_sizes: OutDims, axes) -> TensorLayout:
    """An output's layout over the dims whose sizes are known before fn runs (the others are
    new dims no rule splits)."""
    pairs = [(Dim(n, s), a) for (n, s), a in zip(names_sizes, axes) if s is not None]
    return traced.layout(tuple(d for d, _ in pairs), tuple(a for _, a in pairs))


# ---- arguments and results ---------------------------------------------------------------------
def _check_inputs(args: Sequence[Any], xs: list[MeshTensor], what: str) -> None:
    if not xs:
        raise DimError(
            f"{what}: no MeshTensor among the arguments, so there is no mesh to run on. "
            f"Fix: pass the MeshTensors whose blocks the function takes."
        )
    for x in xs[1:]:
        if x._mesh is not xs[0]._mesh:
            raise MeshError(f"{what}: inputs live on different meshes ({xs[0]._mesh} and {x._mesh}).")
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad and torch.is_grad_enabled():
            raise DimError(
                f"{what}: got a plain torch.Tensor of shape {tuple(a.shape)} that requires grad; every "
                f"device would add its own gradient to it, which depends on the mesh. Fix: make it a "
                f"MeshTensor (tm.distribute(t, '<dims>', mesh, requires_grad=True)), or pass t.detach()."
            )


def _out_dims(
    out_dims: str | Sequence[str], xs: list[MeshTensor], rules: LayoutRules, mesh: MeshShape, what: str
) -> tuple[OutDims, ...]:
    """Each output's (name, size or None): sizes from "name:size", else from the inputs' dim
    of that name; a new dim the rules split must be written with its size."""
    specs = [out_dims] if isinstance(out_dims, str) else list(out_dims)
    if not specs or not all(isinstance(s, str) for s in specs):
        raise ParseError(
            f"{what}: out_dims is a string of dim names ('batch seq ch') or a tuple of "
            f"such strings, one per output; got {out_dims!r}."
        )
    sizes: dict[str, int] = {}
    for x in xs:
        for d in x.shape:
            if sizes.setdefault(d.name, d.size) != d.size:
                raise DimError(errors.size_mismatch(what, d.name, [sizes[d.name], d.size]))
    live = set(mesh.live_axes())
    outs = []
    for spec in specs:
        out = []
        for token in spec.replace(",", " ").split():
            name, sep, size = token.partition(":")
            check_name(name)
            if sep and not (size.isascii() and size.isdigit()):
                raise ParseError(f"{what}: out_dims {spec!r}: the size in {token!r} must be a non-negative integer.")
            given = int(size) if sep else None
            if given is not None and name in sizes and sizes[name] != given:
                raise DimError(errors.size_mismatch(what, name, [sizes[name], given]))
            known = given if given is not None else sizes.get(name)
            if known is None and set(rules.axes_of(name)) & live:
                raise DimError(
                    f"{what}: out_dims {spec!r} names the new dim {name!r}, which the rules split over "
                    f"{','.join(rules.axes_of(name))}; its global size cannot be read from one block (blocks "
                    f"of an uneven split differ). Fix: write it with its size, '{name}:<size>'."
                )
            out.append((name, known))
        check_unique([n for n, _ in out], f"{what}: out_dims {spec!r}")
        outs.append(tuple(out))
    return tuple(outs)


def _as_outputs(result: Any, n: int, single: bool, what: str) -> tuple[torch.Tensor, ...]:
    if single and isinstance(result, torch.Tensor):
        result = (result,)
    if (
        not isinstance(result, (tuple, list))
        or len(result) != n
        or not all(isinstance(t, torch.Tensor) for t in result)
    ):
        got = type(result).__name__ + (f" of {len(result)}" if isinstance(result, (tuple, list)) else "")
        want = "a torch.Tensor" if single else f"a tuple of {n} torch.Tensors"
        raise DimError(
            f"{what}: the function returned {got}; out_dims names {n} output(s), so it must "
            f"return {want} (each device's block)."
        )
    return tuple(result)


def _out_layout(names_sizes: OutDims, axes, shapes: list, what: str, j: int) -> TensorLayout:
    """Output j's layout; sizes not known before are read from the blocks (such dims are not
    split, so each block holds the whole dim, the same on every device)."""
    names = [n for n, _ in names_sizes]
    for shape in shapes:
        if len(shape) != len(names):
            raise DimError(
                f"{what}: output {j} has dims ({', '.join(names)}) in out_dims, but the function "
                f"returned a block with {len(shape)} dims (shape {tuple(shape)})."
            )
    dims = []
    for i, (name, size) in enumerate(names_sizes):
        if size is None:
            seen = sorted({int(s[i]) for s in shapes})
            if len(seen) != 1:
                raise DimError(
                    f"{what}: output {j}'s new dim {name!r} has sizes {seen} on different devices; "
                    f"a dim no rule splits is whole on every device."
                )
            size = seen[0]
        dims.append(Dim(name, size))
    return traced.layout(tuple(dims), axes)


def _wrong_block(what: str, j: int, layout: TensorLayout, got: tuple, want: tuple, coords, mesh: MeshShape) -> str:
    at = ",".join(f"{n}={c}" for n, c in zip(mesh.names, coords))
    return (
        f"{what}: output {j} is {layout}, so the device [{at}] holds a block of shape {want}, but the "
        f"function returned shape {got}. Fix: return each device's block of the output (blocks of an "
        f"uneven split differ by at most one, the larger first), or correct the sizes in out_dims."
    )


def _unmatched_split(what: str, x: TensorLayout, axes: list[str], outputs) -> str:
    outs = " | ".join("(" + ", ".join(o) + ")" for o in outputs)
    return (
        f"{what}: the input {x} is split over {', '.join(axes)}, but no output {outs} is, so each device "
        f"would compute its copy of the outputs from a different block and the copies would disagree. "
        f"Fix: keep a dim split over {', '.join(axes)} in out_dims, or make that input whole first "
        f"(relayout it, or reduce it with tm ops)."
    )
