"""Changing a tensor's layout or its dim names: `relayout`, `rename`, `to_layout`.

The steps come from `placement.plan.plan_relayout`: all-gather where a split is undone,
a local slice where one is added, all-to-all where an axis moves between dims.
"""

from __future__ import annotations

from torchmesh import errors
from torchmesh.comm import traced
from torchmesh.comm.backend import compiling
from torchmesh.comm.executor import run_steps
from torchmesh.errors import DimError
from torchmesh.placement.dims import Dim, check_name
from torchmesh.placement.layout import TensorLayout, resolve
from torchmesh.placement.plan import plan_relayout
from torchmesh.placement.rules import LayoutRules, RulesLike
from torchmesh.tensor.mesh_tensor import MeshTensor


def to_layout(x: MeshTensor, layout: TensorLayout) -> MeshTensor:
    """`x` laid out as `layout` (same dims, any order of axes); differentiable."""
    if layout == x._layout:
        return x
    if layout.dims != x._layout.dims:
        raise DimError(f"to_layout: target dims {layout.names} differ from the tensor's {x.dims}.")
    src, impl = x._layout, x._mesh.impl
    with impl.op_scope(lambda: f"relayout {src} -> {layout}"):
        steps = traced.plan_relayout_traced(src, layout) if compiling() else plan_relayout(src, layout)
        data = run_steps(impl, x._data, src, steps)
    return MeshTensor(data, layout, x._mesh)


def relayout(x: MeshTensor, rules: RulesLike = None) -> MeshTensor:
    """The same values laid out by `rules` ("batch:dp;ff:tp"); dims they do not name are
    replicated. With no rules: the mesh's own rules.

    Later ops read their inputs in the mesh's rules (relaying out if needed), so a custom
    layout is for holding a tensor differently (e.g. parameters sharded for storage).

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="ff:tp")
    >>> x = tm.distribute(torch.randn(4, 8), "batch ff", mesh)
    >>> with tm.comm_stats() as stats:
    ...     y = tm.relayout(x, "batch:tp")   # tp moves from ff to batch
    >>> y.layout, stats.counts
    ({'batch': 'tp'}, {'all_to_all': 1})
    >>> bool((y.full() == x.full()).all())
    True
    """
    mesh = x._mesh
    if compiling():
        parsed = mesh.rules if rules is None else traced.parse_rules_traced(rules)
        return to_layout(x, traced.resolve_traced(x._layout.dims, parsed, mesh.shape))
    parsed = mesh.rules if rules is None else LayoutRules.parse(rules)
    return to_layout(x, resolve(x._layout.dims, parsed, mesh.shape))


def rename(x: MeshTensor, mapping: dict[str, str] | None = None, **renames: str) -> MeshTensor:
    """Rename dims (`x.rename(ff="hidden")`); the result is laid out by the rules for the new
    names: split to replicated is an all-gather, replicated to split a local slice.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="ff:tp")
    >>> h = tm.distribute(torch.randn(4, 8), "batch ff", mesh)
    >>> with tm.comm_stats() as stats:
    ...     g = tm.rename(h, ff="hidden")   # hidden has no rule: gathered
    >>> g.dims, g.layout, stats.counts
    (('batch', 'hidden'), {}, {'all_gather': 1})
    """
    renames = {**(mapping or {}), **renames}
    missing = [old for old in renames if old not in x.dims]
    if missing:
        raise DimError(errors.missing_dims("rename", missing, x.dims))
    dims = tuple(Dim(check_name(renames.get(d.name, d.name)), d.size) for d in x._layout.dims)
    names = [d.name for d in dims]
    if len(set(names)) != len(names):
        raise DimError(errors.rename_collision(x.sizes, renames, names))
    relabelled = MeshTensor(x._data, traced.layout(dims, x._layout.axes), x._mesh)
    return to_layout(relabelled, x._mesh.layout_of(dims))
