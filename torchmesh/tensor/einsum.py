"""`einsum` over dim names: "batch d, d ff -> batch ff".

Contracted dims split over an axis give partial sums, all-reduced over it (or
reduce-scattered when the output is next split over that axis). The Mesh TF form
`einsum([x, w], output_shape=...)` is accepted too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

import torch

from torchmesh.comm import traced
from torchmesh.comm.backend import compiling
from torchmesh.errors import ArgumentTypeError, DimError, ParseError
from torchmesh.placement.dims import Dim, DimsLike, check_name, parse_dims
from torchmesh.placement.layout import local_shape
from torchmesh.placement.op_plan import OpPlan, plan_op
from torchmesh.placement.plan import AllReduce
from torchmesh.tensor.contraction import cached_run, run_op
from torchmesh.tensor.elementwise import _aligner
from torchmesh.tensor.mesh_tensor import MeshTensor

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@lru_cache(maxsize=1024)
def parse_equation(equation: str) -> tuple[tuple[tuple[str, ...], ...], tuple[str, ...] | None]:
    """'batch d, d ff -> batch ff' -> ((('batch','d'), ('d','ff')), ('batch','ff'))."""
    if not isinstance(equation, str):
        raise ParseError(f"einsum equation must be a string like 'batch d, d ff -> batch ff', got {equation!r}")
    lhs, arrow, rhs = equation.partition("->")
    operands = tuple(tuple(n for n in part.split() if n) for part in lhs.split(","))
    out = tuple(n for n in rhs.split() if n) if arrow else None
    for names in operands + ((out,) if out is not None else ()):
        for n in names:
            check_name(n)
        if len(set(names)) != len(names):
            raise ParseError(f"einsum {equation!r}: a dim appears twice in one operand.")
    return operands, out


def einsum(
    equation: str | Sequence[MeshTensor],
    *xs: MeshTensor,
    output_shape: DimsLike | None = None,
    sizes: Mapping[str, int] | None = None,
) -> MeshTensor:
    """Einstein summation over named dims.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="ff:tp")
    >>> x = tm.distribute(torch.ones(4, 8), "batch d", mesh)
    >>> w = tm.distribute(torch.ones(8, 6), "d ff", mesh)
    >>> tm.einsum("batch d, d ff -> batch ff", x, w).sizes
    {'batch': 4, 'ff': 6}

    Mesh TF form: `tm.einsum([x, w], output_shape="batch ff")`; without an output shape the
    output keeps the dims that appear in exactly one input, in order.

    An output dim no input has is a broadcast; its size comes from `sizes` (or from
    `output_shape`'s Dims, as in Mesh TF). It is laid out by the rules (split ones cost
    nothing forward); backward sums over it, an all-reduce over its axes.

    >>> x = tm.distribute(torch.arange(3.0), "d", mesh)
    >>> y = tm.einsum("d -> d ff", x, sizes={"ff": 2})
    >>> y.layout, y.full()
    ({'ff': 'tp'}, tensor([[0., 0.],
            [1., 1.],
            [2., 2.]]))
    """
    run_key: tuple | None = None
    if sizes is None and output_shape is None and isinstance(equation, str) and not compiling():
        try:  # the eager hot path: a call planned before, for these very layouts and mesh
            if len(xs) == 2:
                run_key = ("einsum", equation, id(xs[0]._layout), id(xs[1]._layout), id(xs[0]._mesh))
            else:
                run_key = ("einsum", equation, *[id(x._layout) for x in xs], id(xs[0]._mesh))
        except (AttributeError, IndexError):  # not MeshTensors, or none: checked below
            run_key = None
        if run_key is not None:
            done = cached_run(run_key, xs)
            if done is not None:
                return done
            known = _CHECKED.get((equation, *[x._layout for x in xs]))  # checked before, maybe planned anew
            if known is not None:
                return run_op(xs, known[0], _local_einsum, what=known[1], cache_key=run_key, fresh=True)
    new_sizes = dict(sizes or {})
    if not isinstance(equation, str):
        xs = tuple(equation) + xs
        operand_dims = [x.dims for x in xs]
        if output_shape is None:
            flat = [n for ns in operand_dims for n in ns]
            implied = tuple(n for n in dict.fromkeys(flat) if flat.count(n) == 1)
        else:
            out_dims = parse_dims(output_shape, {**_sizes(xs), **new_sizes})
            new_sizes.update((d.name, d.size) for d in out_dims)
            implied = tuple(d.name for d in out_dims)
        equation = ", ".join(" ".join(ns) for ns in operand_dims) + " -> " + " ".join(implied)
    operands, out = traced.constant(_PARSE, equation) if compiling() else parse_equation(equation)
    if len(operands) != len(xs):
        raise DimError(f"einsum {equation!r} names {len(operands)} operands but got {len(xs)} tensors.")
    for i, (names, x) in enumerate(zip(operands, xs)):
        if not isinstance(x, MeshTensor):
            raise ArgumentTypeError(
                f"einsum {equation!r}: operand {i} is a {type(x).__name__}, not a MeshTensor; "
                f"wrap it with tm.distribute(tensor, '{' '.join(names)}', mesh)."
            )
        if set(names) != set(x.dims) or len(names) != len(x.dims):
            raise DimError(
                f"einsum {equation!r}: operand {i} is written ({' '.join(names)}) but the tensor has "
                f"dims {x.dims}. Name the tensor's dims, in any order."
            )
    if out is None:
        flat = [n for ns in operands for n in ns]
        out = tuple(n for n in dict.fromkeys(flat) if flat.count(n) == 1)
    what = f"einsum {equation!r}"
    extra = _broadcast_dims(what, out, _sizes(xs), new_sizes)
    if extra:  # each new dim joins as a ones operand: the product broadcasts, backward sums over it
        xs, run_key = xs + tuple(_ones(d, xs[0]) for d in extra), None
    elif not new_sizes and not compiling():
        if len(_CHECKED) >= 256:  # small: a new sequence length is a new entry
            _CHECKED.clear()
        _CHECKED[(equation, *(x._layout for x in xs))] = (out, what)
    return run_op(xs, out, _local_einsum, what=what, cache_key=run_key, fresh=True)


#: (equation, each operand's layout) -> (output dims, the op's name): calls already checked
#: (operands named as written, every output dim in an input), which skip parsing and checks.
_CHECKED: dict[tuple, tuple[tuple[str, ...], str]] = {}


def einsum_add(equation: str, x: MeshTensor, w: MeshTensor, bias: MeshTensor) -> MeshTensor:
    """`einsum(equation, x, w) + bias` (a Linear layer: bias's dims are output dims), as one
    op where the contraction needs no collective: each device then runs one `addmm`, as
    torch.nn.Linear does, instead of a matmul and a separate broadcast add. Where the
    contracted dims are split (a row-parallel weight), the bias joins after the all-reduce:
    the einsum, then the add.

    >>> import torch, torchmesh as tm
    >>> from torchmesh.tensor.einsum import einsum_add
    >>> mesh = tm.Mesh("tp:2", rules="ff:tp")
    >>> x, w = tm.ones("batch:2 d:3", mesh), tm.ones("d:3 ff:4", mesh)
    >>> b = tm.distribute(torch.arange(4.0), "ff", mesh)
    >>> einsum_add("batch d, d ff -> batch ff", x, w, b).full()
    tensor([[3., 4., 5., 6.],
            [3., 4., 5., 6.]])
    """
    if compiling() or not isinstance(bias, MeshTensor) or bias._mesh is not x._mesh:
        return einsum(equation, x, w) + bias
    run_key: tuple | None = None
    if isinstance(equation, str):  # planned before, for these layouts and mesh, and these dtypes (they choose the path)
        try:
            dtypes = (x._data[0].dtype, w._data[0].dtype, bias._data[0].dtype)
            run_key = ("einsum_add", equation, *dtypes, id(x._layout), id(w._layout), id(bias._layout), id(x._mesh))
        except (AttributeError, IndexError):  # not MeshTensors: said below
            run_key = None
    if run_key is not None:
        done = cached_run(run_key, (x, w, bias))
        if done is not None:
            return done
    operands, out = parse_equation(equation)
    if (
        out is None
        or len(operands) != 2
        or set(operands[0]) != set(x.dims)
        or set(operands[1]) != set(w.dims)
        or any(n not in out for n in bias.dims)
        or not (x.dtype == w.dtype == bias.dtype)
    ):  # einsum and the add say what is wrong, or promote dtypes as torch does
        return einsum(equation, x, w) + bias
    mesh = x._mesh
    what = f"einsum {equation!r} + bias"
    plan = plan_op((x._layout, w._layout, bias._layout), out, mesh.rules, mesh.shape, "sum", what)
    if any(not isinstance(step, AllReduce) or mesh.impl.live_axes(step.axes) for step in plan.finish):
        return einsum(equation, x, w) + bias  # partial sums: the bias joins after their all-reduce
    return run_op([x, w, bias], out, _local_einsum_add, what=what, cache_key=run_key)


def _local_einsum_add(plan: OpPlan):
    a, b, c = (lay.names for lay in plan.in_layouts)
    return _as_addmm(a, b, c, plan.computed.names)


@lru_cache(maxsize=4096)
def _as_addmm(a: tuple[str, ...], b: tuple[str, ...], c: tuple[str, ...], out: tuple[str, ...]):
    """`a·b + c` per device: one `addmm` where the product is a plain matrix product with the
    output in (left, right) order and c's dims are the right ones in order, else the matmul
    (or torch.einsum) and a broadcast add."""
    matmul = _as_matmul(a, b, out)
    left = tuple(n for n in out if n in a and n not in b)
    right = tuple(n for n in out if n in b and n not in a)
    fused = (
        matmul is not None
        and not any(n in a and n in b for n in out)  # no batch dims
        and out == left + right
        and c == right
    )
    if not fused:
        product = matmul if matmul is not None else _einsum_fn(_letters((a, b), out))
        align = _aligner(c, out)
        return lambda x, y, z: product(x, y) + align(z)
    contracted = tuple(n for n in a if n not in left)  # in a's order, in both operands
    a_perm = tuple(a.index(n) for n in left + contracted)
    b_perm = tuple(b.index(n) for n in contracted + right)
    a_id, b_id = a_perm == tuple(range(len(a))), b_perm == tuple(range(len(b)))
    nl, nr = len(left), len(right)

    def addmm(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if not a_id:
            x = x.permute(a_perm)
        if not b_id:
            y = y.permute(b_perm)
        ls, rs, k = x.shape[:nl], y.shape[y.dim() - nr :], x.shape[nl:].numel()
        r = torch.addmm(z.reshape(-1), x.reshape(ls.numel(), k), y.reshape(k, rs.numel()))
        return r.view((*ls, *rs))

    return addmm


def _einsum_fn(eq: str) -> Callable[..., torch.Tensor]:
    """Each device's torch.einsum of `eq` (letters), where no matmul lowering applies."""
    return lambda *ts: torch.einsum(eq, *ts)


def _broadcast_dims(
    what: str, out: tuple[str, ...], have: Mapping[str, int], sizes: Mapping[str, int]
) -> tuple[Dim, ...]:
    """The output dims no input has, sized by `sizes`; a size that contradicts an input's,
    or names a dim of neither the inputs nor the output, is an error."""
    for name, size in sizes.items():
        if name in have and have[name] != size:
            raise DimError(
                f"{what}: sizes gives {name!r} size {size}, but the inputs have it with size "
                f"{have[name]}; leave it out of sizes (inputs' dims keep their sizes)."
            )
        if name not in have and name not in out:
            raise DimError(
                f"{what}: sizes names {name!r}, which is neither an input dim nor an output dim "
                f"{out}; sizes is for output dims that no input has."
            )
    new = [n for n in out if n not in have]
    unsized = [n for n in new if n not in sizes]
    if unsized:
        raise DimError(
            f"{what}: output dims {unsized} are in no input, so their sizes are unknown. Give "
            f"them: sizes={{{', '.join(f'{n!r}: <size>' for n in unsized)}}} (or Dims with "
            f"sizes in output_shape)."
        )
    return tuple(Dim(n, int(sizes[n])) for n in new)


def _ones(dim: Dim, like: MeshTensor) -> MeshTensor:
    """A 1-d tensor of ones along `dim`, laid out by the rules, in `like`'s dtype and device."""
    mesh = like.mesh
    lay = mesh.layout_of((dim,))
    slicer = mesh.impl.slice_mesh
    data = mesh.impl.make(lambda c: torch.ones(local_shape(lay, slicer, c), dtype=like.dtype, device=like.device))
    return MeshTensor(data, lay, mesh)


def _sizes(xs: Sequence[MeshTensor]) -> dict[str, int]:
    return {n: s for x in xs for n, s in x.sizes.items()}


def _local_einsum(plan: OpPlan):
    if compiling():
        inputs = tuple(lay.names for lay in plan.in_layouts)
        out = plan.computed.names
        lowered = traced.constant(_AS_MATMUL, *inputs, out) if len(inputs) == 2 else None
        eq = traced.constant(_LETTERS, inputs, out) if lowered is None else ""
        return lowered if lowered is not None else _einsum_fn(eq)
    known = _LOCAL_FNS.get(id(plan))
    if known is not None and known[0] is plan:
        return known[1]
    inputs = tuple(lay.names for lay in plan.in_layouts)
    out = plan.computed.names
    lowered = _as_matmul(*inputs, out) if len(inputs) == 2 else None
    fn = lowered if lowered is not None else _einsum_fn(_letters(inputs, out))
    if len(_LOCAL_FNS) >= 256:  # small: it keeps plans alive (a new sequence length is a new plan)
        _LOCAL_FNS.clear()
    _LOCAL_FNS[id(plan)] = (plan, fn)
    return fn


#: id(plan) -> (plan, its per-device function): eager einsums look theirs up once per plan.
_LOCAL_FNS: dict[int, tuple[OpPlan, Callable[..., torch.Tensor]]] = {}


@lru_cache(maxsize=4096)
def _as_matmul(a: tuple[str, ...], b: tuple[str, ...], out: tuple[str, ...]):
    """A two-operand einsum as one (batched) matmul on permuted views, or None.

    Dims split into batch (in a, b and out), left (a and out), right (b and out) and
    contracted (a and b only): a -> [batch, left, k], b -> [batch, k, right]. For the common
    layer shapes every permutation is the identity and this is a plain `mm`, whose backward
    is two `mm`s: eager torch.einsum's reshapes cost more than the product on small tensors.
    """
    if any(n not in b and n not in out for n in a) or any(n not in a and n not in out for n in b):
        return None  # a dim summed within one operand: leave it to torch.einsum
    batch = tuple(n for n in out if n in a and n in b)
    left = tuple(n for n in out if n in a and n not in b)
    right = tuple(n for n in out if n in b and n not in a)
    contracted = tuple(n for n in a if n in b and n not in out)
    a_perm = tuple(a.index(n) for n in batch + left + contracted)
    b_perm = tuple(b.index(n) for n in batch + contracted + right)
    result = batch + left + right
    out_perm = tuple(result.index(n) for n in out)
    nb, nl, nr, nk = len(batch), len(left), len(right), len(contracted)
    a_id, b_id = a_perm == tuple(range(len(a))), b_perm == tuple(range(len(b)))
    out_id = out_perm == tuple(range(len(out)))
    flat = nb == 0 and nl == 1 and nr == 1 and nk == 1  # already matrices: no reshape at all

    def matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not a_id:
            x = x.permute(a_perm)
        if not b_id:
            y = y.permute(b_perm)
        if flat:
            r = torch.mm(x, y)
        else:
            bs, ls, rs = x.shape[:nb], x.shape[nb : nb + nl], y.shape[y.dim() - nr :]
            k = y.shape[nb : y.dim() - nr].numel()
            x = x.reshape(bs.numel(), ls.numel(), k) if nb else x.reshape(ls.numel(), k)
            y = y.reshape(bs.numel(), k, rs.numel()) if nb else y.reshape(k, rs.numel())
            r = (torch.bmm(x, y) if nb else torch.mm(x, y)).view((*bs, *ls, *rs))
        return r if out_id else r.permute(out_perm)

    return matmul


@lru_cache(maxsize=4096)
def _letters(inputs: tuple[tuple[str, ...], ...], out: tuple[str, ...]) -> str:
    table: dict[str, str] = {}
    for names in inputs:
        for n in names:
            if n not in table:
                if len(table) == len(_LETTERS):
                    raise DimError(f"einsum over more than {len(_LETTERS)} distinct dims is not supported.")
                table[n] = _LETTERS[len(table)]
    return ",".join("".join(table[n] for n in ns) for ns in inputs) + "->" + "".join(table[n] for n in out)


_PARSE, _AS_MATMUL, _LETTERS = traced.planner(parse_equation), traced.planner(_as_matmul), traced.planner(_letters)
