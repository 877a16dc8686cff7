"""Fuzzing the public entry points (issue 18.5): every input gives either a value equal to plain
torch's, on small sim meshes (uneven and empty blocks included), or a clear torchmesh error: a
`TorchMeshError` that is a ValueError or TypeError and whose message names something from the
input. Never another exception, never a hang.

Hypothesis draws meshes, rules, dims strings, einsum specs, reductions, rearrange patterns,
relayouts, slice/pad/shift arguments, constructors, lookups, dropout and checkpoint paths.
Deterministic (`derandomize=True`) and bounded (`max_examples`), about half a minute in all.
The figures (inputs tried, equal values, clear errors, wrong values, hangs) are printed at the
end of the module and recorded in docs/reliability.md, section "Fuzzing".
"""

from __future__ import annotations

import math
import os
import re
import signal
import string
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import einops
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import torchmesh as tm

#: Inputs tried, and what each gave: "equal" (a value equal to torch's), "value" (a value where
#: torch has no counterpart to compare with), "clear" (a clear torchmesh error), "unclear"
#: (another exception, or a torchmesh error that names nothing of its input), "wrong" (a value
#: that differs from torch's), "hang" (no answer within HANG_S seconds).
FIGURES: Counter = Counter()
HANG_S = 20.0
MESHES = ("dp:1", "tp:2", "a:3", "dp:2;tp:2")
NAMES = ("a", "b", "c", "d")
#: No shrinking: a failing input is reported as drawn (shrinking costs minutes on a busy machine).
PHASES = (Phase.explicit, Phase.reuse, Phase.generate)
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    phases=PHASES,
    suppress_health_check=list(HealthCheck),
)
SMALL = settings(FUZZ, max_examples=25)


class Hang(BaseException):
    """An input that got no answer within HANG_S seconds (a BaseException, so nothing catches it)."""


@contextmanager
def bounded(seconds: float):
    def alarm(signum, frame):
        raise Hang()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module", autouse=True)
def figures(request):
    yield FIGURES
    line = "fuzz figures: " + ", ".join(
        f"{k} {FIGURES[k]}" for k in ("inputs", "equal", "value", "clear", "unclear", "wrong", "hang")
    )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)
    if os.environ.get("TORCHMESH_FUZZ_REPORT"):
        Path(os.environ["TORCHMESH_FUZZ_REPORT"]).write_text(line + "\n")


def _tokens(values: Iterable[object]) -> list[str]:
    """The pieces of the input a clear message may name: each value's repr, its str, and the
    names and numbers inside strings."""
    out = []
    for v in values:
        if v is None:
            continue
        out += [repr(v), str(v)]
        if isinstance(v, str):
            out += re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\d+", v)
    return [t for t in out if t]


def judge(
    what: str,
    run: Callable[[], object],
    reference: Callable[[], object] | None,
    names: Iterable[object],
    compare: Callable[[object, object], None] | None = None,
    torch_may_refuse: bool = False,
) -> object:
    """Run one fuzzed input: a value equal to `reference()` (torch's), or a clear torchmesh error.

    `names`: pieces of the input, at least one of which a clear error message names.
    `torch_may_refuse`: a value is fine where torch raises (torchmesh defines more, e.g. the
    max of an empty dim split into blocks is still an error there, but broadcast by name is not)."""
    FIGURES["inputs"] += 1
    try:
        with bounded(HANG_S):
            got = run()
    except Hang:
        FIGURES["hang"] += 1
        pytest.fail(f"{what}: no answer within {HANG_S} s")
    except tm.TorchMeshError as e:
        message = str(e)
        pieces = _tokens(names)
        # ValueError/TypeError subclasses; a BackendError (a RuntimeError) for a backend that
        # cannot run here, which test_api pins as not a ValueError.
        if not isinstance(e, (ValueError, TypeError, tm.BackendError)) or not any(p in message for p in pieces):
            FIGURES["unclear"] += 1
            pytest.fail(f"{what}: {type(e).__name__} names nothing of the input {pieces[:8]}: {message}")
        FIGURES["clear"] += 1
        return e
    except Exception as e:
        FIGURES["unclear"] += 1
        pytest.fail(f"{what}: {type(e).__name__} instead of a torchmesh error:\n{traceback.format_exc()}")
    if reference is None:
        FIGURES["value"] += 1
        return got
    try:
        want = reference()
    except Exception as e:
        if torch_may_refuse:
            FIGURES["value"] += 1
            return got
        FIGURES["wrong"] += 1
        pytest.fail(f"{what}: torchmesh gave a value where torch raises {type(e).__name__}: {e}")
    try:
        (compare or _close)(got, want)
    except AssertionError as e:
        FIGURES["wrong"] += 1
        pytest.fail(f"{what}: a value different from torch's: {e}")
    FIGURES["equal"] += 1
    return got


def _close(got, want) -> None:
    if isinstance(got, tm.MeshTensor):
        got = got.full()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)


# ---- strategies ------------------------------------------------------------------------------

_mesh_cache: dict[tuple[str, str], tm.Mesh] = {}


def mesh_of(spec: str, rules: str) -> tm.Mesh:
    key = (spec, rules)
    if key not in _mesh_cache:
        _mesh_cache[key] = tm.Mesh(spec, rules=rules, backend="sim")
    return _mesh_cache[key]


@st.composite
def meshes(draw, names: tuple[str, ...] = NAMES) -> tm.Mesh:
    """A small sim mesh and rules splitting some of `names` over its axes (a dim over two axes too)."""
    spec = draw(st.sampled_from(MESHES))
    axes = [p.split(":")[0] for p in spec.split(";")]
    rules = []
    for n in names:
        over = draw(st.lists(st.sampled_from(axes), max_size=2, unique=True))
        if over:
            rules.append(f"{n}:{','.join(over)}")
    return mesh_of(spec, ";".join(rules))


@st.composite
def tensors(draw, mesh: tm.Mesh, max_dims: int = 3, min_dims: int = 1, max_size: int = 5):
    """(MeshTensor, torch tensor, dim names): distinct names, sizes 0..max_size (empty blocks)."""
    names = tuple(draw(st.lists(st.sampled_from(NAMES), min_size=min_dims, max_size=max_dims, unique=True)))
    sizes = [draw(st.integers(0, max_size)) for _ in names]
    t = torch.randn(sizes, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    try:
        x = tm.distribute(t, " ".join(names), mesh)
    except tm.LayoutError:  # two dims over one axis: a clear error, asserted in test_layouts
        x = tm.distribute(t, " ".join(names), mesh_of(str(mesh.shape), ""))
    return x, t, names


junk = st.text(alphabet=string.ascii_lowercase[:4] + "dptx:;,()-> 0123456789_.*é\t", max_size=16)


def _positions(names: tuple[str, ...], which: Iterable[str]) -> tuple[int, ...]:
    return tuple(names.index(n) for n in which)


# ---- meshes, rules, dims strings, constructors ------------------------------------------------


@given(
    spec=st.one_of(junk, st.sampled_from(MESHES)),
    rules=st.one_of(junk, st.just("a:dp;b:tp")),
    backend=st.sampled_from(["sim", "sim", "abstract", "tpu", ""]),
)
@FUZZ
def test_mesh_and_rules_strings(spec, rules, backend):
    def run():
        mesh = tm.Mesh(spec, rules=rules, backend=backend)
        assert mesh.size == math.prod(mesh.shape.sizes)
        return mesh

    judge("Mesh", run, None, [spec, rules, backend, "backend"])


@given(size=st.sampled_from([4097, 10**5, 10**9, 2**40]), backend=st.sampled_from(["sim", "abstract"]))
@settings(FUZZ, max_examples=8)
def test_a_huge_sim_mesh_is_refused_at_once(size, backend):
    mesh = judge("Mesh", lambda: tm.Mesh(f"dp:{size}", backend=backend), None, [str(size), "sim"])
    assert isinstance(mesh, tm.MeshError) == (backend == "sim")


@given(
    mesh=meshes(),
    dims=st.one_of(
        junk,
        st.lists(st.sampled_from(NAMES), max_size=3, unique=True).flatmap(
            lambda ns: st.tuples(*[st.integers(0, 5) for _ in ns]).map(
                lambda ss: " ".join(f"{n}:{s}" for n, s in zip(ns, ss))
            )
        ),
    ),
    kind=st.sampled_from(["zeros", "ones", "full", "randn", "rand", "arange"]),
    value=st.one_of(st.floats(-3, 3), st.integers(-3, 3), st.just("x"), st.none()),
    dtype=st.sampled_from([None, torch.float64, torch.int64, torch.bool, "float32"]),
)
@FUZZ
def test_constructors(mesh, dims, kind, value, dtype):
    def sizes():
        return [int(tok.split(":")[1]) for tok in dims.split()]

    run: Callable[[], object]
    ref: Callable[[], object] | None = None
    if kind == "zeros":
        run, ref = (lambda: tm.zeros(dims, mesh, dtype=dtype)), (lambda: torch.zeros(sizes(), dtype=dtype))
    elif kind == "ones":
        run, ref = (lambda: tm.ones(dims, mesh, dtype=dtype)), (lambda: torch.ones(sizes(), dtype=dtype))
    elif kind == "full":
        run, ref = (lambda: tm.full(dims, value, mesh, dtype=dtype)), (lambda: torch.full(sizes(), value, dtype=dtype))
    elif kind == "arange":
        run = lambda: tm.arange(dims, mesh, dtype=dtype)
        ref = lambda: torch.arange(sizes()[0], dtype=dtype) if len(sizes()) == 1 else torch.arange(())
    else:
        fn = getattr(tm, kind)
        run = lambda: fn(dims, mesh, seed=value, dtype=dtype)
    judge(kind, run, ref, [dims, value, dtype, "dtype", "seed", "value"])


@given(mesh=meshes(), data=st.data())
@FUZZ
def test_distribute_and_full(mesh, data):
    t = torch.randn([data.draw(st.integers(0, 4)) for _ in range(data.draw(st.integers(0, 3)))])
    dims = data.draw(st.one_of(junk, st.lists(st.sampled_from(NAMES), max_size=3, unique=True).map(" ".join)))
    judge("distribute", lambda: tm.distribute(t, dims, mesh), lambda: t, [dims])


# ---- einsum ----------------------------------------------------------------------------------


@st.composite
def einsum_specs(draw):
    """Inputs over dims a..d of consistent sizes (sometimes one off), and an output: a valid
    choice, a name no input has, a duplicate or junk."""
    size = {n: draw(st.integers(0, 4)) for n in NAMES}
    inputs = draw(
        st.lists(st.lists(st.sampled_from(NAMES), min_size=0, max_size=3, unique=True), min_size=1, max_size=3)
    )
    sizes = [[size[n] for n in ns] for ns in inputs]
    if draw(st.booleans()) and inputs[0]:
        sizes[0][0] += 1  # a size that disagrees between inputs
    used = sorted({n for ns in inputs for n in ns})
    out = draw(
        st.one_of(
            st.lists(st.sampled_from(used or ["a"]), max_size=3, unique=True).map(" ".join),
            st.lists(st.sampled_from(NAMES + ("e",)), max_size=3).map(" ".join),
            junk,
        )
    )
    return inputs, sizes, out


@given(mesh=meshes(NAMES + ("e",)), spec=einsum_specs(), seed=st.integers(0, 9))
@FUZZ
def test_einsum(mesh, spec, seed):
    inputs, sizes, out = spec
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(s, generator=g) for s in sizes]
    equation = ", ".join(" ".join(ns) for ns in inputs) + " -> " + out

    def run():
        xs = [tm.distribute(t, " ".join(ns), mesh) for t, ns in zip(ts, inputs)]
        return tm.einsum(equation, *xs)

    def ref():
        letters = {n: chr(ord("a") + i) for i, n in enumerate(NAMES + ("e",))}
        outs = out.split()
        if not all(o in letters for o in outs):
            raise ValueError("not an output torch can read")
        return torch.einsum(
            ",".join("".join(letters[n] for n in ns) for ns in inputs) + "->" + "".join(letters[o] for o in outs), *ts
        )

    judge(f"einsum {equation!r}", run, ref, [equation, out, *[n for ns in inputs for n in ns]])


# ---- reductions ------------------------------------------------------------------------------

_TORCH_REDUCE = {
    "sum": lambda t, p: t.sum(dim=p) if p else t,
    "mean": lambda t, p: t.mean(dim=p) if p else t,
    "max": lambda t, p: torch.amax(t, dim=p) if p else t,
    "min": lambda t, p: torch.amin(t, dim=p) if p else t,
    "logsumexp": lambda t, p: torch.logsumexp(t, dim=p) if p else t,
}


@given(
    mesh=meshes(),
    data=st.data(),
    op=st.sampled_from([*_TORCH_REDUCE, "softmax", "log_softmax"]),
    style=st.sampled_from(["names", "all", "unknown", "int", "reduced_dim", "output_shape", "bad_output_shape"]),
)
@FUZZ
def test_reductions(mesh, data, op, style):
    x, t, names = data.draw(tensors(mesh))
    which = tuple(data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True)))
    if op in ("softmax", "log_softmax"):
        which = which[:1]
        fn = getattr(tm, op)
        i = names.index(which[0])
        arg: object = 0 if style == "int" else ("z" if style == "unknown" else which[0])
        judge(f"{op}({arg!r})", lambda: fn(x, arg), lambda: getattr(torch, op)(t, i), [arg, op, *names])
        return
    kwargs: dict[str, object] = {}
    args: tuple = ()
    if style == "names":
        args = (" ".join(which),)
    elif style == "unknown":
        args = ("z",)
    elif style == "int":
        args = (-1,)
    elif style == "reduced_dim":
        kwargs["reduced_dim"] = [tm.Dim(n, x.sizes[n]) for n in which]
    elif style == "output_shape":
        kwargs["output_shape"] = [tm.Dim(n, x.sizes[n]) for n in names if n not in which]
    elif style == "bad_output_shape":
        kwargs["output_shape"] = [tm.Dim(which[0], x.sizes[which[0]] + 1)]
    if style == "all":
        which = names
    fn = getattr(tm, "reduce_" + op) if op in ("sum", "mean", "max", "min") else tm.logsumexp
    if fn is tm.logsumexp and kwargs:
        return
    judge(
        f"{op}{args}{kwargs}",
        lambda: fn(x, *args, **kwargs),
        lambda: _TORCH_REDUCE[op](t, _positions(names, which)),
        [*args, *kwargs, *which, op],
    )


# ---- rearrange -------------------------------------------------------------------------------


@st.composite
def rearranges(draw):
    """A tensor's dims, a pattern over them (a dim split into two parts, parts merged, reordered),
    size keywords (sometimes wrong or naming nothing), and sometimes a mangled pattern."""
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True))
    left, parts, sizes, kw = [], [], [], {}
    for n in names:
        if draw(st.booleans()):
            p, q = n + "1", n + "2"
            sp, sq = draw(st.integers(0, 3)), draw(st.integers(1, 3))
            left.append(f"({p} {q})")
            parts += [p, q]
            sizes.append(sp * sq)
            kw[p] = sp
        else:
            left.append(n)
            parts.append(n)
            sizes.append(draw(st.integers(0, 5)))
    order = draw(st.permutations(parts))
    right, i = [], 0
    while i < len(order):
        k = draw(st.integers(1, min(2, len(order) - i)))
        right.append(order[i] if k == 1 else "(" + " ".join(order[i : i + k]) + ")")
        i += k
    pattern = " ".join(left) + " -> " + " ".join(right)
    mangle = draw(st.sampled_from(["none"] * 4 + ["wrong_size", "extra_size", "drop", "junk", "negative"]))
    if mangle == "wrong_size":
        kw[parts[0]] = kw.get(parts[0], 7) + 1
    elif mangle == "extra_size":
        kw["zz"] = 2
    elif mangle == "negative" and kw:
        kw[next(iter(kw))] = -1
    elif mangle == "drop":
        pattern = pattern.rsplit(" ", 1)[0]
    elif mangle == "junk":
        pattern = draw(junk)
    return names, sizes, pattern, kw


@given(mesh=meshes(NAMES + tuple(n + s for n in NAMES for s in "12")), spec=rearranges())
@FUZZ
def test_rearrange(mesh, spec):
    names, sizes, pattern, kw = spec
    t = torch.randn(sizes)

    def run():
        return tm.rearrange(tm.distribute(t, " ".join(names), mesh), pattern, **kw)

    judge(
        f"rearrange {pattern!r} {kw}",
        run,
        lambda: einops.rearrange(t, pattern, **kw),
        [pattern, *kw, *map(str, kw.values()), *names],
    )


# ---- relayout, slice, pad, shift, concat, stack ---------------------------------------------


@given(
    mesh=meshes(), data=st.data(), rules=st.one_of(junk, st.sampled_from(["a:dp", "a:tp;b:dp", "b:a", "", "c:tp,dp"]))
)
@FUZZ
def test_relayout(mesh, data, rules):
    x, t, names = data.draw(tensors(mesh))
    judge(f"relayout({rules!r})", lambda: x.relayout(rules), lambda: t, [rules, *names])


ints = st.one_of(
    st.integers(-7, 7),
    st.sampled_from([10**6, -(10**6), 2**63 - 1]),
    st.just(np.int64(2)),
    st.just(2.5),
    st.just("1"),
    st.none(),
)


def _torch_slice(t: torch.Tensor, i: int, start, stop) -> torch.Tensor:
    return t[(slice(None),) * i + (slice(start, stop),)]


def _torch_shift(t: torch.Tensor, i: int, n: int, wrap: bool) -> torch.Tensor:
    if wrap:
        return torch.roll(t, n, i) if t.shape[i] else t
    out = torch.zeros_like(t)
    length = t.shape[i]
    if abs(n) < length:
        src = t.narrow(i, max(0, -n), length - abs(n))
        out.narrow(i, max(0, n), length - abs(n)).copy_(src)
    return out


@given(
    mesh=meshes(),
    data=st.data(),
    op=st.sampled_from(["slice", "pad", "shift", "shift_wrap"]),
    a=ints,
    b=ints,
    dim_ok=st.booleans(),
)
@FUZZ
def test_slice_pad_shift(mesh, data, op, a, b, dim_ok):
    x, t, names = data.draw(tensors(mesh))
    dim = data.draw(st.sampled_from(names)) if dim_ok else "z"
    i = names.index(dim) if dim_ok else 0
    if op == "slice":
        run, ref = (lambda: tm.slice(x, dim, a, b)), (lambda: _torch_slice(t, i, _int(a, None), _int(b, None)))
    elif op == "pad":
        run = lambda: tm.pad(x, dim, a, b)
        ref = lambda: F.pad(t.movedim(i, -1), (_int(a), _int(b))).movedim(-1, i)
    else:
        wrap = op == "shift_wrap"
        run, ref = (lambda: tm.shift(x, dim, a, wrap=wrap)), (lambda: _torch_shift(t, i, _int(a), wrap))
    judge(f"{op}({dim!r}, {a!r}, {b!r})", run, ref if dim_ok else (lambda: 1 / 0), [dim, a, b, op])


def _int(v, *also):
    """What torch's own indexing takes: ints (numpy ints too), never floats or strings (None
    where `also` admits it: a slice's open end)."""
    if v in also:
        return v
    if v is None or isinstance(v, (float, str)):
        raise TypeError(v)
    return int(v)


@given(data=st.data(), same_mesh=st.booleans(), op=st.sampled_from(["concat", "stack"]))
@FUZZ
def test_concat_and_stack(data, same_mesh, op):
    x, t, names = data.draw(tensors(data.draw(meshes())))
    mesh = x.mesh
    other_mesh = mesh if same_mesh else tm.Mesh(str(mesh.shape), rules=mesh.rules)
    sizes = {n: x.sizes[n] for n in names}
    dim = data.draw(st.sampled_from(names + ("z",)))
    if op == "concat" and dim in sizes:
        sizes[dim] = data.draw(st.integers(0, 3))
    if data.draw(st.booleans()):
        sizes[names[-1]] += 1  # another dim of another size
    u = torch.randn([sizes[n] for n in names])
    y = tm.distribute(u, " ".join(names), other_mesh)
    if op == "concat":
        ref = lambda: torch.cat([t, u], names.index(dim))
        judge(f"concat {dim!r}", lambda: tm.concat([x, y], dim), ref, [dim, "mesh", *names])
    else:
        new = data.draw(st.sampled_from(["s", names[0]]))
        judge(f"stack {new!r}", lambda: tm.stack([x, y], new), lambda: torch.stack([t, u]), [new, "mesh", *names])


# ---- lookups, top_k, cumsum, dropout --------------------------------------------------------


@given(mesh=meshes(NAMES + ("v",)), data=st.data(), op=st.sampled_from(["embedding", "one_hot"]))
@FUZZ
def test_lookups(mesh, data, op):
    vocab = data.draw(st.integers(1, 5))
    ids = torch.tensor(data.draw(st.lists(st.integers(-2, vocab + 1), min_size=1, max_size=5)))
    if op == "one_hot":
        judge(
            "one_hot",
            lambda: tm.one_hot(tm.distribute(ids, "a", mesh), tm.Dim("v", vocab)),
            lambda: F.one_hot(ids, vocab).float(),
            ["v", "a", str(vocab), "one_hot"],
        )
    else:
        table = torch.randn(vocab, 3)
        judge(
            "embedding",
            lambda: tm.embedding(tm.distribute(ids, "a", mesh), tm.distribute(table, "v d", mesh), "v"),
            lambda: F.embedding(ids, table),
            ["v", "a", "d", str(vocab), "embedding"],
        )


@given(mesh=meshes(), data=st.data(), k=ints, op=st.sampled_from(["top_k", "cumsum", "argmax"]))
@FUZZ
def test_selection_and_scan(mesh, data, k, op):
    x, t, names = data.draw(tensors(mesh))
    dim = data.draw(st.sampled_from(names + ("z",)))
    i = names.index(dim) if dim in names else 0
    if dim not in names:
        ref = lambda: 1 / 0
    if op == "top_k":
        run = lambda: tm.top_k(x, dim, k, new_dim="kk")[0]
        if dim in names:
            ref = lambda: torch.topk(t, _int(k), i).values.movedim(i, -1)

        def compare(got, want):
            torch.testing.assert_close(got.full(), want.movedim(-1, got.dims.index("kk")))
    elif op == "cumsum":
        run, compare = (lambda: tm.cumsum(x, dim)), None
        if dim in names:
            ref = lambda: torch.cumsum(t, i)
    else:
        run, compare = (lambda: tm.argmax(x, dim)), None
        if dim in names:
            ref = lambda: torch.argmax(t, i)
    judge(f"{op}({dim!r}, {k!r})", run, ref, [dim, k, op, *names], compare=compare)


@given(
    mesh=meshes(),
    data=st.data(),
    p=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.just("0.5"),
        st.just(None),
        st.just(np.float32(0.25)),
        st.sampled_from([0.0, 1.0, -0.1, 1.1]),
    ),
)
@SMALL
def test_dropout(mesh, data, p):
    x, t, names = data.draw(tensors(mesh))

    def compare(got, want):
        kept = got.full() != 0
        torch.testing.assert_close(got.full()[kept], want[kept])

    def ref():  # torch's checks of p; the kept elements scaled by 1 / (1 - p)
        F.dropout(t, p=p)
        return t / (1 - p) if p < 1 else t * 0

    judge(f"dropout(p={p!r})", lambda: tm.dropout(x, p, seed=0), ref, ["p", str(p)], compare=compare)


# ---- checkpoints -----------------------------------------------------------------------------


@st.composite
def checkpoint_paths(draw, root: Path):
    kind = draw(st.sampled_from(["plain", "nested", "under_a_file", "a_file", "empty", "odd_name", "dot"]))
    if kind == "plain":
        return root / "ckpt"
    if kind == "nested":
        return root / "x" / "y" / "ckpt"
    if kind == "under_a_file":
        (root / "file").write_text("x")
        return root / "file" / "ckpt"
    if kind == "a_file":
        (root / "file").write_text("x")
        return root / "file"
    if kind == "empty":
        return ""
    if kind == "dot":
        return root / "."
    return root / draw(st.text(alphabet="abé -_.:", min_size=1, max_size=6)).replace(".", "d")


@given(
    data=st.data(),
    step=st.one_of(st.integers(-3, 10**12), st.just(np.int64(3)), st.just(2.0), st.just("3"), st.just(True), st.none()),
    extra=st.one_of(
        st.none(),
        st.just({"pos": 3}),
        st.just({1: 2}),
        st.just({"t": torch.ones(2)}),
        st.just({"f": print}),
        st.just({"n": float("nan")}),
    ),
)
@settings(FUZZ, max_examples=20)
def test_save_and_load_paths(tmp_path_factory, data, step, extra):
    root = tmp_path_factory.mktemp("ck")
    path = data.draw(checkpoint_paths(root))
    mesh = mesh_of("tp:2", "ff:tp")
    model = tm.nn.Module()
    model.w = tm.randn("d:3 ff:5", mesh, seed=0)
    saved = judge(
        f"save({str(path)!r}, step={step!r})",
        lambda: tm.save(path, model, step=step, extra=extra),
        None,
        [str(path), repr(step), "step", "extra", *(extra or {})],
    )
    if isinstance(saved, Exception):
        assert not list(root.rglob("*.partial")), "a refused save left a .partial directory"
        return
    other = tm.nn.Module()
    other.w = tm.zeros("d:3 ff:5", mesh_of("dp:2", "d:dp"))
    loaded = judge("load", lambda: tm.load(saved, other), None, [str(saved)])
    assert loaded.step == (None if step is None else int(step))
    assert torch.equal(other.w.full(), model.w.full())
    assert tm.latest_checkpoint(Path(saved).parent) is not None


@given(
    marker=st.one_of(
        st.binary(max_size=20),
        st.sampled_from(
            [
                b"{}",
                b"[]",
                b'{"files": 3}',
                b'{"files": {}, "step": "x"}',
                b'{"files": {"../x": {"bytes": 1, "crc32": 1}}}',
            ]
        ),
    ),
    as_dir=st.booleans(),
)
@settings(FUZZ, max_examples=20)
def test_latest_checkpoint_skips_a_malformed_marker(tmp_path_factory, marker, as_dir):
    root = tmp_path_factory.mktemp("latest")
    mesh = mesh_of("tp:2", "ff:tp")
    model = tm.nn.Module()
    model.w = tm.randn("d:3 ff:5", mesh, seed=0)
    good = tm.save(root / "good", model, step=1)
    bad = root / "bad" / "torchmesh-complete.json"
    bad.parent.mkdir()
    if as_dir:
        bad.mkdir()
    else:
        bad.write_bytes(marker)
    assert judge("latest_checkpoint", lambda: tm.latest_checkpoint(root), None, [str(root)]) == good
    judge("load", lambda: tm.load(bad.parent, model), None, [str(bad.parent)])


@given(plant=st.sampled_from(["symlink_to_file", "symlink_to_dir", "dangling", "dir", "none"]))
@settings(FUZZ, max_examples=5)
def test_export_never_follows_a_planted_tmp(tmp_path_factory, plant):
    root = tmp_path_factory.mktemp("export")
    victim = root / "victim.txt"
    victim.write_text("keep me")
    path = root / "model.pt"
    tmp = root / "model.pt.tmp"
    if plant == "symlink_to_file":
        tmp.symlink_to(victim)
    elif plant == "symlink_to_dir":
        tmp.symlink_to(root)
    elif plant == "dangling":
        tmp.symlink_to(root / "nowhere")
    elif plant == "dir":
        tmp.mkdir()
    model = tm.nn.Module()
    model.w = tm.randn("d:3 ff:5", mesh_of("tp:2", "ff:tp"), seed=0)
    judge("export_state_dict", lambda: tm.export_state_dict(path, model), None, [str(path), str(tmp)])
    assert victim.read_text() == "keep me"
    assert not (root / "nowhere").exists()


# ---- the CLI and the examples: one error line, exit status 2 --------------------------------

CLI_BAD = [
    ["--mesh", "dp:x"],
    ["--mesh", "dp:2", "--experts", "x"],
    ["--mesh", "dp:2", "--top", "-1"],
    ["--mesh", "dp:2", "--batch", "0"],
    ["--mesh", "dp:2", "--seq", "-3"],
    ["--mesh", "dp:2", "--efficiency", "0"],
    ["--mesh", "dp:2", "--params", "0"],
    ["--mesh", "dp:2", "--params=-1B"],
    ["--mesh", "dp:2", "--memory", "0"],
    ["--mesh", "dp:2", "--memory", "1e999GB"],
    ["--mesh", "dp:2", "--roles", "x="],
    ["--mesh", "dp:2", "--bandwidth", "dp:0"],
    ["--mesh", "dp:2", "--flops", "0"],
    ["--mesh", "dp:2", "--hardware", "x"],
    ["--model", "os:getcwd", "--mesh", "dp:2"],
    [],
    ["--mesh", "dp:2", "--experts", "-2"],
    ["--mesh", "dp:2", "--optimizer", "x"],
    ["--mesh", "dp:0"],
    ["--mesh", "dp:2", "--no-such-flag"],
]


@pytest.mark.parametrize("args", CLI_BAD, ids=" ".join)
def test_cli_bad_arguments_print_one_line_and_exit_2(capsys, args):
    from torchmesh.planning.cli import main

    FIGURES["inputs"] += 1
    assert main(["plan", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    FIGURES["clear"] += 1


@given(
    text=st.one_of(junk, st.text(max_size=8)), parser=st.sampled_from(["count", "bytes", "bandwidths", "roles", "mesh"])
)
@FUZZ
def test_cli_value_parsers(text, parser):
    from torchmesh.planning import cli

    fn = {
        "count": cli.parse_count,
        "bytes": cli.parse_bytes,
        "bandwidths": cli.parse_bandwidths,
        "roles": cli.parse_roles,
        "mesh": tm.MeshShape.parse,
    }[parser]
    judge(f"{parser}({text!r})", lambda: fn(text), None, [text])


EXAMPLES_BAD = [
    ["train_lm.py", "--steps", "x"],
    ["train_lm.py", "--mesh", "dp:x"],
    ["train_lm.py", "--heads", "3"],
    ["train_moe.py", "--top-k", "5"],
    ["mlp_sim.py", "--mesh", "dp"],
    ["train_lm.py", "--dropout", "nan"],
]


def test_examples_bad_arguments_print_one_line_and_exit_2():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1] / "examples"
    runs = [
        (
            args,
            subprocess.Popen(
                [sys.executable, *args], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ),
        )
        for args in EXAMPLES_BAD
    ]
    for args, proc in runs:
        out, err = proc.communicate(timeout=300)
        FIGURES["inputs"] += 1
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        FIGURES["clear"] += 1


@given(
    error=st.sampled_from(
        [OSError(28, "No space left on device"), PermissionError(13, "Permission denied"), RuntimeError("disk gone")]
    )
)
@settings(FUZZ, max_examples=3)
def test_a_failing_write_is_a_checkpoint_error_not_a_base_exception(tmp_path_factory, error):
    """DCP raises a write failure as CheckpointException, a BaseException that `except Exception`
    misses; tm.save raises CheckpointError instead, and the failed save is never the newest."""
    from unittest import mock

    import torch.distributed.checkpoint as dcp

    root = tmp_path_factory.mktemp("full")
    model = tm.nn.Module()
    model.w = tm.randn("d:3 ff:5", mesh_of("tp:2", "ff:tp"), seed=0)
    good = tm.save(root / "good", model, step=1)

    def fail(self, plan, planner):
        raise error

    with mock.patch.object(dcp.FileSystemWriter, "write_data", fail):
        judge("save", lambda: tm.save(root / "next", model, step=2), lambda: 1 / 0, [str(root / "next"), str(error)])
    assert tm.latest_checkpoint(root) == good


# ---- rename, elementwise by name, split, cast, Mesh options ----------------------------------


def _compare_pieces(got: list, want: tuple) -> None:
    """A list of MeshTensors (split, unstack) against torch's pieces."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.full(), w)


@given(
    mesh=meshes(),
    data=st.data(),
    op=st.sampled_from(["rename", "add", "mul_other_mesh", "split", "cast", "where", "mesh_option", "unstack"]),
    arg=st.one_of(
        st.sampled_from(NAMES + ("z",)),
        st.integers(-2, 6),
        st.lists(st.integers(-1, 4), max_size=3),
        st.just(torch.float64),
        st.just("float"),
        st.none(),
    ),
)
@FUZZ
def test_names_and_elementwise(mesh, data, op, arg):
    x, t, names = data.draw(tensors(mesh))
    dim = data.draw(st.sampled_from(names))
    i = names.index(dim)
    ref: Callable[[], object] | None = None
    compare = None
    if op == "rename":
        run = lambda: x.rename(**{dim: arg})
        ref = lambda: t if isinstance(arg, str) and (arg == dim or arg not in names) else 1 / 0
    elif op in ("add", "mul_other_mesh", "where"):
        other_names = tuple(data.draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True)))
        sizes = {n: x.sizes.get(n, data.draw(st.integers(0, 3))) for n in other_names}
        if data.draw(st.booleans()):
            sizes[other_names[0]] += 1
        u = torch.randn([sizes[n] for n in other_names])
        other = mesh_of(str(mesh.shape), "") if op == "mul_other_mesh" else x.mesh
        out_names = names + tuple(n for n in other_names if n not in names)

        def ref():
            a = t.reshape(t.shape + (1,) * (len(out_names) - len(names)))
            b = u.permute([other_names.index(n) for n in out_names if n in other_names])
            b = b.reshape([sizes[n] if n in other_names else 1 for n in out_names])
            return torch.where(a > 0, a, b) if op == "where" else (a * b if op == "mul_other_mesh" else a + b)

        def run():
            y = tm.distribute(u, " ".join(other_names), other)
            return tm.where(x > 0, x, y) if op == "where" else (x * y if op == "mul_other_mesh" else x + y)

        def compare(got, want):
            torch.testing.assert_close(got.full().permute([got.dims.index(n) for n in out_names]), want)
    elif op == "split":
        run = lambda: tm.split(x, dim, arg)

        def ref():
            if (
                isinstance(arg, bool)
                or not isinstance(arg, (int, list))
                or (isinstance(arg, list) and sum(arg) != t.shape[i])
            ):
                raise ValueError(arg)
            if (isinstance(arg, int) and arg <= 0) or (isinstance(arg, list) and any(a < 0 for a in arg)):
                raise ValueError(arg)
            return torch.split(t, arg, i)

        compare = _compare_pieces
    elif op == "unstack":
        run = lambda: tm.unstack(x, arg)
        ref = lambda: torch.unbind(t, names.index(arg)) if arg in names else 1 / 0
        compare = _compare_pieces
    elif op == "cast":
        run = lambda: tm.cast(x, arg)
        ref = lambda: t.to(arg) if isinstance(arg, torch.dtype) else 1 / 0
    else:
        run = lambda: tm.Mesh("dp:2", backend="sim", **{str(arg): 1})
    judge(f"{op}({arg!r})", run, ref, [arg, dim, op, "mesh", *names], compare=compare)
