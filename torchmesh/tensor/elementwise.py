"""Elementwise ops, broadcast by name: operators, torch functions, `where`, casts.

The result's dims are the union of the inputs' dims in order of first appearance. An input
missing a dim that is split over an axis is broadcast there; its gradient is summed over
that axis (`sum_grad`). No forward communication unless an input's layout differs from
the rules.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from torchmesh import errors
from torchmesh.comm import traced
from torchmesh.comm.backend import compiling
from torchmesh.errors import ArgumentTypeError, DimError
from torchmesh.placement.op_plan import OpPlan, plan_op
from torchmesh.tensor.contraction import run_op
from torchmesh.tensor.mesh_tensor import MeshTensor


def pointwise(func: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> MeshTensor:
    """Apply an elementwise torch function to MeshTensors (and scalars), aligning dims by name.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="ff:tp")
    >>> a = tm.distribute(torch.ones(4), "ff", mesh)
    >>> b = tm.distribute(torch.ones(3), "batch", mesh)
    >>> tm.pointwise(torch.add, a, b).dims
    ('ff', 'batch')
    """
    name = getattr(func, "__name__", str(func))
    if kwargs.get("inplace") or kwargs.get("out") is not None:
        raise ArgumentTypeError(
            errors.not_in_place(f"{name}(..., {'out=' if kwargs.get('out') is not None else 'inplace=True'})")
        )
    slots: list[tuple[bool, Any]] = []  # (is_kwarg, position or key) of each MeshTensor
    xs: list[MeshTensor] = []
    for i, a in enumerate(args):
        if isinstance(a, MeshTensor):
            slots.append((False, i))
            xs.append(a)
        elif isinstance(a, torch.Tensor) and (a.dim() > 0 or _tracked(a)):
            raise DimError(_plain_tensor(func, a))
    for k, v in kwargs.items():
        if isinstance(v, MeshTensor):
            slots.append((True, k))
            xs.append(v)
        elif isinstance(v, torch.Tensor) and (v.dim() > 0 or _tracked(v)):
            raise DimError(_plain_tensor(func, v))
    fast = _same_layout_fast_path(func, args, kwargs, slots, xs)
    if fast is not None:
        return fast
    out_names = tuple(dict.fromkeys(n for x in xs for n in x.dims))

    def local_fn(plan: OpPlan):
        out = plan.computed.names
        if compiling():
            aligners = [traced.constant(_ALIGNER, lay.names, out) for lay in plan.in_layouts]
        else:
            aligners = [_aligner(lay.names, out) for lay in plan.in_layouts]

        def fn(*ts: torch.Tensor) -> torch.Tensor:
            a, kw = list(args), dict(kwargs)
            for (is_kw, key), t, align in zip(slots, ts, aligners):
                if is_kw:
                    kw[key] = align(t)
                else:
                    a[key] = align(t)
            return func(*a, **kw)

        return fn

    return run_op(xs, out_names, local_fn, what=name)


#: (id(layout), id(mesh), inputs) -> (rules, whether an elementwise op over `inputs` tensors
#: laid out so is planned, under those rules, as nothing but the slice-wise computation: no
#: relayout, no gradient sum, no finishing step, the output laid out alike; then the layout
#: and mesh, kept alive so that their ids are not reused): the eager fast path's cache.
_TRIVIAL: dict[tuple[int, int, int], tuple] = {}


def _same_layout_fast_path(func, args, kwargs, slots, xs: list[MeshTensor]) -> MeshTensor | None:
    """The result of an elementwise op whose MeshTensor inputs (positional) all have one
    layout that the mesh's rules give their dims too, computed without the planner's
    machinery: its plan is the slice-wise call alone (no collective, nothing to agree on or
    name). None where that does not hold (the general path then runs)."""
    if not xs or kwargs:
        return None
    first = xs[0]
    layout, mesh = first._layout, first._mesh
    for x in xs[1:]:
        if x._layout != layout or x._mesh is not mesh:
            return None
    if not _trivial(first, len(xs)):
        return None
    impl = mesh.impl
    if len(slots) == len(args):  # every argument a MeshTensor
        data = impl.slicewise(func, *(x._data for x in xs))
    else:
        positions = [key for _, key in slots]

        def fn(*ts: torch.Tensor) -> torch.Tensor:
            a = list(args)
            for i, t in zip(positions, ts):
                a[i] = t
            return func(*a)

        data = impl.slicewise(fn, *(x._data for x in xs))
    return MeshTensor(data, layout, mesh)


def unary(func: Callable[..., torch.Tensor], x: Any) -> MeshTensor:
    """`func(x)` for an elementwise torch function of one argument (torch.relu(x)): slice-wise
    where x has the rules' layout, else `pointwise`."""
    if isinstance(x, MeshTensor) and _trivial(x, 1):
        return MeshTensor(x._mesh.impl.slicewise(func, x._data), x._layout, x._mesh)
    return pointwise(func, x)


def _trivial(x: MeshTensor, inputs: int) -> bool:
    """Whether an elementwise op over `inputs` tensors laid out as `x` is planned, eagerly, as
    the slice-wise call alone (no relayout, no gradient sum, no finishing step, the output
    laid out alike); checked once per layout, mesh and rules (`_TRIVIAL`)."""
    mesh = x._mesh
    if mesh.impl.checking or compiling():
        return False
    layout = x._layout
    rules = mesh.rules
    known = _TRIVIAL.get((id(layout), id(mesh), inputs))
    if known is not None and known[0] is rules:
        return known[1]
    if len(_TRIVIAL) > 256:  # small: a new sequence length is a new layout
        _TRIVIAL.clear()
    plan = plan_op((layout,) * inputs, layout.names, rules, mesh.shape, "sum", "op")
    trivial = (
        not any(plan.in_steps)
        and not any(plan.in_bcast)
        and not any(plan.in_gather_rs)
        and not plan.finish
        and plan.computed == layout
        and plan.out == layout
        and all(lay == layout for lay in plan.in_layouts)
    )
    _TRIVIAL[(id(layout), id(mesh), inputs)] = (rules, trivial, layout, mesh)
    return trivial


def binary(op: Callable[[Any, Any], Any], a: Any, b: Any) -> MeshTensor:
    """`op(a, b)` for a Python operator (`x + y`, `2 * x`), one of a and b a MeshTensor: the
    fast path where the other is a Python number or a MeshTensor of the same layout and that
    layout is the rules' (the common case), else `pointwise`."""
    x = a if isinstance(a, MeshTensor) else b
    other = b if x is a else a
    if isinstance(other, MeshTensor):
        if (other._layout is x._layout or other._layout == x._layout) and other._mesh is x._mesh and _trivial(x, 2):
            return MeshTensor(x._mesh.impl.slicewise(op, a._data, b._data), x._layout, x._mesh)
    elif type(other) in (int, float) and isinstance(x, MeshTensor) and _trivial(x, 1):
        fn = (lambda t: op(t, other)) if x is a else (lambda t: op(other, t))
        return MeshTensor(x._mesh.impl.slicewise(fn, x._data), x._layout, x._mesh)
    return pointwise(op, a, b)


def _tracked(t: torch.Tensor) -> bool:
    """A plain tensor autograd would track: each device's copy would add its own gradient."""
    return t.requires_grad and torch.is_grad_enabled()


def _plain_tensor(func: Callable, t: torch.Tensor) -> str:
    name = getattr(func, "__name__", str(func))
    if t.dim() == 0:
        return (
            f"{name}: got a plain 0-d torch.Tensor that requires grad next to MeshTensors; its gradient "
            f"would add up every device's copy and depend on the mesh. Fix: make it a replicated "
            f"MeshTensor, tm.distribute(t, '', mesh, requires_grad=True), or pass t.detach()."
        )
    return (
        f"{name}: got a plain torch.Tensor of shape {tuple(t.shape)} next to MeshTensors; it has no "
        f"dim names. Fix: tm.distribute(tensor, '<dim names>', mesh) first (Python numbers and 0-d "
        f"tensors that need no gradient are fine as they are)."
    )


@lru_cache(maxsize=4096)
def _aligner(src: tuple[str, ...], out: tuple[str, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function putting a local tensor with dims `src` into `out`'s order, size 1 where absent."""
    order = [n for n in out if n in src]
    perm = tuple(src.index(n) for n in order)
    permute = perm != tuple(range(len(src)))
    missing = tuple(i for i, n in enumerate(out) if n not in src)
    if not permute and not missing:
        return lambda t: t

    def align(t: torch.Tensor) -> torch.Tensor:
        if permute:
            t = t.permute(perm)
        for i in missing:
            t = t.unsqueeze(i)
        return t

    return align


_ALIGNER = traced.planner(_aligner)


# ---- the explicit tables -------------------------------------------------------------------
# Which torch functions act elementwise: those whose aten ops torch tags `pointwise`, and their
# aliases (tests/tensor/test_torch_habits.py checks both directions against torch's tags, and every
# entry against torch on uneven meshes). Each reaches `pointwise` through __torch_function__;
# extra arguments (numbers, MeshTensors) and keywords (approximate="tanh") are passed through.

#: torch.<name>; also installed as methods (x.erf(), x.clamp_min(0.0), x.add(y)).
TORCH_ELEMENTWISE: tuple[str, ...] = tuple(
    """
    abs absolute acos arccos acosh arccosh angle asin arcsin asinh arcsinh atan arctan atanh arctanh
    ceil clone conj_physical cos cosh deg2rad digamma erf erfc erfinv exp exp2 expm1 fix floor frac
    i0 lgamma log log10 log1p log2 logit mvlgamma nan_to_num neg negative polygamma positive rad2deg
    reciprocal round rsqrt sgn sign signbit sin sinc sinh sqrt square tan tanh trunc
    relu sigmoid celu selu hardshrink threshold
    isfinite isinf isnan isneginf isposinf isreal logical_not bitwise_not
    clamp clip clamp_min clamp_max
    add sub subtract rsub mul multiply div divide true_divide floor_divide remainder fmod pow
    float_power atan2 arctan2 hypot copysign nextafter ldexp xlogy logaddexp logaddexp2 igamma
    igammac gcd lcm heaviside maximum minimum fmax fmin
    eq ne not_equal lt less le less_equal gt greater ge greater_equal isclose
    logical_and logical_or logical_xor bitwise_and bitwise_or bitwise_xor bitwise_left_shift
    bitwise_right_shift lerp addcmul addcdiv masked_fill
""".split()
)
#: torch.nn.functional.<name> (activations).
FUNCTIONAL_ELEMENTWISE: tuple[str, ...] = tuple(
    """
    relu relu6 elu selu celu gelu silu mish hardtanh hardswish hardsigmoid leaky_relu logsigmoid
    softplus softsign tanhshrink softshrink hardshrink threshold sigmoid tanh
""".split()
)
#: torch.special.<name>.
SPECIAL_ELEMENTWISE: tuple[str, ...] = tuple(
    """
    airy_ai bessel_j0 bessel_j1 bessel_y0 bessel_y1 chebyshev_polynomial_t chebyshev_polynomial_u
    chebyshev_polynomial_v chebyshev_polynomial_w digamma entr erf erfc erfcx erfinv exp2 expit expm1
    gammainc gammaincc gammaln hermite_polynomial_h hermite_polynomial_he i0 i0e i1 i1e
    laguerre_polynomial_l legendre_polynomial_p log1p log_ndtr logit modified_bessel_i0
    modified_bessel_i1 modified_bessel_k0 modified_bessel_k1 multigammaln ndtr ndtri polygamma psi
    round scaled_modified_bessel_k0 scaled_modified_bessel_k1 shifted_chebyshev_polynomial_t
    shifted_chebyshev_polynomial_u shifted_chebyshev_polynomial_v shifted_chebyshev_polynomial_w
    sinc spherical_bessel_j0 xlog1py xlogy zeta
""".split()
)
#: Namespace prefix (as users write it) -> (module, names).
ELEMENTWISE_NAMESPACES = {
    "torch": (torch, TORCH_ELEMENTWISE),
    "F": (F, FUNCTIONAL_ELEMENTWISE),
    "torch.special": (torch.special, SPECIAL_ELEMENTWISE),
}
#: Every elementwise torch function object -> its name as written ("F.gelu").
ELEMENTWISE: dict[Callable, str] = {
    getattr(module, name): f"{prefix}.{name}"
    for prefix, (module, names) in ELEMENTWISE_NAMESPACES.items()
    for name in names
}
#: Methods of one tensor from torch.nn.functional (x.gelu(), x.silu()); torch's are all methods.
FUNCTIONAL_METHODS: dict[str, Callable[..., torch.Tensor]] = {"gelu": F.gelu, "silu": F.silu}
#: Python operators: dunder name -> function of (self, other) in the operator's argument order.
OPERATORS = {
    "__add__": operator.add,
    "__sub__": operator.sub,
    "__mul__": operator.mul,
    "__truediv__": operator.truediv,
    "__floordiv__": operator.floordiv,
    "__mod__": operator.mod,
    "__pow__": operator.pow,
    "__eq__": operator.eq,
    "__ne__": operator.ne,
    "__lt__": operator.lt,
    "__le__": operator.le,
    "__gt__": operator.gt,
    "__ge__": operator.ge,
    "__and__": operator.and_,
    "__or__": operator.or_,
    "__xor__": operator.xor,
}
REFLECTED = {
    "__radd__": operator.add,
    "__rsub__": operator.sub,
    "__rmul__": operator.mul,
    "__rtruediv__": operator.truediv,
    "__rfloordiv__": operator.floordiv,
    "__rpow__": operator.pow,
    "__rand__": operator.and_,
    "__ror__": operator.or_,
    "__rxor__": operator.xor,
}
UNARY_OPERATORS: dict[str, Callable[[Any], Any]] = {
    "__neg__": operator.neg,
    "__pos__": operator.pos,
    "__abs__": operator.abs,
    "__invert__": operator.invert,
}


def where(condition: MeshTensor, x: Any, y: Any) -> MeshTensor:
    """`torch.where` by name: dims are the union of the three inputs' dims.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="d:tp")
    >>> x = tm.distribute(torch.tensor([-1.0, 2.0, -3.0, 4.0]), "d", mesh)
    >>> tm.where(x > 0, x, 0.0).full()
    tensor([0., 2., 0., 4.])
    """
    return pointwise(torch.where, condition, x, y)


def cast(x: MeshTensor, dtype: torch.dtype) -> MeshTensor:
    """The same tensor in another dtype (Mesh TF's `mtf.cast`); local, no communication.

    >>> import torch, torchmesh as tm
    >>> x = tm.ones("d:4", tm.Mesh("tp:2", rules="d:tp"))
    >>> tm.cast(x, torch.bfloat16).dtype
    torch.bfloat16
    """
    if not isinstance(dtype, torch.dtype):
        raise ArgumentTypeError(
            f"cast(x, {dtype!r}): the dtype is a torch.dtype (torch.bfloat16, ...), not a {type(dtype).__name__}."
        )
    return x._map(lambda t: t.to(dtype))
