"""Lookups over a dim that may be split: `gather` (embedding lookup, picking targets) and
`one_hot`.

Over a split dim each device looks up only the indices in its own block (others give
zero) and the partial results are summed over the axes splitting the dim: the lookup of
Megatron's vocab-parallel embedding, with no communication of the table.

Ids outside [0, size) raise `IndexRangeError` on every device (torch raises for them too),
never silently giving zeros: see `check_ids` for what that check costs.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from torchmesh import errors
from torchmesh.comm import traced
from torchmesh.comm.backend import compiling
from torchmesh.errors import ArgumentTypeError, DimError, IndexRangeError
from torchmesh.placement.dims import Dim, parse_dims
from torchmesh.placement.layout import block_bounds
from torchmesh.placement.op_plan import OpPlan
from torchmesh.tensor.contraction import run_op
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.relayout import to_layout


def gather(x: MeshTensor, index: MeshTensor, dim: str) -> MeshTensor:
    """out[...] = x[dim = index[...]]: dims are index's dims, then x's other dims.

    Dims shared by `x` and `index` are matched elementwise (picking each row's target);
    the others are broadcast (an embedding lookup: `gather(table, ids, "vocab")`).

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="vocab:tp")
    >>> table = tm.distribute(torch.arange(12.0).reshape(6, 2), "vocab d", mesh)
    >>> ids = tm.distribute(torch.tensor([5, 0]), "tok", mesh)
    >>> tm.gather(table, ids, "vocab").full()
    tensor([[10., 11.],
            [ 0.,  1.]])
    """
    check_lookup(x, index, dim, "gather")
    check_ids(index, x.sizes[dim], "gather", dim)
    return lookup(x, index, dim)


def check_lookup(x: MeshTensor, index: MeshTensor, dim: str, op: str) -> None:
    """The dims and dtype a lookup of `x` along `dim` by `index` needs (`op` names it)."""
    if dim not in x.dims:
        raise DimError(errors.missing_dims(op, [dim], x.dims))
    if dim in index.dims:
        raise DimError(f"{op} along {dim!r}: the index must not have dim {dim!r}; its dims are {index.dims}.")
    if index.dtype.is_floating_point or index.dtype.is_complex:
        raise ArgumentTypeError(f"{op} along {dim!r}: the index has dtype {index.dtype}; use an integer tensor.")


def lookup(x: MeshTensor, index: MeshTensor, dim: str) -> MeshTensor:
    """`gather` without the checks, for callers that made them (ids in range, or masked)."""
    out_names = index.dims + tuple(n for n in x.dims if n != dim and n not in index.dims)
    slicer = x.mesh.impl.slice_mesh

    def local_fn(plan: OpPlan):
        xl, il = plan.in_layouts
        axes = xl.axes_of(dim)
        total = xl.sizes[dim]
        names = (xl.names, il.names, dim, plan.computed.names)
        kernel = traced.constant(_KERNEL, *names) if compiling() else _kernel(*names)

        def fn(coords, table, ids):
            start, stop = block_bounds(total, slicer, axes, coords)
            return kernel(table, ids, start, stop - start)

        return fn

    return run_op([x, index], out_names, local_fn, what=f"gather along {dim!r}", at=True)


_NONE = -(2**62)  # the identity of the max-reduction over devices with no ids


def check_ids(index: MeshTensor, size: int, op: str, dim: str, ignore: int | None = None) -> int | None:
    """Raise `IndexRangeError` unless every id of `index` (but those equal to `ignore`) lies in
    [0, size); the number of ids not equal to `ignore`, over the whole (global) index.

    Each device counts its own block's ids outside the range (and those kept); the counts are
    summed over the axes splitting the index, so every device (every rank on dist) gets the
    same answer and raises alike, never one rank alone. The cost: a count over the local ids
    and one read of two integers on the host; where the index is split over processes (dist)
    one all-reduce of those two integers over the axes splitting it (an index replicated, as
    on sim and xla, needs none). It is not listed in `comm_stats`, which records the data's
    collectives. Only when some id is out of range, a second such all-reduce finds the
    smallest and largest id for the message.

    Where reading values is not cheap (`MeshImpl.reads_values`: xla, whose read would run the
    pending program, and abstract, which has no values) nothing is checked unless the mesh is
    in check mode (TORCHMESH_CHECK=1): XLA clamps such ids. None is returned then (on
    abstract, every id counts as kept, as a planner assumes)."""
    impl = index.mesh.impl
    if not impl.holds_values:
        return index.numel()
    if not impl.reads_values and not impl.checking:
        return None
    axes = impl.slice_mesh.live_axes(sorted(index.tensor_layout.used_axes))

    def agree_on_device(data: tuple[torch.Tensor, ...], op_name: str) -> tuple[torch.Tensor, ...]:
        return impl.all_reduce(data, axes, op_name) if axes else data

    def agree(per_device, op_name: str) -> list[int]:
        # device 0's group over `axes` holds every distinct block once
        return agree_on_device(tuple(per_device), op_name)[0].tolist()

    def counts(ids: torch.Tensor) -> torch.Tensor:
        kept = ids != ignore if ignore is not None else torch.ones_like(ids, dtype=torch.bool)
        bad = kept & ((ids < 0) | (ids >= size))
        return torch.stack([bad.sum(), kept.sum()]).to(torch.int64)

    if compiling():  # no host read inside a compiled graph: assert on the device
        bad = agree_on_device(tuple(counts(t)[0] for t in index._data), "sum")
        torch._assert_async(bad[0] == 0, _out_of_range_compiled(op, dim, size, index.dims, ignore))
        return None
    n_bad, n_kept = agree((counts(t) for t in index._data), "sum")
    if n_bad:

        def extremes(ids: torch.Tensor) -> torch.Tensor:
            kept = ids != ignore if ignore is not None else torch.ones_like(ids, dtype=torch.bool)
            ids = ids.to(torch.int64)
            lo = torch.where(kept, -ids, _NONE).max() if ids.numel() else torch.tensor(_NONE)
            hi = torch.where(kept, ids, _NONE).max() if ids.numel() else torch.tensor(_NONE)
            return torch.stack([lo.to(ids.device), hi.to(ids.device)])

        neg_lo, hi = agree((extremes(t) for t in index._data), "max")
        raise IndexRangeError(errors.ids_out_of_range(op, dim, size, index.dims, n_bad, n_kept, -neg_lo, hi, ignore))
    return n_kept


def _out_of_range_compiled(op: str, dim: str, size: int, index_dims: tuple[str, ...], ignore: int | None) -> str:
    """check_ids' message inside a torch.compile'd program, which asserts on the device and
    so cannot name the ids it found (run the step eagerly for those)."""
    other = "" if ignore is None else f" (other than ignore_index={ignore})"
    return (
        f"{op}: some ids{other} of the index {index_dims} lie outside the dim {dim!r} of size {size} "
        f"(they must lie in [0, {size})). Fix: clamp or remap the ids; run the step without "
        f"torch.compile to see how many and their range."
    )


@lru_cache(maxsize=1024)
def _kernel(xs: tuple[str, ...], ids: tuple[str, ...], dim: str, out: tuple[str, ...]):
    shared = [n for n in ids if n in xs]
    only_x = [n for n in xs if n != dim and n not in ids]
    only_i = [n for n in ids if n not in xs]
    x_perm = [xs.index(n) for n in shared + only_x + [dim]]
    i_perm = [ids.index(n) for n in shared + only_i]
    order = shared + only_i + only_x
    out_perm = [order.index(n) for n in out]
    s, ni, nx = len(shared), len(only_i), len(only_x)

    def kernel(table: torch.Tensor, index: torch.Tensor, offset: int, size: int) -> torch.Tensor:
        index = index.permute(i_perm) - offset
        valid = (index >= 0) & (index < size)
        index = torch.where(valid, index, 0)
        table = table.permute(x_perm)
        if size == 0:  # an empty block of an uneven split: one zero row to point the masked ids at
            table = torch.nn.functional.pad(table, (0, 1))
        if s == 0:  # embedding lookup: rows of the table by index
            picked = table.movedim(-1, 0)[index]
            valid = valid.reshape(valid.shape + (1,) * nx)
        else:  # elementwise pick along shared dims
            t = table.reshape(table.shape[:s] + (1,) * ni + table.shape[s:])
            t = t.expand(index.shape + table.shape[s:])
            idx = index.reshape(index.shape + (1,) * nx + (1,)).expand(index.shape + table.shape[s:-1] + (1,))
            picked = torch.gather(t, -1, idx).squeeze(-1)
            valid = valid.reshape(valid.shape + (1,) * nx)
        picked = torch.where(valid, picked, torch.zeros((), dtype=picked.dtype, device=picked.device))
        return picked.permute(out_perm) if out_perm != list(range(len(out))) else picked

    return kernel


_KERNEL = traced.planner(_kernel)


def embedding(ids: MeshTensor, table: MeshTensor, vocab_dim: str = "vocab") -> MeshTensor:
    """Embedding lookup: rows of `table` along `vocab_dim` picked by `ids` (`gather` spelled
    like torch.nn.functional.embedding). With `vocab_dim` split, each device looks up its own
    rows (the others give 0) and the partial results are all-reduced.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="vocab:tp")
    >>> table = tm.distribute(torch.arange(8.0).reshape(4, 2), "vocab d", mesh)
    >>> ids = tm.distribute(torch.tensor([[3, 0]]), "batch seq", mesh)
    >>> tm.embedding(ids, table).full()
    tensor([[[6., 7.],
             [0., 1.]]])
    """
    check_lookup(table, ids, vocab_dim, "embedding")
    check_ids(ids, table.sizes[vocab_dim], "embedding", vocab_dim)
    return lookup(table, ids, vocab_dim)


def one_hot(index: MeshTensor, dim: Dim | str, dtype: torch.dtype = torch.float32, strict: bool = True) -> MeshTensor:
    """A new dim `dim` ("vocab:1000" or Dim) that is 1 at `index` and 0 elsewhere; each device
    builds only its block of a split dim, with no communication. An id outside the dim raises
    `IndexRangeError` (as torch's one_hot); with `strict=False` its row is all zeros instead
    (TensorFlow's and Mesh TF's one_hot: a MoE's tokens past an expert's capacity, say).

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="vocab:tp")
    >>> ids = tm.distribute(torch.tensor([2, 0]), "batch", mesh)
    >>> tm.one_hot(ids, "vocab:4").full()
    tensor([[0., 0., 1., 0.],
            [1., 0., 0., 0.]])
    """
    (d,) = parse_dims([dim]) if isinstance(dim, Dim) else parse_dims(dim)
    if d.name in index.dims:
        raise DimError(f"one_hot: the index already has a dim {d.name!r}; name the new dim differently.")
    mesh = index.mesh
    dims = index.shape + (d,)
    layout = mesh.layout_of(dims)
    if strict:
        check_ids(index, d.size, "one_hot", d.name)
    index = to_layout(index, mesh.layout_of(index.shape))
    slicer = mesh.impl.slice_mesh
    axes = layout.axes[-1]

    def fn(coords, ids):
        start, stop = block_bounds(d.size, slicer, axes, coords)
        return (ids.unsqueeze(-1) - start == torch.arange(stop - start, device=ids.device)).to(dtype)

    # The index keeps its (rules) layout; the new dim takes its rule.
    data = mesh.impl.slicewise_at(fn, index._data)
    return MeshTensor(data, traced.layout(dims, index.tensor_layout.axes + (axes,)), mesh)
