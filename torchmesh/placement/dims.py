"""Named dims: `Dim(name, size)` and the parsing of dim lists such as "batch d" or "batch:8 d:16".

A tensor's shape is an ordered tuple of `Dim`s with unique names. The order fixes only the
local storage; every operation goes by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from torchmesh.errors import DimError, ParseError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_name(name: object, what: str = "dim") -> str:
    """Return `name` if it is a valid identifier-like name, else raise ParseError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ParseError(
            f"{what} name {name!r} is not valid: use letters, digits and '_', not starting with a digit "
            f"(for example 'batch', 'd_model', 'heads')."
        )
    return name


@dataclass(frozen=True, slots=True)
class Dim:
    """A named tensor dimension with a global size (Mesh TF's `Dimension`).

    >>> Dim("batch", 8)
    Dim('batch', 8)
    """

    name: str
    size: int

    def __post_init__(self) -> None:
        check_name(self.name)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise DimError(f"dim {self.name!r} has size {self.size!r}; a dim size is an int >= 0.")

    def __repr__(self) -> str:
        return f"Dim({self.name!r}, {self.size})"

    def __str__(self) -> str:
        return f"{self.name}:{self.size}"


#: What the API accepts wherever a list of dims is needed.
DimsLike = str | Sequence[Dim | str] | Mapping[str, int]


@lru_cache(maxsize=4096)
def parse_names(text: str) -> tuple[str, ...]:
    """Parse "batch d" (or "batch, d") into ("batch", "d"), checking names are valid and unique."""
    if not isinstance(text, str):
        raise ParseError(f"expected dim names as a string like 'batch d', got {text!r}")
    names = tuple(t for t in re.split(r"[\s,]+", text.strip()) if t)
    for n in names:
        if not _NAME.fullmatch(n):
            raise ParseError(
                f"dims {text!r}: dim name {n!r} is not valid: use letters, digits and '_', not starting "
                f"with a digit, separated by spaces (for example 'batch seq d_model')."
            )
    check_unique(names, f"dims {text!r}")
    return names


def dim_names(dims: str | Dim | Iterable[str | Dim]) -> tuple[str, ...]:
    """The names of dims given as "batch d", as one `Dim`, or as a sequence of names and `Dim`s."""
    if isinstance(dims, str):
        return parse_names(dims)
    if isinstance(dims, Dim):
        return (dims.name,)
    return tuple(d.name if isinstance(d, Dim) else d for d in dims)


def check_unique(names: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise DimError(f"{what}: dim {n!r} appears twice; the dims of one tensor have unique names.")
        seen.add(n)


def parse_dims(spec: DimsLike | Iterable[Dim | str], sizes: Mapping[str, int] | None = None) -> tuple[Dim, ...]:
    """Turn any dims-like value into a tuple of `Dim`s.

    Accepts "batch:8 d:16", a sequence of `Dim`s (or names, sized from `sizes`), or a
    mapping {"batch": 8, "d": 16}. Names given without sizes take them from `sizes`.
    """
    if isinstance(spec, Mapping):
        dims = tuple(Dim(n, s) for n, s in spec.items())
    elif isinstance(spec, str):
        try:
            dims = tuple(_parse_token(tok, sizes) for tok in re.split(r"[\s,]+", spec.strip()) if tok)
        except ParseError as e:  # say which string: the token alone may be a fragment of it
            raise ParseError(f"dims {spec!r}: {e}") from None
    elif isinstance(spec, Iterable):
        dims = tuple(d if isinstance(d, Dim) else _parse_token(d, sizes) for d in spec)
    else:
        raise ParseError(f"cannot read dims from {spec!r}: give 'batch:8 d:16', [Dim(...)], or a dict.")
    check_unique([d.name for d in dims], f"dims {spec!r}")
    return dims


def _parse_token(token: object, sizes: Mapping[str, int] | None) -> Dim:
    if not isinstance(token, str):
        raise ParseError(f"cannot read a dim from {token!r}: give a name, 'name:size', or a Dim.")
    name, sep, size = token.partition(":")
    check_name(name)
    if sep:
        if not (size.isascii() and size.isdigit()):
            raise ParseError(f"dim {token!r}: the size after ':' must be a non-negative integer.")
        return Dim(name, int(size))
    if sizes is None or name not in sizes:
        raise ParseError(f"dim {name!r} has no size: write '{name}:<size>' or pass a Dim.")
    return Dim(name, int(sizes[name]))


def dims_str(dims: Iterable[Dim]) -> str:
    """'batch:8 d:16' for a tuple of dims (the form accepted back by `parse_dims`)."""
    return " ".join(str(d) for d in dims)
