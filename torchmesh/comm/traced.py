"""Planning inside torch.compile: the cached planners run once, at trace time, as constants.

Eagerly a planner (`plan_op`, `plan_relayout`, `resolve`, `step_sizes`, ...) is an
lru_cached pure function of frozen values, so the hot path is a dict lookup. Dynamo sees no
cache: it would trace each planner's body on every compile (thousands of bytecodes per op,
most of the compile time). The functions here hand dynamo the arguments as plain Python
constants (names, sizes, axes), rebuild the values and call the planner at trace time
(`torch.compiler.assume_constant_result`), and give compiled code its result as an attribute
of a global object, which dynamo treats like any global value. Dynamo guards the fields the
constants were read from, so a tensor with another layout recompiles rather than reusing a
stale plan.

Only code running under torch.compile calls these (`comm.backend.compiling()`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchmesh.comm.backend import compiling
from torchmesh.errors import TorchMeshError
from torchmesh.placement.dims import Dim, dim_names
from torchmesh.placement.layout import TensorLayout, is_even, resolve
from torchmesh.placement.mesh_shape import MeshShape, axis_groups
from torchmesh.placement.op_plan import OpPlan, plan_op
from torchmesh.placement.plan import (
    AllReduce,
    AllToAll,
    Gather,
    ReduceScatter,
    Slice,
    Step,
    plan_relayout,
    step_sizes,
)
from torchmesh.placement.rules import LayoutRules


def _axes_of(rules: LayoutRules, names: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    return tuple(rules.axes_of(n) for n in names)


#: The planners `constant` may call, by name (dynamo passes a name on as a constant, not an
#: lru_cache wrapper): placement's own, and those registered with `planner`.
PLANNERS: dict[str, Callable[..., Any]] = {
    "plan_op": plan_op,
    "plan_relayout": plan_relayout,
    "resolve": resolve,
    "step_sizes": step_sizes,
    "axis_groups": axis_groups,
    "TensorLayout": TensorLayout,
    "is_even": is_even,
    "dim_names": dim_names,
    "parse_rules": LayoutRules.parse,
    "axes_of": _axes_of,
}


def planner(fn: Callable[..., Any]) -> str:
    """Register a pure (cached) function of Python constants (a kernel builder, say); its name
    for `constant(name, ...)`, which compiled code calls instead of it."""
    name = f"{fn.__module__}.{fn.__qualname__}"
    if PLANNERS.setdefault(name, fn) is not fn:
        raise ValueError(f"traced.planner: another function is registered as {name!r}.")
    return name


def static(value: Any) -> Any:
    """`value`, an int or float, as a constant dynamo guards on. Dynamo makes a number that
    changed between two compiles of a function symbolic (a batch size, a norm's eps), and a
    planner needs its value: dynamo specializes the keys of a dict."""
    return next(iter({value: None}))


def constant(name: str, *args: Any) -> Any:
    """`PLANNERS[name](*args)`, computed at trace time. `args` are Python constants (tuples of
    names, sizes, axes) or values frozen by `freeze_layout`, `freeze_shape`, ... (below)."""
    result = getattr(_PLANNED, _plan(name, *args))
    if isinstance(result, _Refused):  # the planner raised: raise it again here, in the traced code
        raise result.error(result.message)
    return result


# ---- the planners of the op path, as compiled code calls them ----------------------------------
def layout(dims: tuple[Dim, ...], axes: tuple[tuple[str, ...], ...]) -> TensorLayout:
    """`TensorLayout(dims, axes)`, also inside torch.compile (whose tracer cannot run the
    `hash` a layout computes when made): ops that build a layout call this."""
    if compiling():
        return constant("TensorLayout", tuple(freeze_dim(d) for d in dims), axes)
    return TensorLayout(dims, axes)


def plan_op_traced(
    inputs: tuple[TensorLayout, ...],
    out_names: tuple[str, ...],
    rules: LayoutRules,
    mesh: MeshShape,
    reduce_op: str,
    what: str,
) -> OpPlan:
    frozen = tuple(freeze_layout(x) for x in inputs)
    return constant("plan_op", frozen, out_names, freeze_rules(rules), freeze_shape(mesh), reduce_op, what)


def resolve_traced(dims: tuple[Dim, ...], rules: LayoutRules, mesh: MeshShape) -> TensorLayout:
    return constant("resolve", tuple(freeze_dim(d) for d in dims), freeze_rules(rules), freeze_shape(mesh))


def parse_rules_traced(rules: Any) -> LayoutRules:
    """`LayoutRules.parse(rules)`: text parsed at trace time (other forms as they are traced)."""
    return constant("parse_rules", rules) if isinstance(rules, str) else LayoutRules.parse(rules)


def plan_relayout_traced(src: TensorLayout, dst: TensorLayout) -> tuple[Step, ...]:
    return constant("plan_relayout", freeze_layout(src), freeze_layout(dst))


def step_sizes_traced(
    src: TensorLayout, steps: tuple[Step, ...], mesh: MeshShape, coords: tuple[tuple[int, ...], ...]
) -> tuple[tuple[int, ...] | None, ...]:
    coords = tuple(tuple(static(i) for i in c) for c in coords)
    return constant("step_sizes", freeze_layout(src), tuple(freeze_step(s) for s in steps), freeze_shape(mesh), coords)


def is_even_traced(layout: TensorLayout, mesh: MeshShape) -> bool:
    return constant("is_even", freeze_layout(layout), freeze_shape(mesh))


def axes_of_traced(rules: LayoutRules, names: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """The rules' axes of each of `names`."""
    return constant("axes_of", freeze_rules(rules), names)


def axis_groups_traced(mesh: MeshShape, axes: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    return constant("axis_groups", freeze_shape(mesh), axes)


# ---- values as Python constants (traced: a few attribute reads each), and back ------------------
# A frozen value is a tuple tagged by its first item (a name no dim or axis can have).
_DIM, _LAYOUT, _SHAPE, _RULES = "\0Dim", "\0TensorLayout", "\0MeshShape", "\0LayoutRules"
_STEPS: dict[type, str] = {
    Gather: "\0Gather",
    Slice: "\0Slice",
    AllToAll: "\0AllToAll",
    AllReduce: "\0AllReduce",
    ReduceScatter: "\0ReduceScatter",
}
_STEP_TYPES = {tag: cls for cls, tag in _STEPS.items()}


def freeze_layout(x: TensorLayout) -> tuple:
    return (_LAYOUT, tuple((d.name, static(d.size)) for d in x.dims), x.axes)


def freeze_dim(d: Dim) -> tuple:
    return (_DIM, d.name, static(d.size))


def freeze_shape(m: MeshShape) -> tuple:
    return (_SHAPE, tuple((n, static(s)) for n, s in m.axes))


def freeze_rules(r: LayoutRules) -> tuple:
    return (_RULES, r.rules)


def freeze_step(x: Step) -> tuple:
    if isinstance(x, AllReduce):
        return (_STEPS[AllReduce], x.axes, x.op)
    if isinstance(x, AllToAll):
        return (_STEPS[AllToAll], x.axis, x.gather_dim, x.split_dim)
    return (_STEPS[type(x)], x.axis, x.dim)


_THAWED: dict[Any, Any] = {}  # frozen -> value: the same objects every time (the planners' caches hit)


def _thaw(x: Any) -> Any:
    """A frozen value rebuilt (at trace time, in plain Python); other constants as they are."""
    if not isinstance(x, tuple):
        return x
    value = _THAWED.get(x)
    if value is not None:
        return value
    tag = x[0] if x and isinstance(x[0], str) and x[0].startswith("\0") else None
    if tag == _LAYOUT:
        value = TensorLayout(tuple(Dim(n, s) for n, s in x[1]), x[2])
    elif tag == _DIM:
        value = Dim(x[1], x[2])
    elif tag == _SHAPE:
        value = MeshShape(x[1])
    elif tag == _RULES:
        value = LayoutRules(x[1])
    elif tag in _STEP_TYPES:
        value = _STEP_TYPES[tag](*x[1:])
    else:
        value = tuple(_thaw(i) for i in x)
    _THAWED[x] = value
    return value


@dataclass(frozen=True)
class _Refused:
    """A planner's error (a TorchMeshError: invalid layouts, mismatched sizes), kept to be raised
    again by the traced code."""

    error: type[TorchMeshError]
    message: str


class _Planned:
    """The planners' results for compiled code, one attribute each: read as attributes of a
    global object, they reach dynamo as ordinary global values."""


_PLANNED = _Planned()
_ATTRS: dict[tuple, str] = {}  # (planner, frozen args) -> attribute of _PLANNED


def _plan(name: str, *frozen: Any) -> str:
    """Run the planner now (at trace time); the name of the attribute its result is kept in."""
    key = (name, frozen)
    attr = _ATTRS.get(key)
    if attr is None:
        try:
            value = PLANNERS[name](*(_thaw(a) for a in frozen))
        except TorchMeshError as e:  # raised from `constant`: from here dynamo would wrap it in its own error
            value = _Refused(type(e), str(e))
        attr = _ATTRS[key] = f"p{len(_ATTRS)}"  # an identifier: guards name it in code
        setattr(_PLANNED, attr, value)
    return attr


# What `torch.compiler.assume_constant_result` does (torch 2.9: it sets this one attribute),
# without importing torch._dynamo, which would add about 0.9 s to every `import torchmesh`
# (every process of a torchrun job). tests/test_compile.py checks the decorator still does it.
_plan._dynamo_marked_constant = True  # type: ignore[attr-defined]
