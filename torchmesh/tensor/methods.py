"""MeshTensor's operators and methods, installed from explicit tables (no __getattr__ magic),
and its `__torch_function__`, which routes torch functions through the same tables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from torchmesh.tensor import elementwise as ew
from torchmesh.tensor import reduce as red
from torchmesh.tensor import relayout as rel
from torchmesh.tensor import scan, selection, stacking
from torchmesh.tensor.mesh_tensor import MeshTensor


def _operator(op: Callable) -> Callable:
    def method(self: MeshTensor, other: Any) -> MeshTensor:
        return ew.pointwise(op, self, other)

    method.__name__ = getattr(op, "__name__", "op")
    return method


def _reflected(op: Callable) -> Callable:
    def method(self: MeshTensor, other: Any) -> MeshTensor:
        return ew.pointwise(op, other, self)

    return method


def _unary(fn: Callable) -> Callable:
    def method(self: MeshTensor, *args: Any, **kwargs: Any) -> MeshTensor:
        return ew.pointwise(fn, self, *args, **kwargs)

    method.__doc__ = f"Elementwise {getattr(fn, '__name__', fn)}; no communication."
    return method


for _name, _op in ew.OPERATORS.items():
    setattr(MeshTensor, _name, _operator(_op))
for _name, _op in ew.REFLECTED.items():
    setattr(MeshTensor, _name, _reflected(_op))
for _name, _op in ew.UNARY_OPERATORS.items():
    setattr(MeshTensor, _name, _unary(_op))
for _name, _fn in {**ew.UNARY, **ew.NARY}.items():
    if _name != "where":
        setattr(MeshTensor, _name, _unary(_fn))


def _to(self: MeshTensor, *args: Any, **kwargs: Any) -> MeshTensor:
    """Cast dtype and/or device shard by shard (`x.to(torch.bfloat16)`, `x.to("cuda")`)."""
    return self._map(lambda t: t.to(*args, **kwargs))


METHODS: dict[str, Callable] = {
    "sum": red.reduce_sum, "mean": red.reduce_mean, "max": red.reduce_max, "min": red.reduce_min,
    "any": red.reduce_any, "all": red.reduce_all, "logsumexp": red.logsumexp,
    "softmax": red.softmax, "log_softmax": red.log_softmax,
    "rename": rel.rename, "relayout": rel.relayout, "to": _to,
    "float": lambda self: _to(self, torch.float32), "double": lambda self: _to(self, torch.float64),
    "half": lambda self: _to(self, torch.float16), "bfloat16": lambda self: _to(self, torch.bfloat16),
    "bool": lambda self: _to(self, torch.bool), "long": lambda self: _to(self, torch.int64),
    "int": lambda self: _to(self, torch.int32), "cpu": lambda self: _to(self, "cpu"),
    "cuda": lambda self: _to(self, "cuda"), "type_as": lambda self, other: _to(self, other.dtype),
    "argmax": selection.argmax, "argmin": selection.argmin, "top_k": selection.top_k,
    "cumsum": scan.cumsum, "unstack": stacking.unstack,
}
for _name, _fn in METHODS.items():
    setattr(MeshTensor, _name, _fn)


# ---- __torch_function__ --------------------------------------------------------------------
def _named(fn: Callable) -> Callable:
    """torch.softmax(x, dim="ff") and friends: the dim given by name, positionally or as dim=."""

    def call(x: MeshTensor, dim: Any = None, *args: Any, **kwargs: Any) -> MeshTensor:
        kwargs.pop("_stacklevel", None)  # F.softmax's bookkeeping
        if kwargs.get("dtype") is None:
            kwargs.pop("dtype", None)
        if args or kwargs:  # keepdim, dtype, out...: refuse rather than silently ignore
            raise TypeError(
                f"{fn.__name__} on a MeshTensor takes the dims by name only; got extra arguments "
                f"{args or ''}{kwargs or ''}. Dims are never kept (names make broadcasting exact): "
                f"use x.{fn.__name__.removeprefix('reduce_')}('<dim>') and cast with x.to(dtype)."
            )
        return fn(x, dim)

    return call


TORCH_FUNCTIONS: dict[Callable, Callable] = {
    torch.sum: _named(red.reduce_sum), torch.mean: _named(red.reduce_mean),
    torch.amax: _named(red.reduce_max), torch.amin: _named(red.reduce_min),
    torch.logsumexp: _named(red.logsumexp), torch.softmax: _named(red.softmax),
    torch.log_softmax: _named(red.log_softmax), F.softmax: _named(red.softmax),
    F.log_softmax: _named(red.log_softmax), torch.Tensor.softmax: _named(red.softmax),
    torch.detach: MeshTensor.detach, torch.where: ew.where,
}
_POINTWISE = {*ew.UNARY.values(), *ew.NARY.values(), *ew.FUNCTIONAL}


def _torch_function(cls, func, types, args=(), kwargs=None):
    kwargs = kwargs or {}
    if func in TORCH_FUNCTIONS:
        return TORCH_FUNCTIONS[func](*args, **kwargs)
    if func in _POINTWISE:
        return ew.pointwise(func, *args, **kwargs)
    name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
    raise TypeError(
        f"torch function {name} is not supported on MeshTensor. Elementwise functions, reductions "
        f"and softmax over named dims are (see torchmesh.tensor.methods.TORCH_FUNCTIONS); for other "
        f"computations use tm.einsum, tm.rearrange, or apply it per shard with x.full() or x.shards."
    )


MeshTensor.__torch_function__ = classmethod(_torch_function)
