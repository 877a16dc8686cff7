"""Checks of the plain arguments of the public API (numbers, ints, meshes of several inputs),
so a bad one raises `ArgumentError` / `ArgumentTypeError` naming it, before any work is done,
instead of an internal error from deep inside an op."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

from torchmesh.errors import ArgumentError, ArgumentTypeError


def integer(call: str, name: str, value: Any, minimum: int | None = None) -> int:
    """`value` as an int (numpy and 0-d integer tensors too, not bools), at least `minimum`."""
    if isinstance(value, bool):
        raise ArgumentTypeError(f"{call}: {name}={value!r} is a bool; {name} is an int.")
    try:
        out = operator.index(value)
    except TypeError:
        raise ArgumentTypeError(f"{call}: {name}={value!r} is a {type(value).__name__}; {name} is an int.") from None
    if minimum is not None and out < minimum:
        raise ArgumentError(f"{call}: {name}={out} is below {minimum}; {name} is an int >= {minimum}.")
    return out


def probability(call: str, name: str, value: Any, fix: str) -> float:
    """`value` as a float in [0, 1] (a real number: numpy and 0-d tensors too)."""
    if isinstance(value, bool) or (not isinstance(value, numbers.Real) and not _real_tensor(value)):
        raise ArgumentTypeError(
            f"{call}({name}={value!r}): {name} is a number (a float in [0, 1]), "
            f"not a {type(value).__name__}. Fix: {fix}."
        )
    p = float(value)
    if not (0.0 <= p <= 1.0) or math.isnan(p):
        raise ArgumentError(f"{call}({name}={value!r}): {name} is a probability, a number in [0, 1]. Fix: {fix}.")
    return p


def _real_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex()


def dtype(call: str, value: Any, floating: bool = False) -> Any:
    """None or a torch.dtype (a floating one where values are drawn)."""
    import torch

    if value is not None and not isinstance(value, torch.dtype):
        raise ArgumentTypeError(
            f"{call}: dtype={value!r} is a {type(value).__name__}, not a torch.dtype. "
            f"Fix: dtype=torch.float32 (or leave it out)."
        )
    if floating and value is not None and not value.is_floating_point:
        raise ArgumentError(
            f"{call}: dtype={value} is not a floating dtype; random values are drawn "
            f"as floats. Fix: dtype=torch.float32, then .to(...) if needed."
        )
    return value


def number(call: str, name: str, value: Any) -> Any:
    """A fill value: a Python or numpy number, a bool, or a 0-d tensor."""
    import torch

    if isinstance(value, (numbers.Number, np_number())) or (isinstance(value, torch.Tensor) and value.dim() == 0):
        return value
    raise ArgumentTypeError(
        f"{call}: {name}={value!r} is a {type(value).__name__}, not a number. Fix: {name}=0.5 (a number)."
    )


def np_number() -> tuple[type, ...]:
    try:
        import numpy
    except ImportError:  # pragma: no cover
        return ()
    return (numpy.number, numpy.bool_)
