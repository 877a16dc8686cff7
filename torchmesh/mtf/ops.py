"""Mesh TF's `mesh_tensorflow/ops.py` over torchmesh: same names, signatures and numbers, eager.

A ported program keeps its model code; only the preamble changes:

    import torchmesh.mtf as mtf
    mesh = mtf.make_mesh("b:2,m:2", "batch:b,vocab:m")          # or tm.Mesh(...)
    x = mtf.import_tf_tensor(mesh, torch_tensor, mtf.Shape([batch, vocab]))
    y = mtf.reduce_sum(mtf.gelu(x), reduced_dim=vocab)         # MeshTensors, computed now
    y.full()                                                    # the result, a torch.Tensor

What differs from Mesh TF, and why:
- No graph, no lowering: every op runs when called and returns a `tm.MeshTensor`, so
  `mtf.Graph`, `mtf.Mesh(graph, name)` and `mtf.Lowering` do not exist. The mesh is a
  `tm.Mesh`: `make_mesh` reads Mesh TF's strings, and `convert_to_shape` /
  `convert_to_layout_rules` results may be passed to `tm.Mesh(shape, rules=...)` directly.
- Gradients: `gradients(ys, xs, grad_ys)` runs torch autograd; an `x` is any MeshTensor on the
  tape (a variable, or a tensor imported from a torch tensor with `requires_grad=True`).
- Variables: `get_variable` keeps one `Variable` per (mesh, full name); calling it again
  (the next step) returns the same variable's current value. Names are prefixed by the
  enclosing `variable_scope`s (a stand-in for `tf.variable_scope`). Initializers follow TF's
  contract `fn(shape, dtype=..., partition_info=None)`; `zeros_initializer()` and friends
  stand in for TF's.
- Random ops draw torchmesh's seeded values (`tm.rand`/`tm.randn`): the same on every mesh
  and layout, but not TensorFlow's numbers.
- dtypes are torch dtypes; indices from `top_k`, `top_1`, `argmax` are int32 as in Mesh TF.
- `x.shape` of a MeshTensor is a tuple of Dims; `mtf.Shape(x.shape)` adds Mesh TF's accessors
  (`.dims`, `-`, `.size`...). Every function here accepts either.

Mesh TF's numerics are kept where torchmesh's own ops choose differently: `gelu` is the tanh
approximation (`tm`'s is erf), `reduce_max`/`reduce_min` send the whole gradient to every
tied element (`tm`'s share it), `reduce_mean` multiplies by the size ratio, `cumsum` keeps
the input dtype, `one_hot` gives zeros for ids outside the dim, and binary ops order their
output dims as Mesh TF does (a supersequence of one input's dims, else x1's then x2's new ones).
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import math
import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, SupportsIndex, overload

import torch
import torch.nn.functional as F

from torchmesh.errors import ArgumentError, ArgumentTypeError, DimError, ParseError
from torchmesh.placement.dims import Dim
from torchmesh.placement.mesh_shape import MeshShape
from torchmesh.placement.rules import LayoutRules
from torchmesh.tensor import reduce as _reduce
from torchmesh.tensor import selection as _selection
from torchmesh.tensor import slicing as _slicing
from torchmesh.tensor import stacking as _stacking
from torchmesh.tensor.construct import arange, distribute, full
from torchmesh.tensor.einsum import einsum as _tm_einsum
from torchmesh.tensor.elementwise import cast as _tm_cast
from torchmesh.tensor.elementwise import pointwise
from torchmesh.tensor.elementwise import where as _tm_where
from torchmesh.tensor.gather import gather as _tm_gather
from torchmesh.tensor.gather import one_hot as _tm_one_hot
from torchmesh.tensor.mesh import Mesh
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.random import next_seed, rand, randn
from torchmesh.tensor.rearrange import rearrange
from torchmesh.tensor.relayout import rename, to_layout
from torchmesh.tensor.scan import cumsum as _tm_cumsum

# ---- dimensions, shapes, meshes and rules ---------------------------------------------------

Dimension = Dim


def convert_to_dimension(d: Any) -> Dim | None:
    """`mtf.convert_to_dimension`: a Dimension from a Dimension or a (name, size) pair; None stays None.

    >>> import torchmesh.mtf as mtf
    >>> mtf.convert_to_dimension(("x", 5))
    Dim('x', 5)
    """
    if d is None or isinstance(d, Dim):
        return d
    try:
        name, size = d
    except (TypeError, ValueError):
        raise ArgumentTypeError(
            f"cannot convert {d!r} to a Dimension: give mtf.Dimension('x', 5) or a pair ('x', 5)."
        ) from None
    if not isinstance(name, str) or isinstance(size, bool) or not isinstance(size, int):
        raise ArgumentTypeError(f"cannot convert {d!r} to a Dimension: the pair is (name: str, size: int).")
    return Dim(name, size)


class Shape(tuple):
    """Mesh TF's `mtf.Shape`: an ordered tuple of Dimensions with Mesh TF's accessors.

    A tuple of `Dim`s, so torchmesh takes it wherever it takes dims, and it equals the
    `x.shape` of a MeshTensor with those dims. `+` appends dims, `-` removes them.

    >>> import torchmesh.mtf as mtf
    >>> s = mtf.Shape([mtf.Dimension("batch", 8), mtf.Dimension("d", 16)])
    >>> s.to_integer_list, s.size, s.dimension_names, s - s[0]
    ([8, 16], 128, ['batch', 'd'], Shape[d=16])
    """

    def __new__(cls, dims: Iterable[Any] = ()) -> Shape:
        if isinstance(dims, str):
            return convert_to_shape(dims)  # type: ignore[return-value]
        converted = [convert_to_dimension(d) for d in dims]
        names = [d.name for d in converted if d is not None]
        if len(set(names)) != len(names):
            raise DimError(f"Shape {converted}: a dim name appears twice; the dims of one shape are unique.")
        return super().__new__(cls, converted)

    @property
    def dims(self) -> list[Dim]:
        return list(self)

    @property
    def ndims(self) -> int:
        return len(self)

    @property
    def to_integer_list(self) -> list[int]:
        return [d.size for d in self]

    @property
    def size(self) -> int:
        return math.prod(self.to_integer_list)

    @property
    def rank(self) -> int:
        return len(self)

    @property
    def dimension_names(self) -> list[str]:
        return [d.name for d in self]

    @property
    def to_string(self) -> str:
        return "Shape[" + ", ".join(f"{d.name}={d.size}" for d in self) + "]"

    @property
    def cumprod(self) -> list[int]:
        """The exclusive cumulative product of the sizes (Mesh TF's strides, major first)."""
        out = [1]
        for s in self.to_integer_list:
            out.append(out[-1] * s)
        return out[:-1]

    def cumprod_to_tensor_axis(self, cumprod: int) -> int | None:
        """The largest axis i with self.cumprod[i] == cumprod, or None."""
        found = [i for i, c in enumerate(self.cumprod) if c == cumprod]
        return found[-1] if found else None

    def __repr__(self) -> str:
        return self.to_string

    def __add__(self, other: Any) -> Shape:
        if isinstance(other, Dim):
            other = [other]
        return Shape(list(self) + list(other))

    def __sub__(self, other: Any) -> Shape:
        if other is None:
            return self
        if isinstance(other, Dim):
            if other not in self:
                raise DimError(
                    f"{self} - {other}: the shape has no such dim. Use shape - [dim] where the dim may be absent."
                )
            other = [other]
        drop = {_name(d) for d in other}
        return Shape([d for d in self if d.name not in drop])

    @overload
    def __getitem__(self, key: SupportsIndex) -> Dim: ...
    @overload
    def __getitem__(self, key: builtins.slice) -> Shape: ...
    def __getitem__(self, key: Any) -> Any:
        got = super().__getitem__(key)
        return Shape(got) if isinstance(key, builtins.slice) else got

    def rename_dimension(self, old_name: str, new_name: str) -> Shape:
        """A copy with one dim renamed."""
        self.get_dim_by_name(old_name)
        return Shape([Dim(new_name, d.size) if d.name == old_name else d for d in self])

    def resize_dimension(self, name: str, new_size: int) -> Shape:
        """A copy with one dim resized."""
        self.get_dim_by_name(name)
        return Shape([Dim(name, new_size) if d.name == name else d for d in self])

    def get_dim_by_name(self, name: str) -> Dim:
        """The dim called `name` (DimError if there is none)."""
        for d in self:
            if d.name == name:
                return d
        raise DimError(f"dim {name!r} is not in {self.to_string}; its dims are {self.dimension_names}.")


def _pairs(text: str, what: str, example: str) -> list[tuple[str, str]]:
    """Mesh TF's pair syntax: 'a:x' items separated by any of ' ,.;'."""
    out = []
    for item in re.sub(r"[,.;]", " ", text).split():
        parts = item.split(":")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ParseError(f"{what} {text!r}: cannot read {item!r}; write name:value pairs, e.g. {example!r}.")
        out.append((parts[0], parts[1]))
    return out


def convert_to_shape(x: Any) -> Shape | None:
    """`mtf.convert_to_shape`: a Shape from a Shape, dims, pairs or a string; None stays None.

    Strings in Mesh TF's syntax ("b:2,m:2", separators any of ' ,.;') and torchmesh's
    ("b:2;m:2") both read. The result of a mesh string may be given to `tm.Mesh`.

    >>> import torchmesh as tm, torchmesh.mtf as mtf
    >>> mtf.convert_to_shape("b:2,m:2") == mtf.convert_to_shape("b:2;m:2")
    True
    >>> tm.Mesh(mtf.convert_to_shape("b:2,m:2")).axis_names
    ('b', 'm')
    """
    if x is None or isinstance(x, Shape):
        return x
    if isinstance(x, str):
        pairs = _pairs(x, "shape", "b:2,m:2")
        bad = [v for _, v in pairs if not (v.isascii() and v.isdigit())]
        if bad:
            raise ParseError(f"shape {x!r}: the size {bad[0]!r} is not a non-negative integer.")
        return Shape([Dim(n, int(v)) for n, v in pairs])
    if isinstance(x, MeshShape):
        return Shape([Dim(n, s) for n, s in x.axes])
    return Shape(x)


def convert_to_layout_rules(x: Any) -> LayoutRules:
    """`mtf.convert_to_layout_rules`: torchmesh `LayoutRules` (what `tm.Mesh(rules=...)` takes).

    Reads Mesh TF's syntax ("batch:b,vocab:m", separators any of ' ,.;', or a list of
    (dim, mesh axis) pairs) and torchmesh's ("batch:b;vocab:m", where a comma lists several
    axes for one dim: "batch:b,m"). A string with ';' and a ',' after a ':' is read as
    torchmesh's. A dim named in several pairs is split over those axes, in order.

    >>> import torchmesh.mtf as mtf
    >>> str(mtf.convert_to_layout_rules("batch:b,vocab:m")), str(mtf.convert_to_layout_rules([("d_ff", "m")]))
    ('batch:b;vocab:m', 'd_ff:m')
    """
    if isinstance(x, LayoutRules):
        return x
    if x is None:
        return LayoutRules()
    if isinstance(x, str):
        if ";" in x and re.search(r":[^;]*,", x):
            return LayoutRules.parse(x)
        pairs: Iterable[Any] = _pairs(x, "layout rules", "batch:b,vocab:m")
    elif isinstance(x, dict):
        return LayoutRules.parse(x)
    else:
        pairs = x
    table: dict[str, tuple[str, ...]] = {}
    for pair in pairs:
        try:
            dim, axis = pair
        except (TypeError, ValueError):
            raise ParseError(f"layout rules {x!r}: {pair!r} is not a (dim, mesh axis) pair.") from None
        table[dim] = table.get(dim, ()) + ((axis,) if isinstance(axis, str) else tuple(axis))
    return LayoutRules(tuple(table.items()))


def make_mesh(mesh_shape: Any, layout_rules: Any = None, backend: str = "sim", **options: Any) -> Mesh:
    """A `tm.Mesh` from Mesh TF's `mesh_shape` and `layout` values (strings in either syntax,
    Shapes, pairs). Rules naming an axis the mesh lacks are dropped, as Mesh TF ignores them.

    >>> import torchmesh.mtf as mtf
    >>> mesh = mtf.make_mesh("b:2,m:2", "batch:b,vocab:m,heads:model")
    >>> str(mesh.shape), str(mesh.rules)
    ('b:2;m:2', 'batch:b;vocab:m')
    """
    shape = convert_to_shape(mesh_shape)
    if shape is None:
        raise ArgumentTypeError("make_mesh(mesh_shape, ...): give the mesh shape, e.g. 'b:2,m:2'.")
    mesh = MeshShape(tuple((d.name, d.size) for d in shape))
    rules = convert_to_layout_rules(layout_rules).restricted_to(mesh)
    return Mesh(mesh, rules=rules, backend=backend, **options)


def tensor_dim_to_mesh_dim_size(layout: Any, mesh_shape: Any, tensor_dim: Dim) -> int:
    """`mtf.tensor_dim_to_mesh_dim_size`: how many ways the rules split `tensor_dim` on the mesh.

    >>> import torchmesh.mtf as mtf
    >>> mtf.tensor_dim_to_mesh_dim_size("heads:m", "b:2,m:4", mtf.Dimension("heads", 8))
    4
    """
    rules = convert_to_layout_rules(layout)
    shape = convert_to_shape(mesh_shape) or Shape()
    sizes = {d.name: d.size for d in shape}
    return math.prod(sizes[a] for a in rules.axes_of(tensor_dim.name) if a in sizes)


def tensor_dim_to_size_per_split(layout: Any, mesh_shape: Any, tensor_dim: Dim) -> int:
    """`mtf.tensor_dim_to_size_per_split`: the dim's size on each device (it must divide evenly).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mtf.tensor_dim_to_size_per_split("heads:m", "b:2,m:4", mtf.Dimension("heads", 8))
    2
    """
    n = tensor_dim_to_mesh_dim_size(layout, mesh_shape, tensor_dim)
    if tensor_dim.size % n:
        raise DimError(f"{tensor_dim} does not split evenly into {n} parts under the layout {layout!r}.")
    return tensor_dim.size // n


# ---- helpers ------------------------------------------------------------------------------


def _name(dim: Any) -> str:
    if isinstance(dim, str):
        return dim
    if isinstance(dim, Dim):
        return dim.name
    d = convert_to_dimension(dim)
    if d is None:
        raise ArgumentTypeError("a dim is needed here: give a name or a mtf.Dimension, not None.")
    return d.name


def _dim_of(x: MeshTensor, dim: Any) -> Dim:
    """The Dim of x called like `dim` (a name or a Dimension)."""
    name = _name(dim)
    if name not in x.sizes:
        raise DimError(f"{name!r} is not a dim of the tensor {x.dims}.")
    return Dim(name, x.sizes[name])


def _shape_of(x: MeshTensor) -> Shape:
    return Shape(x.shape)


def _check_tensor(x: Any, op: str) -> MeshTensor:
    if not isinstance(x, MeshTensor):
        raise ArgumentTypeError(
            f"mtf.{op}: got a {type(x).__name__}, not a MeshTensor; bring a torch tensor in with "
            f"mtf.import_tf_tensor(mesh, tensor, shape)."
        )
    return x


def _arrange(x: MeshTensor, shape: Any) -> MeshTensor:
    """x with exactly the dims of `shape`, in that order: transposed, broadcast to dims it
    lacks and summed over dims `shape` lacks (Mesh TF's einsum of one operand)."""
    dims = tuple(convert_to_shape(shape) or ())
    if tuple(x.shape) == dims:
        return x
    return _tm_einsum([x], output_shape=list(dims))


def _is_subsequence(short: Sequence[Any], long: Sequence[Any]) -> bool:
    it = iter(long)
    return all(any(a == b for b in it) for a in short)


def _binary_shape(s1: Shape, s2: Shape, output_shape: Any) -> Shape:
    """Mesh TF's `_infer_binary_broadcast_shape`."""
    given = convert_to_shape(output_shape)
    if given is not None:
        return given
    if _is_subsequence(s1, s2):
        return s2
    if _is_subsequence(s2, s1):
        return s1
    return Shape(list(s1) + [d for d in s2 if d not in s1])


def _binary(fn: Callable[..., Any], x1: Any, x2: Any, output_shape: Any, op: str) -> MeshTensor:
    if not isinstance(x1, MeshTensor) and not isinstance(x2, MeshTensor):
        raise ArgumentTypeError(f"mtf.{op}: one of the two operands must be a MeshTensor.")
    if not isinstance(x2, MeshTensor):
        return _arrange(pointwise(fn, x1, x2), output_shape or x1.shape)
    if not isinstance(x1, MeshTensor):
        return _arrange(pointwise(fn, x1, x2), output_shape or x2.shape)
    out = pointwise(fn, x1, x2)
    return _arrange(out, _binary_shape(_shape_of(x1), _shape_of(x2), output_shape))


def _unary(fn: Callable[[torch.Tensor], torch.Tensor], x: MeshTensor, op: str) -> MeshTensor:
    return pointwise(fn, _check_tensor(x, op))


# ---- import, constants, ranges ------------------------------------------------------------


def import_tf_tensor(mesh: Mesh, tf_tensor: Any, shape: Any = None, name: str | None = None) -> MeshTensor:
    """`mtf.import_tf_tensor`: a global torch tensor (or array, number) laid out on the mesh by its rules.

    A torch tensor with `requires_grad=True` stays on the autograd tape, so `gradients`
    can differentiate with respect to the result.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="batch:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.zeros(8, 16), mtf.Shape("batch:8 d:16"))
    >>> x.sizes, x.layout
    ({'batch': 8, 'd': 16}, {'batch': 'b1'})
    """
    t = tf_tensor if isinstance(tf_tensor, torch.Tensor) else torch.as_tensor(tf_tensor)
    dims = convert_to_shape(shape if shape is not None else [])
    if dims is None or list(t.shape) != dims.to_integer_list:
        raise DimError(
            f"import_tf_tensor: the tensor's shape {list(t.shape)} differs from the shape "
            f"{dims.to_string if dims is not None else None}. Fix: give a Shape with sizes {list(t.shape)}."
        )
    return distribute(t, list(dims), mesh)


def import_fully_replicated(mesh: Mesh, tf_tensor: Any, shape: Any, name: str | None = None) -> MeshTensor:
    """`mtf.import_fully_replicated`: the same as `import_tf_tensor` in value (Mesh TF imports it
    replicated, then lays it out by the rules; here it is laid out by the rules directly).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> mtf.import_fully_replicated(mesh, torch.ones(3), "d:3").layout
    {'d': 'b1'}
    """
    return import_tf_tensor(mesh, tf_tensor, shape, name)


def constant(mesh: Mesh, value: Any, shape: Any = None, dtype: torch.dtype = torch.float32) -> MeshTensor:
    """`mtf.constant`: every element `value` (a scalar), dims from `shape` (a scalar tensor if None).

    >>> import torchmesh as tm, torchmesh.mtf as mtf
    >>> mtf.constant(tm.Mesh("b1:2"), 3, "d:2", dtype=torch.int32).full()
    tensor([3, 3], dtype=torch.int32)
    """
    return full(list(convert_to_shape(shape) or ()), value, mesh, dtype=dtype)


def fill(mesh: Mesh, shape: Any, value: Any, dtype: torch.dtype = torch.float32) -> MeshTensor:
    """Every element `value` (tf.fill's order of arguments after the mesh); see `constant`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> mtf.fill(mesh, "d:2", 7.0).full()
    tensor([7., 7.])
    """
    return constant(mesh, value, shape, dtype)


def zeros(mesh: Mesh, shape: Any, dtype: torch.dtype = torch.float32) -> MeshTensor:
    """`mtf.zeros(mesh, shape, dtype)`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> mtf.zeros(mesh, "d:3", dtype=torch.int32).full()
    tensor([0, 0, 0], dtype=torch.int32)
    """
    return constant(mesh, 0, shape, dtype)


def ones(mesh: Mesh, shape: Any, dtype: torch.dtype = torch.float32) -> MeshTensor:
    """`mtf.ones(mesh, shape, dtype)`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> mtf.ones(mesh, "d:3").full()
    tensor([1., 1., 1.])
    """
    return constant(mesh, 1, shape, dtype)


def zeros_like(t: MeshTensor) -> MeshTensor:
    """`mtf.zeros_like(t)`: zeros with t's mesh, dims and dtype.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.zeros_like(x).full()
    tensor([0., 0., 0.])
    """
    return zeros(t.mesh, t.shape, t.dtype)


def ones_like(t: MeshTensor) -> MeshTensor:
    """`mtf.ones_like(t)`: ones with t's mesh, dims and dtype.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.ones_like(x).full()
    tensor([1., 1., 1.])
    """
    return ones(t.mesh, t.shape, t.dtype)


def mtf_range(mesh: Mesh, dim: Any, dtype: torch.dtype, name: str | None = None) -> MeshTensor:
    """`mtf.range(mesh, dim, dtype)`: 0, 1, ..., dim.size - 1 along `dim`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mtf.range(tm.Mesh("b1:2", rules="d:b1"), mtf.Dimension("d", 4), torch.float32).full()
    tensor([0., 1., 2., 3.])
    """
    d = convert_to_dimension(dim)
    if d is None:
        raise ArgumentTypeError("mtf.range(mesh, dim, dtype): dim is a mtf.Dimension, not None.")
    return arange(d, mesh, dtype=dtype)


def stop_gradient(x: MeshTensor) -> MeshTensor:
    """`mtf.stop_gradient`: the same values, off the autograd tape.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.stop_gradient(x).full()
    tensor([-1.0000,  0.5000,  2.0000])
    """
    return _check_tensor(x, "stop_gradient").detach()


def identity(x: MeshTensor, name: str = "identity") -> MeshTensor:
    """`mtf.identity`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.identity(x).full()
    tensor([-1.0000,  0.5000,  2.0000])
    """
    return _check_tensor(x, "identity")


# ---- component-wise math ------------------------------------------------------------------


def exp(x: MeshTensor, name: str = "exp") -> MeshTensor:
    """`mtf.exp`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.exp(x).full()
    tensor([0.3679, 1.6487, 7.3891])
    """
    return _unary(torch.exp, x, "exp")


def log(x: MeshTensor, name: str = "log") -> MeshTensor:
    """`mtf.log`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> p = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([0.5, 1.0, 4.0]), "d:3")
    >>> mtf.log(p).full()
    tensor([-0.6931,  0.0000,  1.3863])
    """
    return _unary(torch.log, x, "log")


def sqrt(x: MeshTensor, name: str = "sqrt") -> MeshTensor:
    """`mtf.sqrt`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> p = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([0.5, 1.0, 4.0]), "d:3")
    >>> mtf.sqrt(p).full()
    tensor([0.7071, 1.0000, 2.0000])
    """
    return _unary(torch.sqrt, x, "sqrt")


def rsqrt(x: MeshTensor, name: str = "rsqrt") -> MeshTensor:
    """`mtf.rsqrt`: 1 / sqrt(x).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> p = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([0.5, 1.0, 4.0]), "d:3")
    >>> mtf.rsqrt(p).full()
    tensor([1.4142, 1.0000, 0.5000])
    """
    return _unary(torch.rsqrt, x, "rsqrt")


def square(x: MeshTensor, name: str = "square") -> MeshTensor:
    """`mtf.square`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.square(x).full()
    tensor([1.0000, 0.2500, 4.0000])
    """
    return _unary(torch.square, x, "square")


def sin(x: MeshTensor, name: str = "sin") -> MeshTensor:
    """`mtf.sin`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.sin(x).full()
    tensor([-0.8415,  0.4794,  0.9093])
    """
    return _unary(torch.sin, x, "sin")


def cos(x: MeshTensor, name: str = "cos") -> MeshTensor:
    """`mtf.cos`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.cos(x).full()
    tensor([ 0.5403,  0.8776, -0.4161])
    """
    return _unary(torch.cos, x, "cos")


def sigmoid(x: MeshTensor, name: str = "sigmoid") -> MeshTensor:
    """`mtf.sigmoid`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.sigmoid(x).full()
    tensor([0.2689, 0.6225, 0.8808])
    """
    return _unary(torch.sigmoid, x, "sigmoid")


def tanh(x: MeshTensor, name: str = "tanh") -> MeshTensor:
    """`mtf.tanh`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.tanh(x).full()
    tensor([-0.7616,  0.4621,  0.9640])
    """
    return _unary(torch.tanh, x, "tanh")


def negative(x: MeshTensor, name: str = "negative") -> MeshTensor:
    """`mtf.negative`: -x.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.negative(x).full()
    tensor([ 1.0000, -0.5000, -2.0000])
    """
    return _unary(torch.neg, x, "negative")


def reciprocal(x: MeshTensor, name: str = "reciprocal") -> MeshTensor:
    """`mtf.reciprocal`: 1 / x.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> p = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([0.5, 1.0, 4.0]), "d:3")
    >>> mtf.reciprocal(p).full()
    tensor([2.0000, 1.0000, 0.2500])
    """
    return _unary(torch.reciprocal, x, "reciprocal")


def sign(x: MeshTensor, name: str = "sign") -> MeshTensor:
    """`mtf.sign` (gradient zero).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.sign(x).full()
    tensor([-1.,  1.,  1.])
    """
    return _unary(torch.sign, x, "sign")


def mtf_abs(x: MeshTensor) -> MeshTensor:
    """`mtf.abs`: x * sign(x), as Mesh TF (gradient sign(x), zero at zero).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.mtf_abs(x).full()
    tensor([1.0000, 0.5000, 2.0000])
    """
    return _unary(lambda t: t * torch.sign(t).detach(), x, "abs")


def mtf_pow(x: MeshTensor, y: Any) -> MeshTensor:
    """`mtf.pow(x, y)`: exp(log(x) * y), Mesh TF's formula (so x must be positive).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> p = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([0.5, 1.0, 4.0]), "d:3")
    >>> mtf.mtf_pow(p, 2.0).full()
    tensor([ 0.2500,  1.0000, 16.0000])
    """
    return exp(multiply(log(x), y))


def floor(x: MeshTensor) -> MeshTensor:
    """Elementwise floor (gradient zero).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.floor(x).full()
    tensor([-1.,  0.,  2.])
    """
    return _unary(torch.floor, x, "floor")


def ceil(x: MeshTensor) -> MeshTensor:
    """Elementwise ceil (gradient zero).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.ceil(x).full()
    tensor([-1.,  1.,  2.])
    """
    return _unary(torch.ceil, x, "ceil")


def relu(x: MeshTensor, name: str = "relu") -> MeshTensor:
    """`mtf.relu` (gradient 0 at 0, as Mesh TF).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.relu(x).full()
    tensor([0.0000, 0.5000, 2.0000])
    """
    return _unary(torch.relu, x, "relu")


def leaky_relu(x: MeshTensor, alpha: float = 0.2, name: str = "leaky_relu") -> MeshTensor:
    """`mtf.leaky_relu(x, alpha=0.2)`: x where x > 0, else alpha * x.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.leaky_relu(x).full()
    tensor([-0.2000,  0.5000,  2.0000])
    """
    return _unary(lambda t: F.leaky_relu(t, alpha), x, "leaky_relu")


def elu(x: MeshTensor) -> MeshTensor:
    """`mtf.elu`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.elu(x).full()
    tensor([-0.6321,  0.5000,  2.0000])
    """
    return _unary(F.elu, x, "elu")


def selu(x: MeshTensor) -> MeshTensor:
    """`mtf.selu`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.selu(x).full()
    tensor([-1.1113,  0.5254,  2.1014])
    """
    return _unary(F.selu, x, "selu")


def softplus(x: MeshTensor) -> MeshTensor:
    """`mtf.softplus`: log(1 + exp(x)).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.softplus(x).full()
    tensor([0.3133, 0.9741, 2.1269])
    """
    return _unary(F.softplus, x, "softplus")


def _gelu_tanh(t: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t * t * t)))
    return t * cdf


def gelu(x: MeshTensor) -> MeshTensor:
    """`mtf.gelu`: Mesh TF's tanh approximation, x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    (`tm.nn`'s GELU is the exact erf form; they differ by up to about 2e-4).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2"), torch.tensor([1.0]), "d:1")
    >>> round(mtf.gelu(x).full().item(), 6)
    0.841192
    """
    return _unary(_gelu_tanh, x, "gelu")


def swish(x: MeshTensor) -> MeshTensor:
    """`mtf.swish`: x * sigmoid(x).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.swish(x).full()
    tensor([-0.2689,  0.3112,  1.7616])
    """
    return _unary(lambda t: t * torch.sigmoid(t), x, "swish")


def logical_not(x: MeshTensor, name: str = "logical_not") -> MeshTensor:
    """`mtf.logical_not`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.logical_not(mtf.greater(x, 0.0)).full()
    tensor([ True, False, False])
    """
    return _unary(torch.logical_not, x, "logical_not")


def cast(x: MeshTensor, dtype: torch.dtype, name: str = "cast") -> MeshTensor:
    """`mtf.cast(x, dtype)` (the gradient is cast back).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.cast(x, torch.int32).full()
    tensor([-1,  0,  2], dtype=torch.int32)
    """
    x = _check_tensor(x, "cast")
    return x if x.dtype == dtype else _tm_cast(x, dtype)


def to_float(x: MeshTensor, name: str = "to_float") -> MeshTensor:
    """`mtf.to_float`: cast to float32.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.to_float(mtf.cast(x, torch.int32)).dtype
    torch.float32
    """
    return cast(x, torch.float32)


def to_bfloat16(x: MeshTensor, name: str = "to_bfloat16") -> MeshTensor:
    """`mtf.to_bfloat16`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.to_bfloat16(x).dtype
    torch.bfloat16
    """
    return cast(x, torch.bfloat16)


def to_int32(x: MeshTensor, name: str = "to_int32") -> MeshTensor:
    """`mtf.to_int32`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.tensor([-1.0, 0.5, 2.0]), "d:3")
    >>> mtf.to_int32(x).full()
    tensor([-1,  0,  2], dtype=torch.int32)
    """
    return cast(x, torch.int32)


# ---- binary ops with broadcasting ---------------------------------------------------------


def add(x1: Any, x2: Any, output_shape: Any = None, name: str | None = None) -> MeshTensor:
    """`mtf.add`: x1 + x2 broadcast by name; output dims as Mesh TF orders them (or `output_shape`).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2")
    >>> a = mtf.import_tf_tensor(mesh, torch.ones(2), "b:2")
    >>> c = mtf.import_tf_tensor(mesh, torch.ones(3, 2), "a:3 b:2")
    >>> mtf.add(a, c).dims                    # a's dims are a subsequence of c's
    ('a', 'b')
    """
    return _binary(torch.add, x1, x2, output_shape, "add")


def sub(x1: Any, x2: Any, output_shape: Any = None, name: str | None = None) -> MeshTensor:
    """`mtf.sub`: x1 - x2.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.sub(a, b).full()
    tensor([-1.,  0.,  1.])
    """
    return _binary(torch.sub, x1, x2, output_shape, "sub")


def multiply(x1: Any, x2: Any, output_shape: Any = None, name: str | None = None) -> MeshTensor:
    """`mtf.multiply`: x1 * x2 (an einsum in Mesh TF: `output_shape` may also drop dims, summing them).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.multiply(a, b).full()
    tensor([2., 4., 6.])
    """
    return _binary(torch.mul, x1, x2, output_shape, "multiply")


def divide(x1: Any, x2: Any, output_shape: Any = None, name: str | None = None) -> MeshTensor:
    """`mtf.divide`: x1 * reciprocal(x2), Mesh TF's formula; a number x2 multiplies by 1 / x2.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.divide(a, b).full()
    tensor([0.5000, 1.0000, 1.5000])
    """
    if not isinstance(x2, MeshTensor):
        return _binary(torch.mul, x1, 1.0 / x2, output_shape, "divide")
    return multiply(x1, reciprocal(x2), output_shape)


def minimum(x1: Any, x2: Any, output_shape: Any = None, name: str | None = None) -> MeshTensor:
    """`mtf.minimum` (a number operand broadcasts).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.minimum(a, b).full()
    tensor([1., 2., 2.])
    """
    return _binary(torch.minimum if _both(x1, x2) else _scalar_op(torch.minimum), x1, x2, output_shape, "minimum")


def maximum(x1: Any, x2: Any, output_shape: Any = None, name: str | None = None) -> MeshTensor:
    """`mtf.maximum` (a number operand broadcasts).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.maximum(a, b).full()
    tensor([2., 2., 3.])
    """
    return _binary(torch.maximum if _both(x1, x2) else _scalar_op(torch.maximum), x1, x2, output_shape, "maximum")


def _both(x1: Any, x2: Any) -> bool:
    return isinstance(x1, MeshTensor) and isinstance(x2, MeshTensor)


def _scalar_op(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """fn for one tensor and one number (torch.maximum takes two tensors)."""

    def op(a: Any, b: Any) -> torch.Tensor:
        if isinstance(a, torch.Tensor):
            return fn(a, torch.as_tensor(b, dtype=a.dtype, device=a.device))
        return fn(torch.as_tensor(a, dtype=b.dtype, device=b.device), b)

    return op


def equal(x1: Any, x2: Any, output_shape: Any = None) -> MeshTensor:
    """`mtf.equal` (bool).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.equal(a, b).full()
    tensor([False,  True, False])
    """
    return _binary(torch.eq, x1, x2, output_shape, "equal")


def not_equal(x1: Any, x2: Any, output_shape: Any = None) -> MeshTensor:
    """`mtf.not_equal` (bool).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.not_equal(a, b).full()
    tensor([ True, False,  True])
    """
    return _binary(torch.ne, x1, x2, output_shape, "not_equal")


def less(x1: Any, x2: Any, output_shape: Any = None) -> MeshTensor:
    """`mtf.less` (bool).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.less(a, b).full()
    tensor([ True, False, False])
    """
    return _binary(torch.lt, x1, x2, output_shape, "less")


def less_equal(x1: Any, x2: Any, output_shape: Any = None) -> MeshTensor:
    """`mtf.less_equal` (bool).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.less_equal(a, b).full()
    tensor([ True,  True, False])
    """
    return _binary(torch.le, x1, x2, output_shape, "less_equal")


def greater(x1: Any, x2: Any, output_shape: Any = None) -> MeshTensor:
    """`mtf.greater` (bool).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.greater(a, b).full()
    tensor([False, False,  True])
    """
    return _binary(torch.gt, x1, x2, output_shape, "greater")


def greater_equal(x1: Any, x2: Any, output_shape: Any = None) -> MeshTensor:
    """`mtf.greater_equal` (bool).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.greater_equal(a, b).full()
    tensor([False,  True,  True])
    """
    return _binary(torch.ge, x1, x2, output_shape, "greater_equal")


def logical_and(x1: Any, x2: Any, output_shape: Any = None) -> MeshTensor:
    """`mtf.logical_and` (bool).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.logical_and(mtf.greater(a, 1.5), mtf.less(b, 3.0)).full()
    tensor([False,  True,  True])
    """
    return _binary(torch.logical_and, x1, x2, output_shape, "logical_and")


def logical_or(x1: Any, x2: Any, output_shape: Any = None) -> MeshTensor:
    """`mtf.logical_or` (bool).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.logical_or(mtf.greater(a, 1.5), mtf.less(b, 3.0)).full()
    tensor([True, True, True])
    """
    return _binary(torch.logical_or, x1, x2, output_shape, "logical_or")


def logical_xor(x1: Any, x2: Any, output_shape: Any = None) -> MeshTensor:
    """Elementwise exclusive or (bool).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.logical_xor(mtf.greater(a, 1.5), mtf.less(b, 3.0)).full()
    tensor([ True, False, False])
    """
    return _binary(torch.logical_xor, x1, x2, output_shape, "logical_xor")


def floordiv(x1: Any, x2: Any, output_shape: Any = None) -> MeshTensor:
    """`mtf.floordiv`: x1 // x2.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.floordiv(a, b).full()
    tensor([0., 1., 1.])
    """
    return _binary(torch.floor_divide, x1, x2, output_shape, "floordiv")


def mod(x1: Any, x2: Any, output_shape: Any = None) -> MeshTensor:
    """`mtf.mod`: x1 % x2 (the sign of x2, as Python and TF's floormod).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.mod(a, b).full()
    tensor([1., 0., 1.])
    """
    return _binary(torch.remainder, x1, x2, output_shape, "mod")


def add_n(xs: Sequence[Any]) -> Any:
    """`mtf.add_n`: the sum of a list of tensors (0 for an empty list).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.add_n([a, b, b]).full()
    tensor([5., 6., 7.])
    """
    if not xs:
        return 0
    out = xs[0]
    for x in xs[1:]:
        out = add(out, x)
    return out


def where(condition: MeshTensor, if_true: Any, if_false: Any, output_shape: Any = None) -> MeshTensor:
    """`mtf.where(condition, if_true, if_false)`: if_true where condition holds, else if_false;
    in if_true's dtype, dims ordered as Mesh TF's products order them (or `output_shape`).
    (Mesh TF computes if_true * c + if_false * (1 - c); this selects, so an inf or NaN in the
    branch not taken stays out.)

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.where(mtf.greater(a, 1.5), a, b).full()
    tensor([2., 2., 3.])
    """
    dtype = if_true.dtype if isinstance(if_true, MeshTensor) else if_false.dtype
    out = _tm_where(condition, if_true, if_false)
    out = cast(out, dtype)
    shape = _binary_shape(
        _shape_of(condition), _shape_of(if_true) if isinstance(if_true, MeshTensor) else Shape(), None
    )
    if isinstance(if_false, MeshTensor):
        shape = _binary_shape(shape, _shape_of(if_false), None)
    return _arrange(out, output_shape if output_shape is not None else shape)


# ---- shapes: einsum, broadcast, reshape, rename ---------------------------------------------


def einsum(
    xs: Sequence[MeshTensor], output_shape: Any = None, reduced_dims: Any = None, name: str | None = None
) -> MeshTensor:
    """`mtf.einsum(xs, output_shape=None, reduced_dims=None)`: multiply the inputs, broadcast to
    their union, and sum down to the output. `output_shape` fixes the output's dims and their
    order (dims no input has are broadcast); without it the output keeps the dims not in
    `reduced_dims` (default: those appearing once), in order of appearance.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="ff:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.ones(4, 8), "batch:4 d:8")
    >>> w = mtf.import_tf_tensor(mesh, torch.ones(8, 6), "d:8 ff:6")
    >>> mtf.einsum([x, w], output_shape="ff:6 batch:4").dims
    ('ff', 'batch')
    """
    xs = [_check_tensor(x, "einsum") for x in xs]
    out = convert_to_shape(output_shape)
    seen: dict[str, Dim] = {}
    counts: dict[str, int] = {}
    for x in xs:
        for d in x.shape:
            seen.setdefault(d.name, d)
            counts[d.name] = counts.get(d.name, 0) + 1
    if reduced_dims is not None:
        reduced = [_name(d) for d in reduced_dims]
        if out is None:
            out = Shape([d for n, d in seen.items() if n not in reduced])
        elif set(reduced) != {n for n in seen if n not in out.dimension_names}:
            raise DimError(
                f"einsum: reduced_dims {reduced} contradict output_shape {out.to_string} for inputs with "
                f"dims {list(seen)}. Fix: give one of the two, or make them agree."
            )
    if out is None:
        out = Shape([d for n, d in seen.items() if counts[n] == 1])
    return _tm_einsum(xs, output_shape=list(out))


def matmul(
    a: MeshTensor, b: MeshTensor, output_shape: Any = None, reduced_dims: Any = None, name: str | None = None
) -> MeshTensor:
    """`mtf.matmul(a, b)`: `einsum([a, b], ...)`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.matmul(a, b).full()
    tensor(12.)
    """
    return einsum([a, b], output_shape, reduced_dims)


def broadcast(x: MeshTensor, new_shape: Any) -> MeshTensor:
    """`mtf.broadcast(x, new_shape)`: x repeated over the dims of new_shape it lacks, in its order.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.broadcast(a, "k:2 d:3").full()
    tensor([[1., 2., 3.],
            [1., 2., 3.]])
    """
    return _arrange(_check_tensor(x, "broadcast"), new_shape)


def transpose(x: MeshTensor, new_shape: Any, name: str = "transpose") -> MeshTensor:
    """`mtf.transpose(x, new_shape)`: the same dims in new_shape's order.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.arange(6.0).reshape(2, 3), "a:2 d:3")
    >>> mtf.transpose(x, "d:3 a:2").dims
    ('d', 'a')
    """
    shape = convert_to_shape(new_shape) or Shape()
    if set(_check_tensor(x, "transpose").shape) != set(shape):
        raise DimError(f"transpose: new_shape {shape.to_string} must have the dims of x, {x.shape}.")
    return _arrange(x, shape)


def _reshape_groups(src: Sequence[Dim], dst: Sequence[Dim]) -> list[tuple[list[Dim], list[Dim]]]:
    """Consecutive runs of input and output dims with equal products (row-major reshape)."""
    groups: list[tuple[list[Dim], list[Dim]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        a: list[Dim] = []
        b: list[Dim] = []
        pa = pb = 1
        while True:
            if (a and b and pa == pb) or (i >= len(src) and j >= len(dst)):
                break
            if (pa <= pb or j >= len(dst)) and i < len(src):
                a.append(src[i])
                pa *= src[i].size
                i += 1
            elif j < len(dst):
                b.append(dst[j])
                pb *= dst[j].size
                j += 1
            else:
                break
        # a trailing dim of size 1 on either side joins this group
        while i < len(src) and src[i].size == 1 and not (j < len(dst) and dst[j].size == 1):
            a.append(src[i])
            i += 1
        while j < len(dst) and dst[j].size == 1 and not (i < len(src) and src[i].size == 1):
            b.append(dst[j])
            j += 1
        groups.append((a, b))
    return groups


def reshape(x: MeshTensor, new_shape: Any, name: str = "reshape") -> MeshTensor:
    """`mtf.reshape(x, new_shape)`: x's elements, read in x's dim order (row-major), as new_shape.

    Renames cost nothing; merging or splitting dims goes through `tm.rearrange` (local where
    the split dims stay outermost, else a documented gather).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2"), torch.arange(6.0).reshape(2, 3), "a:2 b:3")
    >>> mtf.reshape(x, "c:3 d:2").full()
    tensor([[0., 1.],
            [2., 3.],
            [4., 5.]])
    """
    x = _check_tensor(x, "reshape")
    shape = convert_to_shape(new_shape) or Shape()
    if shape.size != _shape_of(x).size:
        raise DimError(f"reshape: cannot reshape dims {x.shape} into {shape.to_string}; the sizes differ.")
    if tuple(x.shape) == tuple(shape):
        return x
    if not x.ndim or not shape:  # to or from a scalar: every dim has size 1
        return _arrange(x, shape)
    # einops refuses names that start or end with '_' (Mesh TF's '_low', '_one'): stand-ins
    in_map = {d.name: f"mtf_in_{i}" for i, d in enumerate(x.shape) if _unsafe(d.name)}
    out_map = {d.name: f"mtf_out_{j}" for j, d in enumerate(shape) if _unsafe(d.name)}
    if in_map:
        x = rename(x, in_map)
    dst = [Dim(out_map.get(d.name, d.name), d.size) for d in shape]
    y = _reshape_named(x, dst)
    if out_map:
        y = rename(y, {v: k for k, v in out_map.items()})
    return _arrange(y, shape)


def _unsafe(name: str) -> bool:
    return name.startswith("_") or name.endswith("_")


def _reshape_named(x: MeshTensor, shape: list[Dim]) -> MeshTensor:
    """`reshape` for dim names einops accepts."""
    groups = _reshape_groups(list(x.shape), shape)
    merged_names: list[str] = []
    splits: list[tuple[str, list[Dim]]] = []
    renames: dict[str, str] = {}
    left: list[str] = []
    right: list[str] = []
    for k, (a, b) in enumerate(groups):
        left.extend(d.name for d in a)
        if len(a) == 1 and len(b) == 1:
            right.append(a[0].name)
            renames[a[0].name] = b[0].name
            merged_names.append(a[0].name)
            continue
        tmp = f"_reshape_{k}" if len(b) != 1 else b[0].name
        right.append(f"({' '.join(d.name for d in a)}):{tmp}" if a else f"():{tmp}")
        merged_names.append(tmp)
        if len(b) != 1:
            splits.append((tmp, b))
    # step 1: merge each group's input dims into one dim (renames wait: names may clash)
    y = rearrange(x, f"{' '.join(left)} -> {' '.join(right)}") if left != right else x
    # step 2: renames of single dims, through temporary names so that swaps work
    if renames and any(k != v for k, v in renames.items()):
        tmp_names = {k: f"_rename_{k}" for k, v in renames.items() if k != v}
        y = rename(y, tmp_names)
        y = rename(y, {t: renames[k] for k, t in tmp_names.items()})
    # step 3: split merged dims into the output dims
    for tmp, b in splits:
        names = [renames.get(n, n) for n in y.dims]
        sizes = {d.name: d.size for d in b}
        parts = " ".join(d.name for d in b)
        pattern_out = " ".join(parts if n == tmp else n for n in names)
        pattern_in = " ".join(f"({parts}):{tmp}" if n == tmp else n for n in names)
        y = rearrange(y, f"{pattern_in} -> {pattern_out}", **sizes)
    return y


def rename_dimension(x: MeshTensor, old_name: str, new_name: str) -> MeshTensor:
    """`mtf.rename_dimension`: `x.rename(old_name=new_name)`.

    >>> import torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.zeros("batch:4 d:8", tm.Mesh("b1:2", rules="batch:b1"))
    >>> mtf.rename_dimension(x, "d", "d_model").dims
    ('batch', 'd_model')
    """
    return rename(x, {old_name: new_name})


def replace_dimensions(tensor_or_shape: Any, old_dim_or_dims: Any, new_dim_or_dims: Any) -> Any:
    """`mtf.replace_dimensions`: replace consecutive dims by others (a reshape of a tensor, or a
    new Shape).

    >>> import torchmesh.mtf as mtf
    >>> s = mtf.Shape("a:2 b:6 c:3")
    >>> mtf.replace_dimensions(s, s[1], [mtf.Dimension("b1", 2), mtf.Dimension("b2", 3)])
    Shape[a=2, b1=2, b2=3, c=3]
    """
    if isinstance(tensor_or_shape, MeshTensor):
        new = replace_dimensions(_shape_of(tensor_or_shape), old_dim_or_dims, new_dim_or_dims)
        return reshape(tensor_or_shape, new)
    shape = convert_to_shape(tensor_or_shape) or Shape()
    old = [old_dim_or_dims] if isinstance(old_dim_or_dims, Dim) else list(old_dim_or_dims)
    new = [new_dim_or_dims] if isinstance(new_dim_or_dims, Dim) else list(new_dim_or_dims)
    dims = list(shape)
    try:
        pos = [dims.index(d) for d in old]
    except ValueError:
        pos = []
    if not pos or pos != list(builtins.range(pos[0], pos[0] + len(pos))):
        raise DimError(f"replace_dimensions: {old} must be consecutive dims of {shape.to_string}.")
    return Shape(dims[: pos[0]] + new + dims[pos[0] + len(old) :])


# ---- reductions ---------------------------------------------------------------------------


def _reduction_shape(x: MeshTensor, output_shape: Any, reduced_dim: Any, op: str) -> Shape:
    """Mesh TF's `_reduction_output_shape` (all dims reduced when neither is given)."""
    x = _check_tensor(x, op)
    have = _shape_of(x)
    out = convert_to_shape(output_shape)
    if out is None:
        if reduced_dim is None:
            return Shape()
        name = _name(reduced_dim)
        if name not in x.dims:
            raise DimError(f"{op}: reduced_dim {name!r} is not a dim of the tensor {x.dims}.")
        return have - [name]
    for d in out:
        if d not in have:
            raise DimError(f"{op}: output_shape {out.to_string} names {d}, which the tensor {have.to_string} lacks.")
    if reduced_dim is not None and [_name(reduced_dim)] != [d.name for d in have if d not in out]:
        raise DimError(f"{op}: reduced_dim {reduced_dim} contradicts output_shape {out.to_string}.")
    return out


def _reduced(x: MeshTensor, out: Shape) -> tuple[str, ...]:
    keep = set(out.dimension_names)
    return tuple(n for n in x.dims if n not in keep)


def reduce_sum(
    x: MeshTensor,
    disable_positional_args: None = None,
    output_shape: Any = None,
    reduced_dim: Any = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.reduce_sum(x, output_shape=..., reduced_dim=...)`: all dims when neither is given;
    the output has output_shape's dim order.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="a:b1"), torch.ones(2, 3), "a:2 b:3")
    >>> mtf.reduce_sum(x, reduced_dim=mtf.Dimension("a", 2)).full()
    tensor([2., 2., 2.])
    """
    out = _reduction_shape(x, output_shape, reduced_dim, "reduce_sum")
    names = _reduced(x, out)
    return _arrange(_reduce.reduce_sum(x, names) if names else x, out)


def reduce_mean(
    x: MeshTensor,
    disable_positional_args: None = None,
    output_shape: Any = None,
    reduced_dim: Any = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.reduce_mean`: reduce_sum times (output size / input size), Mesh TF's formula.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.tensor([[1.0, 5.0, 2.0], [4.0, 0.0, 6.0]]), "a:2 d:3")
    >>> mtf.reduce_mean(x, reduced_dim=mtf.Dimension("d", 3)).full()
    tensor([2.6667, 3.3333])
    """
    out = _reduction_shape(x, output_shape, reduced_dim, "reduce_mean")
    if not _reduced(x, out):
        return _arrange(x, out)
    return reduce_sum(x, output_shape=out) * (out.size / _shape_of(x).size)


def _extreme(x: MeshTensor, out: Shape, kind: str) -> MeshTensor:
    """Max or min; the gradient goes whole to every element equal to the result (Mesh TF's
    `cast(equal(x, y)) * dy`; torch and tm share it among ties)."""
    names = _reduced(x, out)
    if not names:
        return _arrange(x, out)
    fn = _reduce.reduce_max if kind == "max" else _reduce.reduce_min
    value = fn(x.detach(), names)
    if torch.is_grad_enabled() and x.requires_grad:
        picked = _reduce.reduce_sum(_tm_where(x.detach() == value, x, 0.0), names)
        value = value + (picked - picked.detach())
    return _arrange(value, out)


def reduce_max(
    x: MeshTensor,
    disable_positional_args: None = None,
    output_shape: Any = None,
    reduced_dim: Any = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.reduce_max`; its gradient reaches every tied maximum whole, as in Mesh TF.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> t = torch.tensor([3.0, 3.0, 1.0], requires_grad=True)
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="a:b1"), t, "a:3")
    >>> (g,) = mtf.gradients([mtf.reduce_max(x)], [x])
    >>> g.full()
    tensor([1., 1., 0.])
    """
    return _extreme(x, _reduction_shape(x, output_shape, reduced_dim, "reduce_max"), "max")


def reduce_min(
    x: MeshTensor,
    disable_positional_args: None = None,
    output_shape: Any = None,
    reduced_dim: Any = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.reduce_min`; its gradient reaches every tied minimum whole, as in Mesh TF.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.tensor([[1.0, 5.0, 2.0], [4.0, 0.0, 6.0]]), "a:2 d:3")
    >>> mtf.reduce_min(x, output_shape="d:3").full()
    tensor([1., 0., 2.])
    """
    return _extreme(x, _reduction_shape(x, output_shape, reduced_dim, "reduce_min"), "min")


def reduce_all(
    x: MeshTensor,
    disable_positional_args: None = None,
    output_shape: Any = None,
    reduced_dim: Any = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.reduce_all` (bool).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.tensor([[1.0, 5.0, 2.0], [4.0, 0.0, 6.0]]), "a:2 d:3")
    >>> mtf.reduce_all(mtf.greater(x, 0.5), reduced_dim=mtf.Dimension("a", 2)).full()
    tensor([ True, False,  True])
    """
    out = _reduction_shape(x, output_shape, reduced_dim, "reduce_all")
    names = _reduced(x, out)
    return _arrange(_reduce.reduce_all(x, names) if names else x != 0, out)


def reduce_any(
    x: MeshTensor,
    disable_positional_args: None = None,
    output_shape: Any = None,
    reduced_dim: Any = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.reduce_any` (bool).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.tensor([[1.0, 5.0, 2.0], [4.0, 0.0, 6.0]]), "a:2 d:3")
    >>> mtf.reduce_any(mtf.greater(x, 5.0), reduced_dim=mtf.Dimension("d", 3)).full()
    tensor([False,  True])
    """
    out = _reduction_shape(x, output_shape, reduced_dim, "reduce_any")
    names = _reduced(x, out)
    return _arrange(_reduce.reduce_any(x, names) if names else x != 0, out)


def reduce_logsumexp(x: MeshTensor, reduced_dim: Any, extra_logit: Any = None, name: str | None = None) -> MeshTensor:
    """`mtf.reduce_logsumexp(x, reduced_dim, extra_logit=None)`: log(sum(exp(x))) over one dim,
    stabilised by the (gradient-free) maximum; `extra_logit` adds exp(extra_logit) to the sum.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.zeros("batch:1 vocab:4", tm.Mesh("b1:2", rules="vocab:b1"))
    >>> mtf.reduce_logsumexp(x, mtf.Dimension("vocab", 4)).full()
    tensor([1.3863])
    """
    x = _check_tensor(x, "reduce_logsumexp")
    out = _shape_of(x) - [_name(reduced_dim)]
    max_logit = reduce_max(stop_gradient(x), output_shape=out)
    if extra_logit is not None:
        extra = stop_gradient(extra_logit) if isinstance(extra_logit, MeshTensor) else extra_logit
        max_logit = maximum(max_logit, extra)
    sum_exp = reduce_sum(exp(sub(x, max_logit)), output_shape=out)
    if extra_logit is not None:
        sum_exp = add(sum_exp, exp(sub(extra_logit, max_logit)))
    return add(log(sum_exp), max_logit)


def log_softmax(x: MeshTensor, reduced_dim: Any, extra_logit: Any = None, name: str | None = None) -> MeshTensor:
    """`mtf.log_softmax`: x - reduce_logsumexp(x, reduced_dim, extra_logit).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.tensor([[1.0, 5.0, 2.0], [4.0, 0.0, 6.0]]), "a:2 d:3")
    >>> mtf.log_softmax(x, mtf.Dimension("d", 3)).full()
    tensor([[-4.0659, -0.0659, -3.0659],
            [-2.1291, -6.1291, -0.1291]])
    """
    return sub(x, reduce_logsumexp(x, reduced_dim, extra_logit))


def softmax(x: MeshTensor, reduced_dim: Any, extra_logit: Any = None, name: str | None = None) -> MeshTensor:
    """`mtf.softmax`: exp(log_softmax(x, reduced_dim, extra_logit)).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.zeros("vocab:4", tm.Mesh("b1:2", rules="vocab:b1"))
    >>> mtf.softmax(x, mtf.Dimension("vocab", 4)).full()
    tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """
    return exp(log_softmax(x, reduced_dim, extra_logit))


def reduce_first(tensor: MeshTensor, reduced_dim: Any) -> MeshTensor:
    """`mtf.reduce_first`: the first element along `reduced_dim` (the dim removed).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.tensor([[1.0, 5.0, 2.0], [4.0, 0.0, 6.0]]), "a:2 d:3")
    >>> mtf.reduce_first(x, mtf.Dimension("d", 3)).full()
    tensor([1., 4.])
    """
    return reduce_sum(mtf_slice(tensor, 0, 1, _name(reduced_dim)), reduced_dim=_name(reduced_dim))


def pool_tensor_1d(
    tensor: MeshTensor, pool_dim: Dim, reduce_fn: Callable[..., MeshTensor] = reduce_mean, pool_size: int = 2
) -> MeshTensor:
    """`mtf.pool_tensor_1d`: reduce each run of `pool_size` elements along `pool_dim`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.arange(8.0), "d:8")
    >>> mtf.pool_tensor_1d(x, mtf.Dimension("d", 8), pool_size=4).full()
    tensor([1.5000, 5.5000])
    """
    high = Dim(pool_dim.name, pool_dim.size // pool_size)
    low = Dim("_low", pool_size)
    return reduce_fn(replace_dimensions(tensor, pool_dim, [high, low]), reduced_dim=low)


def stride_tensor_1d(tensor: MeshTensor, pool_dim: Dim, pool_size: int = 2) -> MeshTensor:
    """`mtf.stride_tensor_1d`: every `pool_size`-th element along `pool_dim`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.arange(8.0), "d:8")
    >>> mtf.stride_tensor_1d(x, mtf.Dimension("d", 8), pool_size=4).full()
    tensor([0., 4.])
    """
    return pool_tensor_1d(tensor, pool_dim, reduce_fn=reduce_first, pool_size=pool_size)


# ---- slicing, stacking, selection ---------------------------------------------------------


def shift(x: MeshTensor, offset: int, dim: Any, wrap: bool, name: str | None = None) -> MeshTensor:
    """`mtf.shift(x, offset, dim, wrap)`: out[i] = x[i - offset], zero-filled or wrapped.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.distribute(torch.arange(1.0, 5.0), "seq", tm.Mesh("b1:2", rules="seq:b1"))
    >>> mtf.shift(x, 1, "seq", wrap=True).full()
    tensor([4., 1., 2., 3.])
    """
    return _slicing.shift(x, _name(dim), offset, wrap)


def mtf_slice(x: MeshTensor, begin: int, size: int, slice_dim_name: str, name: str | None = None) -> MeshTensor:
    """`mtf.slice(x, begin, size, slice_dim_name)`: elements begin..begin+size-1 of the dim.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.distribute(torch.arange(6.0), "seq", tm.Mesh("b1:2"))
    >>> mtf.slice(x, 1, 2, "seq").full()
    tensor([1., 2.])
    """
    return _slicing.slice(x, slice_dim_name, begin, begin + size)


def pad(x: MeshTensor, paddings: Sequence[int], dim_name: str, name: str | None = None) -> MeshTensor:
    """`mtf.pad(x, [before, after], dim_name)`: zeros before and after along the dim.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.distribute(torch.ones(2), "seq", tm.Mesh("b1:2"))
    >>> mtf.pad(x, [1, 2], "seq").full()
    tensor([0., 1., 1., 0., 0.])
    """
    if len(paddings) != 2:
        raise ArgumentError(f"pad: paddings {paddings!r} must be [before, after].")
    return _slicing.pad(x, dim_name, int(paddings[0]), int(paddings[1]))


def concat(xs: Sequence[MeshTensor], concat_dim_name: str, name: str | None = None) -> MeshTensor:
    """`mtf.concat(xs, concat_dim_name)`.

    >>> import torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2")
    >>> mtf.concat([tm.zeros("d:1", mesh), tm.ones("d:2", mesh)], "d").full()
    tensor([0., 1., 1.])
    """
    return _slicing.concat(xs, concat_dim_name)


def split(
    x: MeshTensor, split_dim: Any, num_or_size_splits: int | Sequence[int], name: str | None = None
) -> list[MeshTensor]:
    """`mtf.split(x, split_dim, num_or_size_splits)`: an int is the number of equal pieces (as
    tf.split), a list the piece sizes; each piece keeps the dim's name.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.distribute(torch.arange(6.0), "d", tm.Mesh("b1:2"))
    >>> [p.full().tolist() for p in mtf.split(x, mtf.Dimension("d", 6), 3)]
    [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    """
    dim = _name(split_dim)
    size = _check_tensor(x, "split").sizes.get(dim)
    if size is None:
        raise DimError(f"split: {dim!r} is not a dim of the tensor {x.dims}.")
    if isinstance(num_or_size_splits, int):
        if num_or_size_splits <= 0 or size % num_or_size_splits:
            raise ArgumentError(f"split: {num_or_size_splits} pieces do not divide {dim!r} of size {size}.")
        sizes: list[int] = [size // num_or_size_splits] * num_or_size_splits
    else:
        sizes = list(num_or_size_splits)
    return _stacking.split(x, dim, sizes)


def stack(xs: Sequence[MeshTensor], dim_name: str, axis: int = 0, name: str | None = None) -> MeshTensor:
    """`mtf.stack(xs, dim_name, axis=0)`: a new dim of size len(xs) at position `axis`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> a = mtf.import_tf_tensor(mesh, torch.tensor([1.0, 2.0, 3.0]), "d:3")
    >>> b = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 2.0, 2.0]), "d:3")
    >>> mtf.stack([a, b], "pair", axis=-1).dims
    ('d', 'pair')
    """
    if axis < 0:
        axis = xs[0].ndim + 1 + axis
    return _stacking.stack(xs, dim_name, axis=axis)


def unstack(x: MeshTensor, dim: Any, name: str | None = None) -> list[MeshTensor]:
    """`mtf.unstack(x, dim)`: dim.size tensors without `dim`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.tensor([[1.0, 5.0, 2.0], [4.0, 0.0, 6.0]]), "a:2 d:3")
    >>> [t.full().tolist() for t in mtf.unstack(x, mtf.Dimension("a", 2))]
    [[1.0, 5.0, 2.0], [4.0, 0.0, 6.0]]
    """
    return _stacking.unstack(x, _name(dim))


def one_hot(
    indices: MeshTensor,
    output_dim: Dim,
    on_value: float = 1.0,
    off_value: float = 0.0,
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.one_hot(indices, output_dim, on_value=1.0, off_value=0.0, dtype=float32)`: a new last
    dim; ids outside it give a row of off_value (TF's one_hot).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> ids = tm.distribute(torch.tensor([1, 5]), "batch", tm.Mesh("b1:2", rules="vocab:b1"))
    >>> mtf.one_hot(ids, mtf.Dimension("vocab", 4), on_value=2.0, off_value=-1.0).full()
    tensor([[-1.,  2., -1., -1.],
            [-1., -1., -1., -1.]])
    """
    hot = _tm_one_hot(_check_tensor(indices, "one_hot"), output_dim, torch.bool, strict=False)
    if on_value == 1 and off_value == 0:
        return _tm_cast(hot, dtype)
    return pointwise(lambda t: torch.where(t, on_value, off_value).to(dtype), hot)


def gather(weights: MeshTensor, indices: MeshTensor, dim: Any, output_shape: Any = None) -> MeshTensor:
    """`mtf.gather(weights, indices, dim, output_shape=None)`: look up `indices` along `dim`;
    dims are indices' then weights' others (or `output_shape`).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="vocab:b1")
    >>> table = tm.distribute(torch.arange(4.0), "vocab", mesh)
    >>> ids = tm.distribute(torch.tensor([3, 1]), "batch", mesh)
    >>> mtf.gather(table, ids, mtf.Dimension("vocab", 4)).full()
    tensor([3., 1.])
    """
    out = _tm_gather(weights, indices, _name(dim))
    return out if output_shape is None else _arrange(out, output_shape)


def top_k(x: MeshTensor, reduced_dim: Dim, k_dim: Dim, name: str | None = None) -> tuple[MeshTensor, MeshTensor]:
    """`mtf.top_k(x, reduced_dim, k_dim)`: the k_dim.size largest values along reduced_dim and
    their int32 indices; k_dim replaces reduced_dim at the end of the dims. Ties go to the
    lower index; the gradient reaches the selected elements.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="a:b1"), torch.tensor([1.0, 9.0, 3.0, 7.0]), "a:4")
    >>> values, indices = mtf.top_k(x, mtf.Dimension("a", 4), mtf.Dimension("k", 2))
    >>> values.full(), indices.full()
    (tensor([9., 7.]), tensor([1, 3], dtype=torch.int32))
    """
    x = _check_tensor(x, "top_k")
    reduced = _name(reduced_dim)
    out = _shape_of(x) - [reduced] + [k_dim]
    values, indices = _selection.top_k(x, reduced, k_dim.size, k_dim.name)
    return _arrange(values, out), _arrange(_tm_cast(indices, torch.int32), out)


def top_1(x: MeshTensor, reduced_dim: Any, name: str | None = None) -> tuple[MeshTensor, MeshTensor]:
    """`mtf.top_1(x, reduced_dim)`: (max, int32 argmax); the gradient reaches the one selected
    element (the first of ties), as Mesh TF's.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.tensor([[1.0, 5.0, 2.0], [4.0, 0.0, 6.0]]), "a:2 d:3")
    >>> mtf.top_1(x, mtf.Dimension("d", 3))[1].full()
    tensor([1, 2], dtype=torch.int32)
    """
    one = Dim("_one", 1)
    values, indices = top_k(x, _dim_of(x, reduced_dim), one)
    return _reduce.reduce_sum(values, "_one"), _tm_cast(_reduce.reduce_sum(indices, "_one"), torch.int32)


def argmax(x: MeshTensor, reduced_dim: Any, name: str | None = None) -> MeshTensor:
    """`mtf.argmax(x, reduced_dim)`: the int32 index of the first maximum.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.tensor([[1.0, 5.0, 2.0], [4.0, 0.0, 6.0]]), "a:2 d:3")
    >>> mtf.argmax(x, mtf.Dimension("d", 3)).full()
    tensor([1, 2], dtype=torch.int32)
    """
    return _tm_cast(_selection.argmax(_check_tensor(x, "argmax"), _name(reduced_dim)), torch.int32)


def cumsum(x: MeshTensor, dim: Any, exclusive: bool = False, reverse: bool = False) -> MeshTensor:
    """`mtf.cumsum(x, dim, exclusive=False)` in x's dtype (Mesh TF's); `reverse=True` sums from
    the end (torchmesh's addition).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.distribute(torch.tensor([1, 2, 3]), "d", tm.Mesh("b1:2", rules="d:b1"))
    >>> mtf.cumsum(x, mtf.Dimension("d", 3), exclusive=True).full()
    tensor([0, 1, 3])
    """
    x = _check_tensor(x, "cumsum")
    return cast(_tm_cumsum(x, _name(dim), exclusive=exclusive, reverse=reverse), x.dtype)


def nth_largest_element(x: MeshTensor, n: int, reduced_dim: Any, name: str | None = None) -> MeshTensor:
    """`mtf.nth_largest_element`: the n-th largest (0-based) value along reduced_dim.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.tensor([[1.0, 5.0, 2.0], [4.0, 0.0, 6.0]]), "a:2 d:3")
    >>> mtf.nth_largest_element(x, 1, mtf.Dimension("d", 3)).full()
    tensor([2., 4.])
    """
    k = Dim("_k", n + 1)
    values, _ = top_k(x, _dim_of(x, reduced_dim), k)
    return reduce_sum(mtf_slice(values, n, 1, "_k"), reduced_dim="_k")


def nth_smallest_element(x: MeshTensor, n: int, reduced_dim: Any, name: str | None = None) -> MeshTensor:
    """`mtf.nth_smallest_element`: -nth_largest_element(-x).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.tensor([[1.0, 5.0, 2.0], [4.0, 0.0, 6.0]]), "a:2 d:3")
    >>> mtf.nth_smallest_element(x, 0, mtf.Dimension("d", 3)).full()
    tensor([1., -0.])
    """
    return negative(nth_largest_element(negative(x), n, reduced_dim))


# ---- random -------------------------------------------------------------------------------


def random_uniform(
    mesh: Mesh,
    shape: Any,
    minval: float = 0.0,
    maxval: float = 1.0,
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.random_uniform(mesh, shape, minval=0, maxval=1, dtype=..., seed=None)`: uniform in
    [minval, maxval); for a seed the same on every mesh and layout (drawn by `tm.rand`, not TF).

    >>> import torchmesh as tm, torchmesh.mtf as mtf
    >>> a = mtf.random_uniform(tm.Mesh("b1:2", rules="d:b1"), "d:8", seed=1)
    >>> b = mtf.random_uniform(tm.Mesh("b1:2"), "d:8", seed=1)
    >>> bool((a.full() == b.full()).all())
    True
    """
    u = rand(list(convert_to_shape(shape) or ()), mesh, seed=seed, dtype=dtype)
    return u if (minval, maxval) == (0.0, 1.0) else u * (maxval - minval) + minval


def random_normal(
    mesh: Mesh,
    shape: Any,
    mean: float = 0.0,
    stddev: float = 1.0,
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.random_normal(mesh, shape, mean=0, stddev=1, dtype=..., seed=None)`: normal values, for
    a seed the same on every mesh and layout (drawn by `tm.randn`).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> z = mtf.random_normal(mesh, "d:1000", mean=1.0, stddev=0.5, seed=0)
    >>> round(z.full().mean().item(), 1), round(z.full().std().item(), 1)
    (1.0, 0.5)
    """
    z = randn(list(convert_to_shape(shape) or ()), mesh, seed=seed, dtype=dtype)
    return z if (mean, stddev) == (0.0, 1.0) else z * stddev + mean


def dropout(
    x: MeshTensor,
    is_training: bool,
    keep_prob: float | None = None,
    rate: float | None = None,
    noise_shape: Any = None,
    name: str | None = None,
    seed: int | None = None,
) -> MeshTensor:
    """`mtf.dropout(x, is_training, keep_prob=None, rate=None, noise_shape=None)`: keep each
    element where a uniform draw is below keep_prob and scale kept floats by 1 / keep_prob;
    `noise_shape` (some of x's dims) shares one draw across the dims it lacks.

    >>> import torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.ones("batch:4 d:8", tm.Mesh("b1:2", rules="batch:b1"))
    >>> y = mtf.dropout(x, True, keep_prob=0.5, noise_shape="batch:4", seed=0)
    >>> sorted(set(y.full().flatten().tolist())), bool((y.full() == y.full()[:, :1]).all())
    ([0.0, 2.0], True)
    """
    if (keep_prob is None) == (rate is None):
        raise ArgumentError("dropout: give exactly one of keep_prob and rate.")
    keep = 1.0 - rate if keep_prob is None else keep_prob  # type: ignore[operator]
    if keep == 1.0 or not is_training:
        return x
    floating = x.dtype.is_floating_point
    shape = convert_to_shape(noise_shape) or _shape_of(x)
    u = random_uniform(x.mesh, shape, dtype=x.dtype if floating else torch.float32, seed=seed)
    noise = cast(less(u, keep), x.dtype)
    if floating:
        noise = noise * (1.0 / keep)
    return multiply(x, noise)


# ---- gradients and variables --------------------------------------------------------------


def gradients(
    ys: Sequence[MeshTensor], xs: Sequence[MeshTensor], grad_ys: Sequence[MeshTensor | None] | None = None
) -> list[MeshTensor | None]:
    """`mtf.gradients(ys, xs, grad_ys=None)`: d(sum of ys weighted by grad_ys)/d(each x) as
    MeshTensors laid out like the xs (None for an x the ys do not depend on). grad_ys default
    to ones. The tape is kept, so gradients may be taken again.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> t = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="a:b1"), t, "a:2")
    >>> (g,) = mtf.gradients([mtf.reduce_sum(mtf.square(x))], [x])
    >>> g.full()
    tensor([2., 4.])
    """
    ys, xs = list(ys), list(xs)
    outputs: list[torch.Tensor] = []
    seeds: list[torch.Tensor] = []
    for i, y in enumerate(ys):
        g = grad_ys[i] if grad_ys is not None and i < len(grad_ys) else None
        if g is None:
            g = ones_like(y)
        elif tuple(g.shape) != tuple(y.shape):
            g = _arrange(g, y.shape)
        g = to_layout(g.detach(), y.tensor_layout)
        for t, s in zip(y.shards, g.shards):
            if t.requires_grad:
                outputs.append(t)
                seeds.append(s.to(t.dtype))
    inputs = [t for x in xs for t in x.shards]
    if not outputs or not any(t.requires_grad for t in inputs):
        return [None for _ in xs]
    wanted = [t for t in inputs if t.requires_grad]
    got = torch.autograd.grad(outputs, wanted, seeds, retain_graph=True, allow_unused=True)
    by_id = {id(t): g for t, g in zip(wanted, got)}
    result: list[MeshTensor | None] = []
    for x in xs:
        gs = [by_id.get(id(t)) for t in x.shards]
        if all(g is None for g in gs):
            result.append(None)
            continue
        data = tuple(torch.zeros_like(t) if g is None else g for t, g in zip(x.shards, gs))
        result.append(MeshTensor(data, x.tensor_layout, x.mesh))
    return result


class VariableDType:
    """Mesh TF's `mtf.VariableDType`: the dtypes a variable is stored (master, slice) and read
    (activation) in; here master and slice are the stored value's dtype.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> w = mtf.get_variable(mesh, "w", "d:2", dtype=mtf.VariableDType(torch.float32, torch.float32, torch.bfloat16))
    >>> w.dtype, w.operation.value.dtype
    (torch.bfloat16, torch.float32)
    """

    def __init__(
        self,
        master_dtype: torch.dtype = torch.float32,
        slice_dtype: torch.dtype | None = None,
        activation_dtype: torch.dtype | None = None,
    ) -> None:
        self.master_dtype = master_dtype
        self.slice_dtype = slice_dtype or master_dtype
        self.activation_dtype = activation_dtype or master_dtype

    def __repr__(self) -> str:
        return f"VariableDType({self.master_dtype}, {self.slice_dtype}, {self.activation_dtype})"


class VariableTensor(MeshTensor):
    """The MeshTensor `get_variable` returns: a MeshTensor whose `.operation` is its `Variable`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> w = mtf.get_variable(mesh, "w", "d:2", initializer=mtf.zeros_initializer())
    >>> isinstance(w, mtf.VariableTensor), w.operation.name
    (True, 'w')
    """

    __slots__ = ("operation",)

    def __init__(self, value: MeshTensor, operation: Variable) -> None:
        super().__init__(tuple(value.shards), value.tensor_layout, value.mesh)
        self.operation = operation


class Variable:
    """Mesh TF's `mtf.Variable`, eager: `.value` is the current MeshTensor (a leaf with
    `requires_grad` when trainable, stored in the slice dtype); `assign` and friends update
    it in place, so tensors already read from it stay current.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> w = mtf.get_variable(mesh, "w", "d:2", initializer=mtf.zeros_initializer())
    >>> w.operation
    Variable('w', Shape[d=2], trainable=True)
    >>> w.operation.value is w, w.operation.trainable
    (True, True)
    """

    def __init__(
        self, mesh: Mesh, name: str, shape: Shape, dtype: VariableDType, value: MeshTensor, trainable: bool
    ) -> None:
        self.mesh = mesh
        self.name = name
        self.dtype = dtype
        self.trainable = trainable
        leaf = MeshTensor(tuple(t.detach().to(dtype.slice_dtype) for t in value.shards), value.tensor_layout, mesh)
        if trainable:
            leaf.requires_grad_(True)
        self._value = VariableTensor(leaf, self)

    @property
    def value(self) -> VariableTensor:
        return self._value

    @property
    def outputs(self) -> list[VariableTensor]:
        return [self._value]

    @property
    def shape(self) -> Shape:
        return _shape_of(self._value)

    @property
    def size(self) -> int:
        return self.shape.size

    @property
    def master_dtype(self) -> torch.dtype:
        return self.dtype.master_dtype

    @property
    def slice_dtype(self) -> torch.dtype:
        return self.dtype.slice_dtype

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.dtype.activation_dtype

    def read(self) -> MeshTensor:
        """The value in the activation dtype, its `.operation` this variable."""
        v = self._value
        if v.dtype == self.activation_dtype:
            return v
        return VariableTensor(cast(v, self.activation_dtype), self)

    def assign(self, new_value: MeshTensor | float, mode: str = "set") -> Variable:
        """Write `new_value` (set, add or sub) into the stored value, in place and off the tape."""
        v = self._value
        if not isinstance(new_value, MeshTensor):
            new_value = full(list(v.shape), new_value, self.mesh, dtype=v.dtype)
        if set(new_value.dims) != set(v.dims):
            raise DimError(f"assign to variable {self.name!r} with dims {v.dims}: the value has dims {new_value.dims}.")
        new = to_layout(_arrange(new_value.detach(), v.shape), v.tensor_layout)
        with torch.no_grad():
            for dst, src in zip(v.shards, new.shards):
                src = src.to(dst.dtype)
                if mode == "add":
                    dst.add_(src)
                elif mode == "sub":
                    dst.sub_(src)
                else:
                    dst.copy_(src)
        return self

    def __repr__(self) -> str:
        return f"Variable({self.name!r}, {self.shape.to_string}, trainable={self.trainable})"


_VARIABLES: weakref.WeakKeyDictionary[Mesh, dict[str, Variable]] = weakref.WeakKeyDictionary()
_SCOPE: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("mtf_variable_scope", default=())
_SCOPE_COUNTS: dict[tuple[str, ...], dict[str, int]] = {}


@contextlib.contextmanager
def variable_scope(name: str | None = None, default_name: str | None = None, reuse: Any = None) -> Iterator[str]:
    """Prefix the names `get_variable` gives (a stand-in for `tf.variable_scope`): inside
    `with variable_scope("layer_0"):`, `get_variable(mesh, "w", ...)` is 'layer_0/w'.

    With only `default_name`, the scope is made unique among its siblings (dense, dense_1, ...);
    those counts restart each time the parent scope is entered, so a model function run each
    step inside one named scope finds the same names (and variables) every step.

    >>> import torchmesh.mtf as mtf
    >>> with mtf.variable_scope("model"):
    ...     with mtf.variable_scope(None, default_name="dense") as a:
    ...         pass
    ...     with mtf.variable_scope(None, default_name="dense") as b:
    ...         pass
    >>> a, b
    ('model/dense', 'model/dense_1')
    """
    parent = _SCOPE.get()
    if name is None:
        if default_name is None:
            raise ArgumentError("variable_scope: give a name or a default_name.")
        counts = _SCOPE_COUNTS.setdefault(parent, {})
        n = counts.get(default_name, 0)
        counts[default_name] = n + 1
        name = default_name if n == 0 else f"{default_name}_{n}"
    scope = (*parent, *name.split("/"))
    _SCOPE_COUNTS[scope] = {}
    token = _SCOPE.set(scope)
    try:
        yield "/".join(scope)
    finally:
        _SCOPE.reset(token)


def _fans(shape: Sequence[int]) -> tuple[int, int]:
    """TF's fan_in, fan_out: the last two dims, times the product of the others."""
    if not shape:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(next_seed() % (2**63))


def glorot_uniform_initializer(seed: int | None = None) -> Callable[..., torch.Tensor]:
    """TF's `glorot_uniform_initializer` (the default of `get_variable` for floats): uniform in
    +-sqrt(6 / (fan_in + fan_out)), fans from the last two dims (TF's guess).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> w = mtf.glorot_uniform_initializer(seed=0)([6, 10])
    >>> bool(w.abs().max() <= (6 / 16) ** 0.5)
    True
    """

    def init(shape: Sequence[int], dtype: torch.dtype = torch.float32, partition_info: Any = None) -> torch.Tensor:
        fan_in, fan_out = _fans(list(shape))
        limit = math.sqrt(6.0 / max(1.0, fan_in + fan_out))
        g = torch.Generator().manual_seed(seed) if seed is not None else _generator()
        return (torch.rand(list(shape), generator=g, dtype=torch.float64) * 2 - 1).mul(limit).to(dtype)

    return init


def zeros_initializer() -> Callable[..., torch.Tensor]:
    """TF's `zeros_initializer()` in TF's initializer contract.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mtf.zeros_initializer()([2], dtype=torch.float32)
    tensor([0., 0.])
    """
    return constant_initializer(0.0)


def ones_initializer() -> Callable[..., torch.Tensor]:
    """TF's `ones_initializer()`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mtf.ones_initializer()([2], dtype=torch.float32)
    tensor([1., 1.])
    """
    return constant_initializer(1.0)


def constant_initializer(value: float = 0.0) -> Callable[..., torch.Tensor]:
    """TF's `constant_initializer(value)`: every element `value`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mtf.constant_initializer(0.5)([2], dtype=torch.float32, partition_info=None)
    tensor([0.5000, 0.5000])
    """

    def init(shape: Sequence[int], dtype: torch.dtype = torch.float32, partition_info: Any = None) -> torch.Tensor:
        return torch.full(list(shape), value, dtype=dtype)

    return init


def random_normal_initializer(
    mean: float = 0.0, stddev: float = 1.0, seed: int | None = None
) -> Callable[..., torch.Tensor]:
    """TF's `random_normal_initializer(mean, stddev)` (torch's normal numbers, seeded from
    torchmesh's stream, so the same on every rank and mesh).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> w = mtf.random_normal_initializer(stddev=0.02, seed=0)([100, 100])
    >>> round(w.std().item(), 2)
    0.02
    """

    def init(shape: Sequence[int], dtype: torch.dtype = torch.float32, partition_info: Any = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed) if seed is not None else _generator()
        return (torch.randn(list(shape), generator=g, dtype=torch.float64) * stddev + mean).to(dtype)

    return init


def truncated_normal_initializer(
    mean: float = 0.0, stddev: float = 1.0, seed: int | None = None
) -> Callable[..., torch.Tensor]:
    """TF's `truncated_normal_initializer`: normal values redrawn beyond two stddevs.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> w = mtf.truncated_normal_initializer(stddev=0.5, seed=0)([1000])
    >>> bool(w.abs().max() <= 1.0)
    True
    """

    def init(shape: Sequence[int], dtype: torch.dtype = torch.float32, partition_info: Any = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed) if seed is not None else _generator()
        t = torch.empty(list(shape), dtype=torch.float64)
        torch.nn.init.trunc_normal_(t, 0.0, 1.0, -2.0, 2.0, generator=g)
        return (t * stddev + mean).to(dtype)

    return init


def random_uniform_initializer(
    minval: float = -0.05, maxval: float = 0.05, seed: int | None = None
) -> Callable[..., torch.Tensor]:
    """TF's `random_uniform_initializer(minval, maxval)`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> w = mtf.random_uniform_initializer(-1.0, 1.0, seed=0)([1000])
    >>> bool(w.min() >= -1.0 and w.max() < 1.0)
    True
    """

    def init(shape: Sequence[int], dtype: torch.dtype = torch.float32, partition_info: Any = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed) if seed is not None else _generator()
        return (torch.rand(list(shape), generator=g, dtype=torch.float64) * (maxval - minval) + minval).to(dtype)

    return init


def get_variable(
    mesh: Mesh,
    name: str,
    shape: Any,
    dtype: torch.dtype | VariableDType | None = torch.float32,
    master_dtype: torch.dtype | None = None,
    slice_dtype: torch.dtype | None = None,
    activation_dtype: torch.dtype | None = None,
    initializer: Callable[..., Any] | None = None,
    trainable: bool = True,
    **kwargs: Any,
) -> MeshTensor:
    """`mtf.get_variable(mesh, name, shape, dtype=float32, initializer=None, trainable=True)`:
    the variable's value (its `.operation` the `Variable`), created on the first call and the
    same variable on later ones (name prefixed by the enclosing `variable_scope`s).

    `initializer(shape, dtype=..., partition_info=None)` returns the whole value (a torch
    tensor, array or MeshTensor); the default is TF's: glorot uniform for floats, zeros
    otherwise. A trainable variable's value requires grad; `gradients` differentiates it.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> w = mtf.get_variable(mesh, "w", "d:4", initializer=mtf.constant_initializer(0.5))
    >>> w.full().tolist(), w.operation.name, mtf.get_variable(mesh, "w", "d:4") is w
    ([0.5, 0.5, 0.5, 0.5], 'w', True)
    """
    if dtype is None:
        vdtype = VariableDType(master_dtype or torch.float32, slice_dtype, activation_dtype)
    elif isinstance(dtype, torch.dtype):
        vdtype = VariableDType(master_dtype or dtype, slice_dtype or dtype, activation_dtype or dtype)
    elif isinstance(dtype, VariableDType):
        vdtype = dtype
    else:
        raise ArgumentTypeError(f"get_variable {name!r}: dtype {dtype!r} is not a torch.dtype or mtf.VariableDType.")
    full_name = "/".join((*_SCOPE.get(), name))
    table = _VARIABLES.setdefault(mesh, {})
    var = table.get(full_name)
    dims = convert_to_shape(shape) or Shape()
    if var is not None:
        if tuple(var.shape) != tuple(dims):
            raise DimError(
                f"get_variable {full_name!r}: the variable exists with shape {var.shape.to_string}, "
                f"asked for {dims.to_string}. Fix: use another name (or variable_scope)."
            )
        return var.read()
    if initializer is None:
        floating = vdtype.master_dtype.is_floating_point
        initializer = glorot_uniform_initializer() if floating else zeros_initializer()
    value = initializer(dims.to_integer_list, dtype=vdtype.master_dtype, partition_info=None)
    if isinstance(value, MeshTensor):
        value = _arrange(value, dims)
    else:
        value = import_tf_tensor(mesh, torch.as_tensor(value, dtype=vdtype.master_dtype), dims)
    var = Variable(mesh, full_name, dims, vdtype, value, trainable)
    table[full_name] = var
    return var.read()


def _variable(var: Any) -> Variable:
    if isinstance(var, Variable):
        return var
    op = getattr(var, "operation", None)
    if isinstance(op, Variable):
        return op
    raise ArgumentTypeError(f"assign: {type(var).__name__} is not a mtf.Variable nor a tensor get_variable returned.")


def assign(var: Any, new_val: Any, assign_fn: Any = None, name: str | None = None) -> Variable:
    """`mtf.assign(var, new_val)`: set the variable (or the tensor get_variable returned) now.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> w = mtf.get_variable(mesh, "w", "d:2", initializer=mtf.zeros_initializer())
    >>> mtf.assign(w, mtf.ones_like(w)).value.full().tolist()
    [1.0, 1.0]
    """
    return _variable(var).assign(new_val, "set")


def assign_add(var: Any, new_val: Any) -> Variable:
    """`mtf.assign_add(var, val)`: add to the variable in place.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> w = mtf.get_variable(mesh, "w", "d:2", initializer=mtf.zeros_initializer())
    >>> mtf.assign_add(w, 2.0).value.full().tolist()
    [2.0, 2.0]
    """
    return _variable(var).assign(new_val, "add")


def assign_sub(var: Any, new_val: Any) -> Variable:
    """`mtf.assign_sub(var, val)`: subtract from the variable in place.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> w = mtf.get_variable(mesh, "w", "d:2", initializer=mtf.zeros_initializer())
    >>> mtf.assign_sub(w.operation, 1.0).value.full().tolist()
    [-1.0, -1.0]
    """
    return _variable(var).assign(new_val, "sub")


def all_variables(mesh: Mesh) -> list[Variable]:
    """The variables `get_variable` made on this mesh, in creation order (Mesh TF's
    `graph.all_variables`).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> w = mtf.get_variable(mesh, "w", "d:2", initializer=mtf.zeros_initializer())
    >>> _ = mtf.get_variable(mesh, "step", [], dtype=torch.int32, trainable=False)
    >>> [v.name for v in mtf.all_variables(mesh)]
    ['w', 'step']
    """
    return list(_VARIABLES.get(mesh, {}).values())


def trainable_variables(mesh: Mesh) -> list[Variable]:
    """The trainable variables made on this mesh (Mesh TF's `graph.trainable_variables`).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> w = mtf.get_variable(mesh, "w", "d:2", initializer=mtf.zeros_initializer())
    >>> _ = mtf.get_variable(mesh, "step", [], dtype=torch.int32, trainable=False)
    >>> [v.name for v in mtf.trainable_variables(mesh)]
    ['w']
    """
    return [v for v in all_variables(mesh) if v.trainable]


def reset_variables(mesh: Mesh) -> None:
    """Forget this mesh's variables (a fresh model on the same mesh).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> w = mtf.get_variable(mesh, "w", "d:2", initializer=mtf.zeros_initializer())
    >>> mtf.reset_variables(mesh)
    >>> mtf.all_variables(mesh)
    []
    """
    _VARIABLES.pop(mesh, None)


# Mesh TF exports these under builtin names (mtf.range, mtf.slice, mtf.abs, mtf.pow).
range = mtf_range  # noqa: A001
slice = mtf_slice  # noqa: A001
abs = mtf_abs  # noqa: A001
pow = mtf_pow  # noqa: A001
subtract = sub

__all__ = [
    "Dimension",
    "Shape",
    "Variable",
    "VariableDType",
    "VariableTensor",
    "abs",
    "add",
    "add_n",
    "all_variables",
    "argmax",
    "assign",
    "assign_add",
    "assign_sub",
    "broadcast",
    "cast",
    "ceil",
    "concat",
    "constant",
    "constant_initializer",
    "convert_to_dimension",
    "convert_to_layout_rules",
    "convert_to_shape",
    "cos",
    "cumsum",
    "divide",
    "dropout",
    "einsum",
    "elu",
    "equal",
    "exp",
    "fill",
    "floor",
    "floordiv",
    "gather",
    "gelu",
    "get_variable",
    "glorot_uniform_initializer",
    "gradients",
    "greater",
    "greater_equal",
    "identity",
    "import_fully_replicated",
    "import_tf_tensor",
    "leaky_relu",
    "less",
    "less_equal",
    "log",
    "log_softmax",
    "logical_and",
    "logical_not",
    "logical_or",
    "logical_xor",
    "make_mesh",
    "matmul",
    "maximum",
    "minimum",
    "mod",
    "mtf_abs",
    "mtf_pow",
    "mtf_range",
    "mtf_slice",
    "multiply",
    "negative",
    "not_equal",
    "nth_largest_element",
    "nth_smallest_element",
    "one_hot",
    "ones",
    "ones_initializer",
    "ones_like",
    "pad",
    "pool_tensor_1d",
    "pow",
    "random_normal",
    "random_normal_initializer",
    "random_uniform",
    "random_uniform_initializer",
    "range",
    "reciprocal",
    "reduce_all",
    "reduce_any",
    "reduce_first",
    "reduce_logsumexp",
    "reduce_max",
    "reduce_mean",
    "reduce_min",
    "reduce_sum",
    "relu",
    "rename_dimension",
    "replace_dimensions",
    "reset_variables",
    "reshape",
    "rsqrt",
    "selu",
    "shift",
    "sigmoid",
    "sign",
    "sin",
    "slice",
    "softmax",
    "softplus",
    "split",
    "sqrt",
    "square",
    "stack",
    "stop_gradient",
    "stride_tensor_1d",
    "sub",
    "subtract",
    "swish",
    "tanh",
    "tensor_dim_to_mesh_dim_size",
    "tensor_dim_to_size_per_split",
    "to_bfloat16",
    "to_float",
    "to_int32",
    "top_1",
    "top_k",
    "trainable_variables",
    "transpose",
    "truncated_normal_initializer",
    "unstack",
    "variable_scope",
    "where",
    "zeros",
    "zeros_initializer",
    "zeros_like",
]
