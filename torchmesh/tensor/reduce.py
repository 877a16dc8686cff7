"""Reductions over named dims (sum, mean, max, min, logsumexp, any, all), softmax, log_softmax.

A reduced dim split over an axis leaves per-device partial results, all-reduced over that
axis (reduce-scattered where the result is next split over it). `max`/`min` all-reduce the
maximum without gradient and route the gradient like `torch.amax` (evenly among ties);
softmax and logsumexp are built from these, so vocab-parallel softmax falls out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

import torch

from torchmesh import errors
from torchmesh.comm import traced
from torchmesh.comm.backend import compiling
from torchmesh.errors import ArgumentTypeError, DimError
from torchmesh.placement.dims import Dim, dim_names, parse_dims
from torchmesh.placement.op_plan import OpPlan
from torchmesh.tensor.contraction import cached_run, run_op
from torchmesh.tensor.elementwise import cast, where
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.relayout import to_layout

Dims = str | Iterable[Any] | None


def reduced_names(
    x: MeshTensor,
    dims: Dims,
    what: str,
    reduced_dim: Dims = None,
    output_shape: Dims = None,
    *,
    dim: Dims = None,
    keepdim: bool = False,
) -> tuple[str, ...]:
    """The dims to reduce: names ('a b', ['a', 'b'], Dims), torch's spelling `dim=`, Mesh TF's
    `reduced_dim=` or the dims missing from `output_shape=`; all dims when none is given.

    Positions (x.sum(-1)) and keepdim=True are TypeErrors that show the named call: dims
    broadcast by name, so a reduced dim needs no placeholder of size 1."""
    if dim is not None:
        if dims is not None:
            raise ArgumentTypeError(errors.dims_twice(f"x.{what}", dims, dim))
        dims = dim
    if keepdim:
        raise ArgumentTypeError(errors.keepdim_refused(f"x.{what}", x.dims))
    if isinstance(dims, MeshTensor):
        raise ArgumentTypeError(
            f"x.{what}(y) takes dim names, not a tensor; for the elementwise maximum or "
            f"minimum of two tensors use torch.maximum(x, y) / torch.minimum(x, y)."
        )
    if isinstance(dims, int) or (isinstance(dims, (tuple, list)) and any(isinstance(d, int) for d in dims)):
        raise ArgumentTypeError(errors.positional_dim(f"x.{what}", dims, x.dims))
    if reduced_dim is not None:
        dims = [reduced_dim] if isinstance(reduced_dim, (str, Dim)) else reduced_dim
    if output_shape is not None:
        keep = [d.name for d in check_output_shape(x, parse_dims(output_shape, x.sizes), what)]
        dims = [n for n in x.dims if n not in keep]
    if dims is None:
        return x.dims
    names = traced.constant("dim_names", dims) if compiling() and isinstance(dims, str) else dim_names(dims)
    if any(n not in x.dims for n in names):
        raise DimError(errors.missing_dims(what, names, x.dims))
    return names


def check_output_shape(x: MeshTensor, out: tuple[Dim, ...], what: str) -> tuple[Dim, ...]:
    """Mesh TF's `output_shape=`: dims of x with x's sizes (DimError naming the first that is not)."""
    for d in out:
        if d.name not in x.sizes:
            raise DimError(
                f"{what}(output_shape=...): {d.name!r} is not a dim of the tensor {x.dims}; the "
                f"output keeps some of the input's dims. Fix: name dims among {x.dims}."
            )
        if d.size != x.sizes[d.name]:
            raise DimError(
                f"{what}(output_shape=...): {d.name!r} has size {d.size} there but "
                f"{x.sizes[d.name]} in the tensor. Fix: Dim({d.name!r}, {x.sizes[d.name]})."
            )
    return out


def _reduce(x: MeshTensor, names: tuple[str, ...], kind: str, what: str) -> MeshTensor:
    key = None
    if not compiling():  # the eager hot path: a reduction planned before for this layout and mesh
        key = ("reduce", kind, names, id(x._layout), id(x._mesh))
        done = cached_run(key, (x,))
        if done is not None:
            return done
    return _planned_reduce(x, names, kind, what, key)


def _check_not_empty(x: MeshTensor, names: tuple[str, ...], kind: str, what: str) -> None:
    empty = [n for n in names if x.sizes[n] == 0]
    if kind != "sum" and empty:  # as torch.amax: the extreme of no values is not defined
        raise DimError(
            f"{what} over {empty[0]!r}, a dim of size 0 in the tensor {x.dims}: the {kind} of no "
            f"values is not defined (torch.a{kind} raises too). Fix: reduce a non-empty dim, or "
            f"check the size first."
        )


@lru_cache(maxsize=1024)
def _local_fn(kind: str, pos: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-device reduction over positions `pos` (an empty block of an uneven split gives
    the value that loses to every other, so the all-reduce gives the true extreme)."""
    if not pos:
        return lambda t: t
    if kind == "sum":
        if pos == tuple(range(len(pos))):  # leading dims, maybe all: a full sum is torch's plain sum
            return lambda t: torch.sum(t) if t.dim() == len(pos) else torch.sum(t, dim=pos)
        return lambda t: torch.sum(t, dim=pos)
    local = torch.amax if kind == "max" else torch.amin
    return lambda t: local(t, dim=pos) if all(t.shape[p] for p in pos) else _identity(t, pos, kind)


def _planned_reduce(x: MeshTensor, names: tuple[str, ...], kind: str, what: str, key: tuple | None) -> MeshTensor:
    out = tuple(n for n in x.dims if n not in names)
    _check_not_empty(x, names, kind, what)

    def local_fn(plan: OpPlan):
        have = plan.in_layouts[0].names
        if compiling():
            return traced.constant(_LOCAL_FN, kind, traced.constant(_POSITIONS, have, names))
        return _local_fn(kind, _positions(have, names))

    return run_op([x], out, local_fn, reduce_op=kind, what=what, cache_key=key, fresh=kind == "sum")


def _identity(t: torch.Tensor, pos: tuple[int, ...], kind: str) -> torch.Tensor:
    """The max (min) of an empty block, one of an uneven split's: the value that loses to every
    other, so the all-reduce over the other blocks gives the true extreme."""
    shape = [n for i, n in enumerate(t.shape) if i not in pos]
    info = torch.finfo(t.dtype) if t.dtype.is_floating_point else torch.iinfo(t.dtype)
    worst = (
        (-math.inf if kind == "max" else math.inf)
        if t.dtype.is_floating_point
        else (info.min if kind == "max" else info.max)
    )
    return torch.full(shape, worst, dtype=t.dtype, device=t.device)


@lru_cache(maxsize=4096)
def _positions(have: tuple[str, ...], names: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(have.index(n) for n in names)


def reduce_sum(
    x: MeshTensor,
    dims: Dims = None,
    *,
    dim: Dims = None,
    keepdim: bool = False,
    dtype: torch.dtype | None = None,
    reduced_dim: Dims = None,
    output_shape: Dims = None,
) -> MeshTensor:
    """Sum over the named dims (all dims if None); all-reduce over the axes splitting them.

    Also `x.sum("d")`; torch's spelling `x.sum(dim="d", dtype=...)` and Mesh TF's `reduced_dim=`
    and `output_shape=` are accepted. A position (`x.sum(-1)`) or `keepdim=True` is a TypeError
    that shows the named call: dims broadcast by name, so `x - x.sum("d")` needs no kept dim.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2", rules="batch:dp")
    >>> x = tm.distribute(torch.arange(6.0).reshape(2, 3), "batch d", mesh)
    >>> tm.reduce_sum(x, "batch").full(), x.sum().item()
    (tensor([3., 5., 7.]), 15.0)
    >>> with tm.comm_stats() as stats:
    ...     _ = x.sum("batch")
    >>> stats.counts
    {'all_reduce': 1}
    """
    names = reduced_names(x, dims, "sum", reduced_dim, output_shape, dim=dim, keepdim=keepdim)
    return _reduce(x if dtype is None else cast(x, dtype), names, "sum", "sum")


def reduce_mean(
    x: MeshTensor,
    dims: Dims = None,
    *,
    dim: Dims = None,
    keepdim: bool = False,
    dtype: torch.dtype | None = None,
    reduced_dim: Dims = None,
    output_shape: Dims = None,
) -> MeshTensor:
    """Mean over the named dims (all dims if None); also `x.mean("d")`.

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.arange(6.0).reshape(2, 3), "batch d", tm.Mesh("dp:2", rules="batch:dp"))
    >>> tm.reduce_mean(x, "d").full()
    tensor([1., 4.])
    """
    names = reduced_names(x, dims, "mean", reduced_dim, output_shape, dim=dim, keepdim=keepdim)
    x = x if dtype is None else cast(x, dtype)
    count = math.prod(x.sizes[n] for n in names)
    return _reduce(x, names, "sum", "mean") / count


def _extreme(x: MeshTensor, names: tuple[str, ...], kind: str) -> MeshTensor:
    value = _reduce(x.detach(), names, kind, kind)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return value
    # Gradient as torch.amax: shared evenly among the positions holding the extreme value.
    hit = x.detach() == value
    picked = reduce_sum(where(hit, x, 0.0), names) / reduce_sum(hit.to(x.dtype), names)
    return value + (picked - picked.detach())


def reduce_max(
    x: MeshTensor,
    dims: Dims = None,
    *,
    dim: Dims = None,
    keepdim: bool = False,
    reduced_dim: Dims = None,
    output_shape: Dims = None,
) -> MeshTensor:
    """Maximum over the named dims (all if None), like torch.amax; also `x.max("d")`.

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.tensor([[1.0, 5.0], [7.0, 2.0]]), "batch d", tm.Mesh("dp:2", rules="batch:dp"))
    >>> tm.reduce_max(x, "batch").full()
    tensor([7., 5.])
    """
    names = reduced_names(x, dims, "max", reduced_dim, output_shape, dim=dim, keepdim=keepdim)
    return _extreme(x, names, "max")


def reduce_min(
    x: MeshTensor,
    dims: Dims = None,
    *,
    dim: Dims = None,
    keepdim: bool = False,
    reduced_dim: Dims = None,
    output_shape: Dims = None,
) -> MeshTensor:
    """Minimum over the named dims (all if None), like torch.amin; also `x.min("d")`.

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.tensor([[1.0, 5.0], [7.0, 2.0]]), "batch d", tm.Mesh("dp:2", rules="batch:dp"))
    >>> tm.reduce_min(x, "batch").full()
    tensor([1., 2.])
    """
    names = reduced_names(x, dims, "min", reduced_dim, output_shape, dim=dim, keepdim=keepdim)
    return _extreme(x, names, "min")


def reduce_any(
    x: MeshTensor,
    dims: Dims = None,
    *,
    dim: Dims = None,
    keepdim: bool = False,
    reduced_dim: Dims = None,
    output_shape: Dims = None,
) -> MeshTensor:
    """True where any element along the named dims is nonzero; also `x.any("d")`.

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.tensor([[0, 1], [0, 0]]), "batch d", tm.Mesh("dp:2", rules="batch:dp"))
    >>> tm.reduce_any(x, "d").full()
    tensor([ True, False])
    """
    names = reduced_names(x, dims, "any", reduced_dim, output_shape, dim=dim, keepdim=keepdim)
    return _reduce((x != 0).to(torch.uint8), names, "max", "any") != 0


def reduce_all(
    x: MeshTensor,
    dims: Dims = None,
    *,
    dim: Dims = None,
    keepdim: bool = False,
    reduced_dim: Dims = None,
    output_shape: Dims = None,
) -> MeshTensor:
    """True where every element along the named dims is nonzero; also `x.all("d")`.

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.tensor([[1, 1], [0, 1]]), "batch d", tm.Mesh("dp:2", rules="batch:dp"))
    >>> tm.reduce_all(x, "batch").full()
    tensor([False,  True])
    """
    names = reduced_names(x, dims, "all", reduced_dim, output_shape, dim=dim, keepdim=keepdim)
    return _reduce((x != 0).to(torch.uint8), names, "min", "all") != 0


def _stable_max(x: MeshTensor, names: tuple[str, ...]) -> MeshTensor:
    m = _reduce(x.detach(), names, "max", "max")
    return where(m.isinf(), 0.0, m)


def _unsplit_along(x: MeshTensor, names: tuple[str, ...]) -> MeshTensor | None:
    """x in the rules' layout if none of `names` is split there over an axis of size > 1
    (then a local torch kernel computes the op exactly), else None."""
    layout = x.mesh.layout_of(x.shape)
    if any(layout.is_split(n, x.mesh.impl.slice_mesh) for n in names):
        return None
    return to_layout(x, layout)


#: (kernel, names, id(layout), id(mesh)) -> (the rules in force, then (the rules' layout, the
#: slice-wise kernel) where no device holds part of `names` there, else None; then the layout
#: and mesh, kept alive so that their ids are not reused): `_along_unsplit`'s cache.
_UNSPLIT: dict[tuple, tuple] = {}


def _along_unsplit(x: MeshTensor, names: tuple[str, ...], kernel: Callable[..., torch.Tensor]) -> MeshTensor | None:
    """`kernel(t, dim)` (torch.softmax, torch.log_softmax) along the one dim in `names`, computed
    by each device on its block where that dim is not split in the rules' layout (relaying x
    out to that layout first); None where it is split (the caller composes the op from
    reductions). Eagerly, the answer for a layout is looked up, not planned again."""
    if len(names) != 1:
        return None
    if compiling():
        local = _unsplit_along(x, names)
        return None if local is None else local._map(local_kernel(kernel, local.dims, names))
    mesh = x._mesh
    rules = mesh.rules
    key = (kernel, names, id(x._layout), id(mesh))
    entry = _UNSPLIT.get(key)
    if entry is None or entry[0] is not rules:
        layout = mesh.layout_of(x.shape)
        split = any(layout.is_split(n, mesh.impl.slice_mesh) for n in names)
        found = None if split else (layout, _local_kernel(kernel, layout.names, names))
        if len(_UNSPLIT) > 256:  # small: a new sequence length is a new layout
            _UNSPLIT.clear()
        entry = _UNSPLIT[key] = (rules, found, x._layout, mesh)
    if entry[1] is None:
        return None
    layout, fn = entry[1]
    if layout is not x._layout:
        x = to_layout(x, layout)
    return MeshTensor(mesh.impl.slicewise(fn, x._data), layout, mesh)


def logsumexp(x: MeshTensor, dims: Dims = None, *, dim: Dims = None, keepdim: bool = False) -> MeshTensor:
    """log(sum(exp(x))) over the named dims, shifted by the (global) maximum for stability.

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.zeros(2, 4), "batch vocab", tm.Mesh("tp:2", rules="vocab:tp"))
    >>> tm.logsumexp(x, "vocab").full()  # log(4)
    tensor([1.3863, 1.3863])
    """
    names = reduced_names(x, dims, "logsumexp", dim=dim, keepdim=keepdim)
    if _unsplit_along(x, names) is not None:
        return run_op(
            [x],
            tuple(n for n in x.dims if n not in names),
            lambda plan: local_kernel(torch.logsumexp, plan.in_layouts[0].names, names),
            what="logsumexp",
        )
    m = _stable_max(x, names)
    return reduce_sum((x - m).exp(), names).log() + m


def softmax(x: MeshTensor, dim: str, *, dtype: torch.dtype | None = None) -> MeshTensor:
    """Softmax along one named dim; split over an axis, it costs two small all-reduces
    (of the maximum and of the sum): vocab-parallel softmax.

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.zeros(1, 4), "batch vocab", tm.Mesh("tp:2", rules="vocab:tp"))
    >>> with tm.comm_stats() as stats:
    ...     p = tm.softmax(x, "vocab")
    >>> p.full(), stats.counts
    (tensor([[0.2500, 0.2500, 0.2500, 0.2500]]), {'all_reduce': 2})
    """
    names = reduced_names(x, dim, "softmax")
    x = x if dtype is None else cast(x, dtype)
    local = _along_unsplit(x, names, torch.softmax)
    if local is not None:
        return local
    e = (x - _stable_max(x, names)).exp()
    return e / reduce_sum(e, names)


def log_softmax(x: MeshTensor, dim: str, *, dtype: torch.dtype | None = None) -> MeshTensor:
    """log(softmax(x, dim)), computed as x - logsumexp(x, dim).

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.zeros(1, 2), "batch vocab", tm.Mesh("tp:2", rules="vocab:tp"))
    >>> tm.log_softmax(x, "vocab").full()
    tensor([[-0.6931, -0.6931]])
    """
    names = reduced_names(x, dim, "log_softmax")
    x = x if dtype is None else cast(x, dtype)
    local = _along_unsplit(x, names, torch.log_softmax)
    if local is not None:
        return local
    return x - logsumexp(x, names)


@lru_cache(maxsize=1024)
def _local_kernel(fn, have: tuple[str, ...], names: tuple[str, ...]):
    pos = _positions(have, names)
    return lambda t: fn(t, pos if len(pos) != 1 else pos[0])


def local_kernel(fn, have: tuple[str, ...], names: tuple[str, ...]):
    """`fn(t, positions of names in have)` as a function of a local tensor (cached)."""
    return traced.constant(_LOCAL_KERNEL, fn, have, names) if compiling() else _local_kernel(fn, have, names)


_POSITIONS, _LOCAL_KERNEL, _LOCAL_FN = (
    traced.planner(_positions),
    traced.planner(_local_kernel),
    traced.planner(_local_fn),
)
