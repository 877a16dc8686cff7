"""MeshTensor's operators and methods, installed from explicit tables (no __getattr__ magic),
and its `__torch_function__`, which routes torch functions through the same tables.

Torch habits that address dims by position (`x[0]`, `x.view(...)`, `x.T`, `x.sum(-1)`,
`torch.matmul`) are TypeErrors naming the named way to do it (`tm.slice`, `tm.rearrange`,
`x.sum('ff')`, `tm.einsum`); docs/tutorial.md lists them ("Torch functions and torch habits").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from torchmesh import errors
from torchmesh.errors import ArgumentTypeError
from torchmesh.tensor import elementwise as ew
from torchmesh.tensor import reduce as red
from torchmesh.tensor import relayout as rel
from torchmesh.tensor import scan, selection, stacking
from torchmesh.tensor.mesh_tensor import MeshTensor


# ---- operators and elementwise methods ------------------------------------------------------
def _operator(op: Callable) -> Callable:
    def method(self: MeshTensor, other: Any) -> MeshTensor:
        return ew.binary(op, self, other)

    method.__name__ = getattr(op, "__name__", "op")
    return method


def _reflected(op: Callable) -> Callable:
    def method(self: MeshTensor, other: Any) -> MeshTensor:
        return ew.binary(op, other, self)

    return method


def _elementwise(fn: Callable, name: str) -> Callable:
    def method(self: MeshTensor, *args: Any, **kwargs: Any) -> MeshTensor:
        return ew.pointwise(fn, self, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"Elementwise {getattr(fn, '__name__', name)} (arguments as torch's); no communication."
    return method


def _where(self: MeshTensor, condition: Any, other: Any) -> MeshTensor:
    """`x.where(condition, y)`: x where condition holds, else y (torch.Tensor.where's order)."""
    return ew.where(condition, self, other)


for _name, _op in ew.OPERATORS.items():
    setattr(MeshTensor, _name, _operator(_op))
for _name, _op in ew.REFLECTED.items():
    setattr(MeshTensor, _name, _reflected(_op))
for _name, _unary in ew.UNARY_OPERATORS.items():
    setattr(MeshTensor, _name, _elementwise(_unary, _name))
for _name in ew.TORCH_ELEMENTWISE:
    setattr(MeshTensor, _name, _elementwise(getattr(torch, _name), _name))
for _name, _fn in ew.FUNCTIONAL_METHODS.items():
    setattr(MeshTensor, _name, _elementwise(_fn, _name))


# ---- reductions, renames, casts ---------------------------------------------------------------
def _to(self: MeshTensor, *args: Any, **kwargs: Any) -> MeshTensor:
    """Cast dtype and/or device shard by shard (`x.to(torch.bfloat16)`, `x.to("cuda")`)."""
    return self._map(lambda t: t.to(*args, **kwargs))


def _contiguous(self: MeshTensor) -> MeshTensor:
    """Every shard contiguous in memory (a no-op on shards that are); no communication."""
    return self._map(torch.Tensor.contiguous)


METHODS: dict[str, Callable] = {
    "sum": red.reduce_sum,
    "mean": red.reduce_mean,
    "max": red.reduce_max,
    "min": red.reduce_min,
    "amax": red.reduce_max,
    "amin": red.reduce_min,
    "any": red.reduce_any,
    "all": red.reduce_all,
    "logsumexp": red.logsumexp,
    "softmax": red.softmax,
    "log_softmax": red.log_softmax,
    "rename": rel.rename,
    "relayout": rel.relayout,
    "to": _to,
    "contiguous": _contiguous,
    "float": lambda self: _to(self, torch.float32),
    "double": lambda self: _to(self, torch.float64),
    "half": lambda self: _to(self, torch.float16),
    "bfloat16": lambda self: _to(self, torch.bfloat16),
    "bool": lambda self: _to(self, torch.bool),
    "long": lambda self: _to(self, torch.int64),
    "int": lambda self: _to(self, torch.int32),
    "cpu": lambda self: _to(self, "cpu"),
    "cuda": lambda self: _to(self, "cuda"),
    "type_as": lambda self, other: _to(self, other.dtype),
    "argmax": selection.argmax,
    "argmin": selection.argmin,
    "top_k": selection.top_k,
    "cumsum": scan.cumsum,
    "unstack": stacking.unstack,
    "where": _where,
}
for _name, _fn in METHODS.items():
    setattr(MeshTensor, _name, _fn)


# ---- positional torch habits: what to write instead -------------------------------------------
_REARRANGE = (
    "tm.rearrange(x, 'batch (heads d_head) -> batch heads d_head', heads=4) splits, merges and reorders dims by name"
)
_ORDER = (
    "ops match dims by name, so their order needs no changing (x * y lines up 'batch' with "
    "'batch' whatever the order); tm.rearrange(x, 'a b -> b a') sets the storage order, and "
    "x.rename(seq='kv_seq') renames a dim (e.g. to contract it against another tensor's)"
)
_BROADCAST = (
    "ops broadcast a missing dim by name (x + b adds b over every dim of x it lacks); to "
    "make a new dim, multiply by tm.ones('new:4', x.mesh)"
)
_SLICE = (
    "tm.slice(x, 'seq', start, stop) takes a range of a named dim; tm.gather(x, ids, 'vocab') "
    "picks entries by index; tm.where(mask, x, 0) masks"
)
_EINSUM = (
    "tm.einsum('batch d, d ff -> batch ff', x, w) contracts the dims named on both sides (tm.nn.Linear for a layer)"
)
_SPLIT = "tm.split(x, 'ff', sizes) splits a named dim, tm.unstack(x, 'dim') makes one tensor per entry"
_RANDOM = (
    "tm.dropout(x, p) / tm.nn.Dropout(p), tm.rand and tm.randn draw values that are the same on "
    "every mesh and backend (seeded by tm.manual_seed)"
)

#: Positional torch habits -> the named way. Installed as methods that raise a TypeError,
#: and used for the matching torch functions (torch.reshape, torch.matmul...).
POSITIONAL: dict[str, str] = {
    **dict.fromkeys(["view", "reshape", "flatten", "unflatten", "ravel", "view_as", "reshape_as"], _REARRANGE),
    **dict.fromkeys(
        ["transpose", "permute", "t", "movedim", "moveaxis", "swapaxes", "swapdims", "adjoint", "T", "mT", "H", "mH"],
        _ORDER,
    ),
    **dict.fromkeys(
        [
            "unsqueeze",
            "squeeze",
            "expand",
            "expand_as",
            "broadcast_to",
            "repeat",
            "tile",
            "atleast_1d",
            "atleast_2d",
            "atleast_3d",
        ],
        _BROADCAST,
    ),
    **dict.fromkeys(
        [
            "narrow",
            "select",
            "index_select",
            "gather",
            "take",
            "take_along_dim",
            "masked_select",
            "nonzero",
            "argwhere",
            "__getitem__",
            "__setitem__",
        ],
        _SLICE,
    ),
    **dict.fromkeys(
        [
            "matmul",
            "__matmul__",
            "__rmatmul__",
            "mm",
            "bmm",
            "mv",
            "dot",
            "vdot",
            "inner",
            "outer",
            "ger",
            "tensordot",
            "einsum",
            "addmm",
            "addbmm",
            "baddbmm",
            "addmv",
            "addr",
            "chain_matmul",
            "linear",
            "bilinear",
        ],
        _EINSUM,
    ),
    **dict.fromkeys(
        ["cat", "concat", "concatenate", "hstack", "vstack", "dstack", "column_stack", "row_stack"],
        "tm.concat([x, y], 'seq') concatenates along a named dim",
    ),
    "stack": "tm.stack([x, y], 'new_dim') stacks along a new named dim",
    **dict.fromkeys(
        ["split", "chunk", "tensor_split", "unsafe_split", "hsplit", "vsplit", "dsplit", "split_with_sizes", "unbind"],
        _SPLIT,
    ),
    **dict.fromkeys(
        ["topk", "sort", "argsort", "msort", "kthvalue"],
        "tm.top_k(x, 'vocab', k) returns the k largest values and their indices along a named dim",
    ),
    **dict.fromkeys(["argmax", "argmin"], "tm.argmax(x, 'vocab') / tm.argmin(x, 'vocab') along a named dim"),
    **dict.fromkeys(
        ["cumsum", "cumprod", "cummax", "cummin", "logcumsumexp"],
        "tm.cumsum(x, 'seq') sums cumulatively along a named dim",
    ),
    **dict.fromkeys(["roll"], "tm.shift(x, 'seq', n, wrap=True) shifts along a named dim"),
    **dict.fromkeys(["pad", "constant_pad_nd"], "tm.pad(x, 'seq', before, after) pads a named dim"),
    "flip": "tm.rearrange or tm.gather(x, reversed_ids, 'seq')",
    "embedding": "tm.embedding(ids, table, 'vocab') looks up rows of a named vocab dim (tm.nn.Embedding for a layer)",
    "one_hot": "tm.one_hot(ids, tm.Dim('vocab', n))",
    "scaled_dot_product_attention": "tm.attention (or the layer tm.nn.MultiHeadAttention) attends over named dims",
    **dict.fromkeys(
        ["layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm", "normalize"],
        "tm.nn.LayerNorm(mesh, 'd_model:n') / tm.nn.RMSNorm normalise over a named dim",
    ),
    **dict.fromkeys(["cross_entropy", "nll_loss"], "tm.nn.cross_entropy(logits, targets, 'vocab')"),
    **dict.fromkeys(
        [
            "dropout",
            "dropout1d",
            "dropout2d",
            "dropout3d",
            "alpha_dropout",
            "feature_alpha_dropout",
            "feature_dropout",
            "rrelu",
            "bernoulli",
            "multinomial",
            "poisson",
            "normal",
            "rand_like",
            "randn_like",
            "randint_like",
        ],
        _RANDOM,
    ),
    **dict.fromkeys(
        ["std", "var", "std_mean", "var_mean"], "((x - x.mean('d')) ** 2).mean('d') is the variance over a named dim"
    ),
    "softmin": "tm.softmax(-x, 'vocab')",
    **dict.fromkeys(["equal", "allclose"], "bool((x == y).all()) or torch.allclose(x.full(), y.full())"),
    **dict.fromkeys(["tolist", "numpy"], "x.full().tolist() / x.full().numpy() on the global value"),
}


def _refuse_method(name: str, instead: str) -> Callable:
    call = {
        "__getitem__": "x[...]",
        "__setitem__": "x[...] = value",
        "__matmul__": "x @ y",
        "__rmatmul__": "y @ x",
    }.get(name, f"x.{name}(...)")

    def method(self: MeshTensor, *args: Any, **kwargs: Any) -> Any:
        raise ArgumentTypeError(errors.positional_method(call, self.dims, instead))

    method.__name__ = name
    method.__doc__ = f"Refused: {call} is positional. Instead: {instead}."
    return method


def _refuse_property(name: str, instead: str) -> property:
    def getter(self: MeshTensor) -> Any:
        raise ArgumentTypeError(errors.positional_method(f"x.{name}", self.dims, instead))

    return property(getter, doc=f"Refused: x.{name} is positional. Instead: {instead}.")


for _name, _instead in POSITIONAL.items():
    # Only torch.Tensor's own methods (x.view, x.T, x[0]); a real method defined elsewhere wins.
    if not hasattr(torch.Tensor, _name) or _name in vars(MeshTensor):
        continue
    if isinstance(getattr(torch.Tensor, _name), property) or _name in ("T", "mT", "H", "mH"):
        setattr(MeshTensor, _name, _refuse_property(_name, _instead))
    else:
        setattr(MeshTensor, _name, _refuse_method(_name, _instead))


# ---- __torch_function__ ---------------------------------------------------------------------
def _by_name(name: str, fn: Callable, positional: tuple[str, ...]) -> Callable:
    """torch.sum(x, 'ff'), torch.softmax(x, dim='ff'), F.softmax(...): torch's positional
    arguments after the tensor (dim, keepdim or dtype) become `fn`'s keywords."""

    def call(x: MeshTensor, *args: Any, **kwargs: Any) -> MeshTensor:
        kwargs.pop("_stacklevel", None)  # F.softmax's bookkeeping
        if kwargs.get("out") is not None:
            raise ArgumentTypeError(errors.not_in_place(f"{name}(..., out=)"))
        kwargs.pop("out", None)
        if len(args) > len(positional):
            raise ArgumentTypeError(
                f"{name} takes at most {len(positional)} arguments after the tensor "
                f"({', '.join(positional)}); got {args!r}."
            )
        for key, value in zip(positional, args):
            if key in kwargs:
                raise ArgumentTypeError(f"{name}: got {key} twice, by position and as {key}=.")
            kwargs[key] = value
        if kwargs.get("dtype", 0) is None:
            kwargs.pop("dtype")
        return fn(x, **kwargs)

    return call


def _extreme(reduce: Callable, elementwise: Callable) -> Callable:
    """torch.max(x): the maximum of every element; torch.max(x, y): elementwise; torch.max(x, dim)
    returns (values, indices) in torch, so it names tm.argmax for the indices."""

    def call(x: Any, *args: Any, **kwargs: Any) -> MeshTensor:
        other = args[0] if args else kwargs.get("other")
        if isinstance(other, MeshTensor):
            return ew.pointwise(elementwise, x, other)
        if args or kwargs:
            name = reduce.__name__.removeprefix("reduce_")
            dims = args[0] if args else kwargs.get("dim")
            if isinstance(dims, int) or (isinstance(dims, (tuple, list)) and any(isinstance(d, int) for d in dims)):
                raise ArgumentTypeError(errors.positional_dim(f"x.{name}", dims, x.dims))
            raise ArgumentTypeError(
                f"torch.{name}(x, dim) returns (values, indices); on MeshTensors the values are "
                f"x.{name}({dims!r}) (like torch.a{name}) and the indices tm.arg{name}(x, {dims!r})."
            )
        return reduce(x)

    return call


_REDUCTION_ARGS = ("dim", "keepdim")
_SOFTMAX_ARGS = ("dim", "dtype")
#: torch functions over dims, by name -> (torchmesh op, torch's positional arguments after the tensor).
BY_NAME: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "torch.sum": (red.reduce_sum, _REDUCTION_ARGS),
    "torch.mean": (red.reduce_mean, _REDUCTION_ARGS),
    "torch.amax": (red.reduce_max, _REDUCTION_ARGS),
    "torch.amin": (red.reduce_min, _REDUCTION_ARGS),
    "torch.any": (red.reduce_any, _REDUCTION_ARGS),
    "torch.all": (red.reduce_all, _REDUCTION_ARGS),
    "torch.logsumexp": (red.logsumexp, _REDUCTION_ARGS),
    "torch.special.logsumexp": (red.logsumexp, _REDUCTION_ARGS),
    "torch.softmax": (red.softmax, _SOFTMAX_ARGS),
    "torch.log_softmax": (red.log_softmax, _SOFTMAX_ARGS),
    "torch.special.softmax": (red.softmax, _SOFTMAX_ARGS),
    "torch.special.log_softmax": (red.log_softmax, _SOFTMAX_ARGS),
    "F.softmax": (red.softmax, _SOFTMAX_ARGS),
    "F.log_softmax": (red.log_softmax, _SOFTMAX_ARGS),
}
_NAMESPACES = {"torch": torch, "torch.special": torch.special, "F": F}
TORCH_FUNCTIONS: dict[Callable, Callable] = {
    **{
        getattr(_NAMESPACES[name.rpartition(".")[0]], name.rpartition(".")[2]): _by_name(name, fn, args)
        for name, (fn, args) in BY_NAME.items()
    },
    torch.max: _extreme(red.reduce_max, torch.maximum),
    torch.min: _extreme(red.reduce_min, torch.minimum),
    torch.detach: MeshTensor.detach,
    torch.where: ew.where,
}


def _refused_functions() -> dict[Callable, str]:
    """Every torch / torch.nn.functional function named in POSITIONAL -> the named way."""
    table: dict[Callable, str] = {}
    for name, instead in POSITIONAL.items():
        for module in (torch, F):
            fn = getattr(module, name, None)
            if callable(fn) and not isinstance(fn, type):
                table.setdefault(fn, instead)
    return table


REFUSED: dict[Callable, str] = _refused_functions()


def _torch_function(cls, func, types, args=(), kwargs=None):
    kwargs = kwargs or {}
    if func in TORCH_FUNCTIONS:
        return TORCH_FUNCTIONS[func](*args, **kwargs)
    if func in ew.ELEMENTWISE:
        if len(args) == 1 and not kwargs:
            return ew.unary(func, args[0])
        return ew.pointwise(func, *args, **kwargs)
    module = getattr(func, "__module__", "") or ""
    short = getattr(func, "__name__", repr(func))
    prefix = "F" if "nn" in module else "torch.special" if "special" in module else "torch"
    raise ArgumentTypeError(
        errors.torch_function_refused(f"{prefix}.{short.removeprefix('special_')}", REFUSED.get(func))
    )


MeshTensor.__torch_function__ = classmethod(_torch_function)
