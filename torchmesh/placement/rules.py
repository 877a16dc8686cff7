"""Layout rules: which named dims are split over which mesh axes ("batch:dp;ff:tp").

Rules are global: a dim name is laid out the same way in every tensor. A dim may be split
over several axes, major to minor, written with commas: "batch:dp,fsdp" splits batch over
dp, and each dp block again over fsdp. A name without a rule is replicated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from torchmesh.errors import ParseError, TorchMeshError
from torchmesh.placement.dims import check_name
from torchmesh.placement.mesh_shape import MeshShape


@dataclass(frozen=True, slots=True)
class LayoutRules:
    """An immutable map from dim names to tuples of mesh axes (major to minor).

    >>> LayoutRules.parse("batch:dp;ff:tp").axes_of("ff")
    ('tp',)
    """

    rules: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Derived once: hashed on every op of the eager hot path (plan caches are keyed by it).
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(self.rules))
        seen: set[str] = set()
        for dim, axes in self.rules:
            check_name(dim)
            if dim in seen:
                raise ParseError(f"layout rules {self}: dim {dim!r} has two rules; give each dim one rule.")
            seen.add(dim)
            if not axes:
                raise ParseError(f"layout rules: dim {dim!r} has a rule with no mesh axis.")
            for a in axes:
                check_name(a, "mesh axis")
            if len(set(axes)) != len(axes):
                raise ParseError(f"layout rules: dim {dim!r} names a mesh axis twice in {axes}.")

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self):  # rebuilt on unpickling: a string's hash differs between processes
        return (LayoutRules, (self.rules,))

    @staticmethod
    def parse(spec: RulesLike) -> LayoutRules:
        """Read "batch:dp;ff:tp", {"batch": "dp", "embed": ("dp", "fsdp")}, pairs, or LayoutRules."""
        if isinstance(spec, LayoutRules):
            return spec
        if spec is None:
            return LayoutRules()
        if isinstance(spec, str):
            return _parse_rules(spec)
        items = spec.items() if isinstance(spec, Mapping) else spec
        try:
            pairs = [(d, (a,) if isinstance(a, str) else tuple(a)) for d, a in items]
        except (TypeError, ValueError):
            raise ParseError(f"cannot read layout rules from {spec!r}: write 'batch:dp;ff:tp'.") from None
        return LayoutRules(tuple(pairs))

    def axes_of(self, dim: str) -> tuple[str, ...]:
        return self._table().get(dim, ())

    def _table(self) -> dict[str, tuple[str, ...]]:
        return _table(self)

    @property
    def axes(self) -> frozenset[str]:
        return frozenset(a for _, axes in self.rules for a in axes)

    def restricted_to(self, mesh: MeshShape) -> LayoutRules:
        """These rules less the axes `mesh` lacks (a dim left with no axis loses its rule)."""
        kept = ((d, tuple(a for a in axes if a in mesh.names)) for d, axes in self.rules)
        return LayoutRules(tuple((d, axes) for d, axes in kept if axes))

    def updated(self, other: RulesLike) -> LayoutRules:
        """These rules with `other`'s rules added or replacing ours for the same dims."""
        other = LayoutRules.parse(other)
        table = dict(self.rules)
        table.update(other.rules)
        return LayoutRules(tuple(table.items()))

    def __str__(self) -> str:
        return ";".join(f"{d}:{','.join(a)}" for d, a in self.rules)


RulesLike = str | Mapping[str, str | Iterable[str]] | Iterable[tuple] | LayoutRules | None


@lru_cache(maxsize=1024)
def _table(rules: LayoutRules) -> dict[str, tuple[str, ...]]:
    return dict(rules.rules)


@lru_cache(maxsize=256)
def _parse_rules(text: str) -> LayoutRules:
    pairs = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        dim, sep, axes = part.partition(":")
        axes_t = tuple(a.strip() for a in axes.split(","))
        if not sep or not dim.strip() or not all(axes_t):
            raise ParseError(
                f"layout rules {text!r}: cannot read {part!r}. Write each rule as dim:axis (or "
                f"dim:axis1,axis2 to split over several axes, major first), separated by ';', "
                f"for example 'batch:dp;ff:tp'."
            )
        pairs.append((dim.strip(), axes_t))
    try:
        return LayoutRules(tuple(pairs))
    except TorchMeshError as e:  # a bad name or a repeated dim: said with the text it came from
        raise type(e)(f"layout rules {text!r}: {e}") from None
