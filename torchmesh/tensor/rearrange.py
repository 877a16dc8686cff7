"""`rearrange`: einops patterns over dim names ("batch (heads dh) -> batch heads dh").

Names on the left are the input's dims; a group on the left splits one input dim into
named parts, a group on the right merges dims into one. Groups are named with a suffix,
`(heads dh):ff`; unnamed, a left group takes the input dims not named on the left (in
order) and a right group is named by joining its parts with '_'.

Communication: none when a split dim stays the outermost part of its group and the rules
split that part (or the merged dim) the same way; otherwise the input dim is gathered
first and the result sliced to the rules' layout (a documented relayout).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from functools import lru_cache

from einops import EinopsError
from einops.parsing import ParsedExpression

from torchmesh.comm import traced
from torchmesh.comm.backend import compiling
from torchmesh.errors import ArgumentTypeError, DimError, ParseError
from torchmesh.placement.dims import Dim
from torchmesh.placement.layout import TensorLayout, check, parts
from torchmesh.placement.mesh_shape import MeshShape
from torchmesh.placement.rules import LayoutRules
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.relayout import to_layout

_GROUP_NAME = re.compile(r"\)\s*:\s*([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class RearrangePlan:
    source: TensorLayout  # input layout for the local computation
    split_sizes: tuple[tuple[int, ...], ...]  # per input dim: full sizes of its parts
    merged: tuple[int, ...]  # per output dim: how many parts it merges
    perm: tuple[int, ...]
    computed: TensorLayout  # output dims, as computed locally


_ENTRY = re.compile(r"\(([^()]*)\)(?:\s*:\s*([A-Za-z_][A-Za-z0-9_]*))?|([^\s()]+)")


def _parse_side(text: str, pattern: str) -> tuple[list[list[str]], list[str | None]]:
    """Entries of one side: groups of names, and the ':name' given to each (or None)."""
    try:  # einops checks the syntax (balanced groups, valid identifiers)
        parsed = ParsedExpression(_GROUP_NAME.sub(")", text))
    except EinopsError as e:
        raise ParseError(f"rearrange {pattern!r}: {e}") from None
    if parsed.has_ellipsis:
        raise ParseError(f"rearrange {pattern!r}: '...' is not supported; name every dim.")
    groups: list[list[str]] = []
    names: list[str | None] = []
    for inner, name, atom in _ENTRY.findall(text):
        if atom:
            if not atom.isidentifier():
                raise ParseError(
                    f"rearrange {pattern!r}: {atom!r} is not a dim name (anonymous sizes "
                    f"such as '1' are not supported)."
                )
            groups.append([atom])
            names.append(None)
        else:
            parts_ = inner.split()
            if not parts_ or not all(p.isidentifier() for p in parts_):
                raise ParseError(f"rearrange {pattern!r}: group ({inner}) must hold dim names.")
            groups.append(parts_)
            names.append(name or None)
    return groups, names


@lru_cache(maxsize=1024)
def plan_rearrange(
    pattern: str,
    layout: TensorLayout,
    sizes: tuple[tuple[str, int], ...],
    rules: LayoutRules,
    mesh: MeshShape,
    slicer: MeshShape,
) -> RearrangePlan:
    left_text, arrow, right_text = pattern.partition("->")
    if not arrow:
        raise ParseError(f"rearrange {pattern!r}: write 'input dims -> output dims'.")
    left, left_names = _parse_side(left_text, pattern)
    right, right_names = _parse_side(right_text, pattern)
    if len(left) != len(layout.dims):
        raise DimError(
            f"rearrange {pattern!r}: the left side has {len(left)} entries but the tensor has dims {layout.names}."
        )
    # Match left entries to input dims: atomic names and named groups by name, the rest in order.
    named = {g[0] for g, n in zip(left, left_names) if n is None and len(g) == 1} | {n for n in left_names if n}
    unmatched = iter([n for n in layout.names if n not in named])
    dim_of_entry = []
    for g, n in zip(left, left_names):
        dim = n if n else (g[0] if len(g) == 1 and g[0] in layout.names else next(unmatched, None))
        if dim is None or dim not in layout.names:
            raise DimError(f"rearrange {pattern!r}: cannot match {g} to a dim of the tensor {layout.names}.")
        dim_of_entry.append(dim)
    given = dict(sizes)
    elem: dict[str, int] = {}
    for g, dim in zip(left, dim_of_entry):
        total = layout.sizes[dim]
        unknown = [p for p in g if p not in given and not (len(g) == 1)]
        known = 1
        for p in g:
            if len(g) == 1:
                elem[p] = total
            elif p in given:
                elem[p] = given[p]
                known *= given[p]
        if len(unknown) > 1:
            raise DimError(f"rearrange {pattern!r}: give the sizes of all but one of {unknown} (e.g. {unknown[0]}=4).")
        if unknown:
            if known == 0 or total % known:
                raise DimError(
                    f"rearrange {pattern!r}: {dim!r} of size {total} cannot be split into {g} with sizes {given}."
                )
            elem[unknown[0]] = total // known
        prod = 1
        for p in g:
            prod *= elem[p]
        if prod != total:
            raise DimError(f"rearrange {pattern!r}: {g} multiply to {prod}, but {dim!r} has size {total}.")
    for name, size in given.items():  # a size keyword that is ignored would hide a mistake
        if name not in elem:
            raise DimError(
                f"rearrange {pattern!r}: the size keyword {name}={size} names no part of the "
                f"left side {sorted(elem)}. Fix: drop it, or name a part the pattern splits."
            )
        if elem[name] != size:
            raise DimError(
                f"rearrange {pattern!r}: the size keyword {name}={size} disagrees with the tensor, "
                f"where {name!r} has size {elem[name]}. Fix: {name}={elem[name]}, or leave it out."
            )
    flat_right = [p for g in right for p in g]
    if sorted(flat_right) != sorted(elem):
        raise DimError(f"rearrange {pattern!r}: the right side must use each of {sorted(elem)} exactly once.")

    out_names = [n if n else (g[0] if len(g) == 1 else "_".join(g)) for g, n in zip(right, right_names)]
    out_dims = tuple(Dim(n, _prod(elem[p] for p in g)) for n, g in zip(out_names, right))
    firsts_left = {g[0] for g in left}
    # A dim passed through whole (alone in its groups on both sides) keeps its split, even or
    # not; a split merged dim lines up with its first part's blocks only when they divide.
    passed = {g[0] for g in left if len(g) == 1} & {g[0] for g in right if len(g) == 1}
    comp: dict[str, tuple[str, ...]] = dict.fromkeys(elem, ())
    for name, g in zip(out_names, right):
        axes = rules.axes_of(name)
        if g[0] in firsts_left and (g[0] in passed or elem[g[0]] % parts(mesh, axes) == 0):
            comp[g[0]] = axes
    source = traced.layout(layout.dims, tuple(comp[g[0]] for g in left))
    check(source, mesh, str(rules))
    order = [p for g in left for p in g]
    perm = tuple(order.index(p) for p in flat_right)
    computed = traced.layout(out_dims, tuple(comp[g[0]] for g in right))
    return RearrangePlan(
        source,
        tuple(tuple(elem[p] for p in g) for g in left),
        tuple(len(g) for g in right),
        perm,
        computed,
    )


_PLAN = traced.planner(plan_rearrange)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def rearrange(x: MeshTensor, pattern: str, **sizes: int) -> MeshTensor:
    """Split, merge and reorder dims by name with an einops pattern.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="heads:tp")
    >>> h = tm.distribute(torch.randn(3, 8), "batch ff", mesh)
    >>> tm.rearrange(h, "batch (heads dh) -> batch heads dh", heads=4).sizes
    {'batch': 3, 'heads': 4, 'dh': 2}
    """
    if not isinstance(pattern, str):
        raise ArgumentTypeError(
            f"rearrange(x, pattern): the pattern is a str such as 'a (b c) -> a b c'; got a {type(pattern).__name__}."
        )
    for name, size in sizes.items():
        try:
            sizes[name] = operator.index(size) if not isinstance(size, bool) else -1
        except TypeError:
            sizes[name] = -1
        if sizes[name] < 0:
            raise DimError(
                f"rearrange {pattern!r}: the size keyword {name}={size!r} is not a size; "
                f"sizes are ints >= 0 (e.g. {name}=4)."
            )
    mesh = x.mesh
    given = tuple(sorted(sizes.items()))
    if compiling():
        frozen = (traced.freeze_layout(x.tensor_layout), tuple((n, traced.static(s)) for n, s in given))
        meshes = (traced.freeze_rules(mesh.rules), traced.freeze_shape(mesh.shape))
        plan = traced.constant(_PLAN, pattern, *frozen, *meshes, traced.freeze_shape(mesh.impl.slice_mesh))
    else:
        plan = plan_rearrange(pattern, x.tensor_layout, given, mesh.rules, mesh.shape, mesh.impl.slice_mesh)
    src = to_layout(x, plan.source)
    out_dims = plan.computed.dims

    def local(t):  # sizes from the block itself: a first part may be split unevenly
        shape: list[int] = []
        for i, full_sizes in enumerate(plan.split_sizes):
            rest = _prod(full_sizes[1:])
            shape.extend((t.shape[i] // rest if rest else 0, *full_sizes[1:]))
        t = t.reshape(shape).permute(plan.perm)
        out, k = [], 0
        for n in plan.merged:
            out.append(_prod(t.shape[k : k + n]))
            k += n
        return t.reshape(out)

    out = MeshTensor(mesh.impl.slicewise(local, src._data), plan.computed, mesh)
    return to_layout(out, mesh.layout_of(out_dims))
