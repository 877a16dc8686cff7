"""Torch habits on MeshTensors: torch's elementwise functions, torch's spelling of dims
(`dim=`, `keepdim`, `dtype`), and the TypeErrors that point positional habits (`x.sum(-1)`,
`x[0]`, `x.view`, `torch.matmul`) to the named way.

Every elementwise function of `torchmesh.tensor.elementwise`'s tables runs against plain torch,
forward and backward, on the meshes of `reference.MESHES` with uneven splits (`batch:3 ff:5`,
and `ff:5` over 8 devices, where some blocks are empty); the tables themselves are checked
against torch's `pointwise` op tags in both directions.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from harness import run_distributed
from reference import MESHES, check_op, make_mesh

import torchmesh as tm
from torchmesh.tensor import elementwise as ew

ROOT = Path(__file__).resolve().parents[2]
RULES = "batch:dp;ff:tp"
#: The mesh with the most devices (dp:2;tp:4 on sim; the one mesh of a gloo run).
WIDEST = max(MESHES, key=lambda spec: math.prod(int(p.split(":")[1]) for p in spec.split(";")))


# ---- inputs -------------------------------------------------------------------------------------
def values(domain: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Inputs inside each function's domain (and, for the predicates, some non-finite ones)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g)
    if domain == "int":
        return torch.randint(0, 8, shape, generator=g)
    if domain == "nonfinite":
        t = torch.randn(shape, generator=g)
        t.view(-1)[::3] = float("inf")
        t.view(-1)[1::4] = -float("inf")
        t.view(-1)[2::5] = float("nan")
        return t
    return {
        "real": lambda: torch.randn(shape, generator=g),
        "pos": lambda: u * 2 + 0.6,
        "unit": lambda: u * 1.6 - 0.8,
        "prob": lambda: u * 0.8 + 0.1,
        "ge1": lambda: u * 2 + 1.1,
    }[domain]()


def U(*args, **kwargs):
    """f(x, *args, **kwargs): one tensor."""
    return lambda f, x, b: f(x, *args, **kwargs)


def B(*args, **kwargs):
    """f(x, b, *args, **kwargs): b (dims `ff`) is broadcast against x (dims `batch ff`)."""
    return lambda f, x, b: f(x, b, *args, **kwargs)


def first(*args):
    """f(*args, x): the tensor after a number (torch.polygamma(1, x))."""
    return lambda f, x, b: f(*args, x)


NO_GRAD = False
#: One case per function of the tables: (call, domain, whether torch differentiates it).
CASES: dict[str, tuple] = {
    # torch: one tensor
    **{
        f"torch.{n}": (U(), "real", True)
        for n in """abs absolute angle asinh arcsinh atan arctan ceil clone
        conj_physical cos cosh deg2rad erf erfc exp exp2 expm1 fix floor frac i0 neg negative positive
        rad2deg sgn sign sin sinc sinh square tanh trunc relu sigmoid selu""".split()
    },
    **{f"torch.{n}": (U(), "unit", True) for n in "acos arccos asin arcsin atanh arctanh erfinv tan".split()},
    **{f"torch.{n}": (U(), "pos", True) for n in "digamma lgamma log log10 log1p log2 reciprocal rsqrt sqrt".split()},
    **{f"torch.{n}": (U(), "ge1", True) for n in "acosh arccosh".split()},
    "torch.logit": (U(eps=1e-6), "prob", True),
    "torch.mvlgamma": (U(p=2), "pos", True),
    "torch.polygamma": (first(1), "pos", True),
    "torch.round": (U(decimals=1), "real", True),
    "torch.nan_to_num": (U(nan=0.0, posinf=3.0, neginf=-3.0), "nonfinite", True),
    "torch.celu": (U(alpha=0.7), "real", True),
    "torch.hardshrink": (U(lambd=0.3), "real", True),
    "torch.threshold": (U(0.1, 2.0), "real", True),
    **{f"torch.{n}": (U(), "nonfinite", NO_GRAD) for n in "isfinite isinf isnan isneginf isposinf".split()},
    **{f"torch.{n}": (U(), "real", NO_GRAD) for n in "isreal logical_not signbit".split()},
    "torch.bitwise_not": (U(), "int", NO_GRAD),
    "torch.clamp": (U(-0.5, 0.7), "real", True),
    "torch.clip": (U(min=-0.5, max=0.7), "real", True),
    "torch.clamp_min": (U(0.1), "real", True),
    "torch.clamp_max": (U(0.1), "real", True),
    # torch: two or more tensors (b broadcast by name), keywords passed through
    "torch.add": (B(alpha=2.0), "real", True),
    "torch.sub": (B(alpha=0.5), "real", True),
    **{
        f"torch.{n}": (B(), "real", True)
        for n in """subtract rsub mul multiply atan2 arctan2 hypot copysign
        ldexp logaddexp logaddexp2 maximum minimum fmax fmin""".split()
    },
    **{f"torch.{n}": (B(), "pos", True) for n in "div true_divide remainder fmod pow float_power xlogy".split()},
    "torch.divide": (B(rounding_mode="floor"), "pos", True),
    **{f"torch.{n}": (B(), "pos", NO_GRAD) for n in "floor_divide igamma igammac".split()},
    **{
        f"torch.{n}": (B(), "real", NO_GRAD)
        for n in """nextafter heaviside eq ne not_equal lt less le less_equal
        gt greater ge greater_equal isclose logical_and logical_or logical_xor""".split()
    },
    **{
        f"torch.{n}": (B(), "int", NO_GRAD)
        for n in """gcd lcm bitwise_and bitwise_or bitwise_xor
        bitwise_left_shift bitwise_right_shift""".split()
    },
    "torch.lerp": (B(0.3), "real", True),
    "torch.addcmul": (lambda f, x, b: f(x, b, x, value=0.5), "real", True),
    "torch.addcdiv": (lambda f, x, b: f(x, b, x * x + 1, value=0.5), "real", True),
    "torch.masked_fill": (lambda f, x, b: f(x, x > 0, 0.5), "real", True),
    # torch.nn.functional
    **{
        f"F.{n}": (U(), "real", True)
        for n in """relu relu6 selu silu mish hardswish hardsigmoid logsigmoid
        softsign tanhshrink sigmoid tanh""".split()
    },
    "F.elu": (U(alpha=0.5), "real", True),
    "F.celu": (U(alpha=0.7), "real", True),
    "F.gelu": (U(approximate="tanh"), "real", True),
    "F.hardtanh": (U(-0.5, 0.5), "real", True),
    "F.leaky_relu": (U(0.2), "real", True),
    "F.softplus": (U(beta=2.0, threshold=5.0), "real", True),
    "F.softshrink": (U(0.3), "real", True),
    "F.hardshrink": (U(0.3), "real", True),
    "F.threshold": (U(0.1, 2.0), "real", True),
    # torch.special
    **{
        f"torch.special.{n}": (U(), "real", True)
        for n in """erf erfc erfcx exp2 expit expm1 i0 i0e i1 i1e
        log_ndtr ndtr round sinc""".split()
    },
    **{f"torch.special.{n}": (U(), "pos", True) for n in "digamma entr gammaln log1p psi".split()},
    "torch.special.erfinv": (U(), "unit", True),
    "torch.special.logit": (U(), "prob", True),
    "torch.special.ndtri": (U(), "prob", True),
    "torch.special.multigammaln": (U(2), "pos", True),
    "torch.special.polygamma": (first(1), "pos", True),
    **{f"torch.special.{n}": (B(), "pos", True) for n in "xlog1py xlogy".split()},
    **{f"torch.special.{n}": (B(), "pos", NO_GRAD) for n in "gammainc gammaincc".split()},
    "torch.special.zeta": (B(), "ge1", NO_GRAD),
    **{
        f"torch.special.{n}": (U(), "real", NO_GRAD)
        for n in """airy_ai bessel_j0 bessel_j1 modified_bessel_i0
        modified_bessel_i1 spherical_bessel_j0""".split()
    },
    **{
        f"torch.special.{n}": (U(), "pos", NO_GRAD)
        for n in """bessel_y0 bessel_y1 modified_bessel_k0
        modified_bessel_k1 scaled_modified_bessel_k0 scaled_modified_bessel_k1""".split()
    },
    **{
        f"torch.special.{n}": (U(3), "real", NO_GRAD)
        for n in """chebyshev_polynomial_t chebyshev_polynomial_u
        chebyshev_polynomial_v chebyshev_polynomial_w shifted_chebyshev_polynomial_t shifted_chebyshev_polynomial_u
        shifted_chebyshev_polynomial_v shifted_chebyshev_polynomial_w hermite_polynomial_h hermite_polynomial_he
        laguerre_polynomial_l legendre_polynomial_p""".split()
    },
}
FUNCTIONS = {
    f"{prefix}.{name}": getattr(module, name)
    for prefix, (module, names) in ew.ELEMENTWISE_NAMESPACES.items()
    for name in names
}


def run_elementwise(name: str, mesh: tm.Mesh, x_dims: str, b_dims: str, seed: int = 0) -> None:
    call, domain, grad = CASES[name]
    f = FUNCTIONS[name]
    x_sizes = tuple(int(t.split(":")[1]) for t in x_dims.split())
    b_sizes = tuple(int(t.split(":")[1]) for t in b_dims.split())
    names = lambda dims: " ".join(t.split(":")[0] for t in dims.split())
    spec = {
        "x": (names(x_dims), values(domain, x_sizes, seed)),
        "b": (names(b_dims), values(domain, b_sizes, seed + 1)),
    }
    check_op(mesh, spec, lambda x, b: call(f, x, b), lambda x, b: call(f, x, b), names(x_dims), grad=grad)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_elementwise_function_matches_torch(name, mesh_spec):
    """batch:3 ff:5 under batch:dp;ff:tp: blocks of 2 and 1 rows, of 3 and 2 (or 2, 1, 1, 1) columns."""
    run_elementwise(name, make_mesh(mesh_spec, RULES), "batch:3 ff:5", "ff:5")


@pytest.mark.parametrize("name", sorted(CASES))
def test_elementwise_function_with_empty_blocks(name):
    """ff:5 split over every axis of the widest mesh (8 blocks on dp:2;tp:4: three are empty)."""
    run_elementwise(name, make_mesh(WIDEST, "ff:dp,tp"), "batch:2 ff:5", "ff:5", seed=7)


def test_every_table_entry_has_a_case():
    assert set(CASES) == set(FUNCTIONS), set(CASES) ^ set(FUNCTIONS)
    assert set(ew.ELEMENTWISE) == set(FUNCTIONS.values())  # what __torch_function__ dispatches on


# ---- the tables against torch's own pointwise tags ---------------------------------------------------
#: Functions torch tags `pointwise` that are not elementwise functions of MeshTensors, and why.
TAGGED_BUT_NOT_HERE = {
    "torch.equal": "returns a Python bool: bool((x == y).all())",
    "torch.frexp": "returns two tensors (mantissa, exponent)",
    "torch.max": "a reduction; torch.max(x) and torch.max(x, y) are handled as such",
    "torch.min": "a reduction; torch.min(x) and torch.min(x, y) are handled as such",
    "torch.where": "tm.where (three tensors, handled on its own)",
    "torch.rrelu": "random slopes in training: refused, pointing to tm.dropout",
    "F.rrelu": "random slopes in training: refused, pointing to tm.dropout",
}
#: Table entries torch does not tag (aliases and composites of tagged ops).
ALIASES = set(
    """torch.absolute torch.arccos torch.arccosh torch.arcsin torch.arcsinh torch.arctan torch.arctan2
    torch.arctanh torch.fix torch.negative torch.subtract torch.multiply torch.divide torch.greater
    torch.greater_equal torch.less torch.less_equal torch.not_equal torch.floor_divide torch.isclose torch.isreal
    F.leaky_relu F.logsigmoid F.threshold F.hardswish F.hardsigmoid F.softsign F.tanhshrink F.sigmoid F.tanh
    torch.special.digamma torch.special.erf torch.special.erfc torch.special.erfinv torch.special.exp2
    torch.special.expit torch.special.expm1 torch.special.gammainc torch.special.gammaincc torch.special.gammaln
    torch.special.i0 torch.special.log1p torch.special.logit torch.special.multigammaln torch.special.ndtr
    torch.special.polygamma torch.special.psi torch.special.round torch.special.sinc torch.special.xlogy""".split()
)


def _tagged(aten_name: str) -> bool:
    packet = getattr(torch.ops.aten, aten_name, None)
    if packet is None:
        return False
    return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())


def _pointwise_functions() -> set[str]:
    """Every public function of torch, F and torch.special whose aten op torch tags pointwise."""
    found = set()
    prefixes = {torch: "torch", F: "F", torch.special: "torch.special"}
    for namespace, fns in torch.overrides.get_overridable_functions().items():
        prefix = prefixes.get(namespace)
        for fn in fns if prefix else ():
            name = getattr(fn, "__name__", "")
            if not name or name.startswith("_") or name.endswith("_"):
                continue
            short = name.removeprefix("special_")
            if _tagged(name) or _tagged(short):
                found.add(f"{prefix}.{short}")
    return found


def test_every_pointwise_torch_function_is_in_the_tables_or_explained():
    missing = _pointwise_functions() - set(FUNCTIONS) - set(TAGGED_BUT_NOT_HERE)
    assert not missing, f"torch tags these pointwise; add them to torchmesh/tensor/elementwise.py: {sorted(missing)}"


def test_every_table_entry_is_pointwise_in_torch_or_an_alias():
    tagged = _pointwise_functions()
    untagged = set(FUNCTIONS) - tagged - ALIASES
    assert not untagged, f"not tagged pointwise by torch and not a known alias: {sorted(untagged)}"
    assert ALIASES <= set(FUNCTIONS)


def test_tutorial_lists_exactly_the_tables():
    text = (ROOT / "docs/tutorial.md").read_text()
    assert "## Torch functions and torch habits" in text  # where tm.errors.TORCH_TABLE points
    for prefix, (_, names) in ew.ELEMENTWISE_NAMESPACES.items():
        title = {
            "torch": r"`torch\.\*`, also methods",
            "F": r"`torch\.nn\.functional\.\*`",
            "torch.special": r"`torch\.special\.\*`",
        }[prefix]
        line = re.search(rf"^- {title}[^:]*: (.*)\.$", text, re.M)
        assert line, f"no list of {prefix} functions in docs/tutorial.md"
        assert set(line.group(1).split(", ")) == set(names), prefix


def test_methods_of_every_torch_entry():
    """x.erf(), x.clamp_min(0.1), x.add(b, alpha=2): torch's names are MeshTensor methods too."""
    for name in ew.TORCH_ELEMENTWISE:
        assert callable(getattr(tm.MeshTensor, name)), name
    mesh = make_mesh(MESHES[-1], RULES)
    cases = {
        "erf": (lambda x, b: x.erf(), lambda x, b: x.erf()),
        "clamp_min": (lambda x, b: x.clamp_min(0.1), lambda x, b: x.clamp_min(0.1)),
        "add_alpha": (lambda x, b: x.add(b, alpha=2.0), lambda x, b: x.add(b, alpha=2.0)),
        "gelu": (lambda x, b: x.gelu(approximate="tanh"), lambda x, b: F.gelu(x, approximate="tanh")),
        "where": (lambda x, b: x.where(x > 0, b), lambda x, b: x.where(x > 0, b)),
        "masked_fill": (lambda x, b: x.masked_fill(b > 0, 0.0), lambda x, b: x.masked_fill(b > 0, 0.0)),
        "neg_abs": (lambda x, b: -abs(x) + (+b), lambda x, b: -abs(x) + (+b)),
    }
    for mesh_fn, torch_fn in cases.values():
        check_op(mesh, {"x": "batch:3 ff:5", "b": "ff:5"}, mesh_fn, torch_fn, "batch ff")


# ---- torch's spelling of dims ------------------------------------------------------------------------
REDUCTIONS = {
    "x.sum(dim=)": (lambda x: x.sum(dim="ff"), lambda x: x.sum(dim=-1), "batch"),
    "x.sum(dim=, keepdim=False, dtype=)": (
        lambda x: x.sum(dim="batch", keepdim=False, dtype=torch.float64),
        lambda x: x.sum(dim=0, dtype=torch.float64),
        "ff",
    ),
    "x.mean(dim=)": (lambda x: x.mean(dim="ff"), lambda x: x.mean(dim=-1), "batch"),
    "x.max(dim=)": (lambda x: x.max(dim="ff"), lambda x: x.amax(dim=-1), "batch"),
    "x.min(dim=both)": (lambda x: x.min(dim=("batch", "ff")), lambda x: x.amin(dim=(0, 1)), ""),
    "x.amax(dim=)": (lambda x: x.amax(dim="batch"), lambda x: x.amax(dim=0), "ff"),
    "x.logsumexp(dim=)": (lambda x: x.logsumexp(dim="ff"), lambda x: x.logsumexp(dim=-1), "batch"),
    "x.softmax(dim=)": (lambda x: x.softmax(dim="ff"), lambda x: x.softmax(dim=-1), "batch ff"),
    "x.log_softmax(dim=, dtype=)": (
        lambda x: x.log_softmax(dim="ff", dtype=torch.float64),
        lambda x: x.log_softmax(dim=-1, dtype=torch.float64),
        "batch ff",
    ),
    "torch.sum(x, dim=, keepdim=False)": (
        lambda x: torch.sum(x, dim="batch", keepdim=False),
        lambda x: torch.sum(x, dim=0),
        "ff",
    ),
    "torch.sum(x, name, False, dtype=)": (
        lambda x: torch.sum(x, "batch ff", False, dtype=torch.float64),
        lambda x: torch.sum(x, (0, 1), dtype=torch.float64),
        "",
    ),
    "torch.mean(x, name)": (lambda x: torch.mean(x, "ff"), lambda x: torch.mean(x, -1), "batch"),
    "x.amin(dim=)": (lambda x: x.amin(dim="batch"), lambda x: x.amin(dim=0), "ff"),
    "torch.logsumexp(x, dim=)": (lambda x: torch.logsumexp(x, dim="ff"), lambda x: torch.logsumexp(x, dim=-1), "batch"),
    "torch.softmax(x, dim=)": (lambda x: torch.softmax(x, dim="ff"), lambda x: torch.softmax(x, dim=-1), "batch ff"),
    "torch.softmax(x, name, dtype=)": (
        lambda x: torch.softmax(x, "ff", dtype=torch.float64),
        lambda x: torch.softmax(x, -1, dtype=torch.float64),
        "batch ff",
    ),
    "F.softmax(x, dim=)": (lambda x: F.softmax(x, dim="batch"), lambda x: F.softmax(x, dim=0), "batch ff"),
    "F.log_softmax(x, dim=, dtype=)": (
        lambda x: F.log_softmax(x, dim="ff", dtype=torch.float64),
        lambda x: F.log_softmax(x, dim=-1, dtype=torch.float64),
        "batch ff",
    ),
    "tm.reduce_sum(x, dim=)": (lambda x: tm.reduce_sum(x, dim="ff"), lambda x: x.sum(-1), "batch"),
    "tm.reduce_max(x, dim=, keepdim=False)": (
        lambda x: tm.reduce_max(x, dim="ff", keepdim=False),
        lambda x: x.amax(-1),
        "batch",
    ),
    "tm.softmax(x, dim=)": (lambda x: tm.softmax(x, dim="ff"), lambda x: x.softmax(-1), "batch ff"),
    "tm.logsumexp(x, dim=)": (lambda x: tm.logsumexp(x, dim="batch"), lambda x: x.logsumexp(0), "ff"),
    "torch.max(x)": (lambda x: torch.max(x), lambda x: torch.max(x), ""),
    "torch.min(x)": (lambda x: torch.min(x), lambda x: torch.min(x), ""),
}


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case", list(REDUCTIONS))
def test_torch_spelling_of_dims(case, mesh_spec):
    mesh_fn, torch_fn, out = REDUCTIONS[case]
    check_op(make_mesh(mesh_spec, RULES), {"x": "batch:3 ff:5"}, mesh_fn, torch_fn, out)


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_torch_max_of_two_tensors_and_any_all_by_dim(mesh_spec):
    mesh = make_mesh(mesh_spec, RULES)
    spec = {"x": "batch:3 ff:5", "b": "ff:5"}
    check_op(
        mesh,
        spec,
        lambda x, b: torch.max(x, b) + torch.min(b, x),
        lambda x, b: torch.max(x, b) + torch.min(b, x),
        "batch ff",
    )
    check_op(
        mesh, spec, lambda x, b: torch.any(x > b, dim="ff"), lambda x, b: torch.any(x > b, dim=-1), "batch", grad=False
    )
    check_op(
        mesh,
        spec,
        lambda x, b: (x > b).all(dim="batch", keepdim=False),
        lambda x, b: (x > b).all(dim=0),
        "ff",
        grad=False,
    )


# ---- errors that show the named way ---------------------------------------------------------------------
def sim_x() -> tm.MeshTensor:
    return tm.randn("batch:3 ff:5", tm.Mesh("dp:2;tp:2", rules=RULES), seed=0)


def test_positional_dim_error_text():
    with pytest.raises(TypeError) as info:
        sim_x().sum(-1)
    assert str(info.value) == (
        "x.sum(-1): dims are named, not numbered; this tensor's dims are (batch, ff). "
        "Fix: name the dim, x.sum('ff') (or dim='ff')."
    )


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: x.mean(0), r"x\.mean\(0\): .* dims are \(batch, ff\)\. Fix: name the dim, x\.mean\('batch'\)"),
        (lambda x: x.max(dim=-1), r"x\.max\(-1\): .*x\.max\('ff'\)"),
        (lambda x: x.sum((0, 1)), r"x\.sum\(\(0, 1\)\): .*x\.sum\('batch ff'\)"),
        (lambda x: torch.softmax(x, dim=-1), r"x\.softmax\(-1\): .*x\.softmax\('ff'\) \(or dim='ff'\)"),
        (lambda x: F.log_softmax(x, -1), r"x\.log_softmax\(-1\): .*'ff'"),
        (lambda x: torch.sum(x, -1), r"x\.sum\(-1\): .*x\.sum\('ff'\)"),
        (lambda x: torch.logsumexp(x, 1), r"x\.logsumexp\(1\): .*'ff'"),
        (lambda x: tm.softmax(x, 1), r"x\.softmax\(1\): .*'ff'"),
        (lambda x: torch.max(x, -1), r"x\.max\(-1\): .*'ff'"),
        (
            lambda x: torch.max(x, "ff"),
            r"torch\.max\(x, dim\) returns \(values, indices\).*x\.max\('ff'\).*tm\.argmax\(x, 'ff'\)",
        ),
        (
            lambda x: x.sum("ff", keepdim=True),
            (
                r"x\.sum\(\.\.\., keepdim=True\): a MeshTensor keeps no reduced dim of size 1, because dims broadcast by "
                r"name: x - x\.sum\('ff'\) already lines up .* Fix: drop keepdim \(keepdim=False is accepted\)\."
            ),
        ),
        (lambda x: x.amax("ff", keepdim=True), r"x\.max\(\.\.\., keepdim=True\)"),
        (lambda x: torch.amax(x, -1), r"x\.max\(-1\): .*'ff'"),
        (lambda x: torch.special.softmax(x, -1), r"x\.softmax\(-1\): .*'ff'"),
        (lambda x: x.sum("ff", dim="ff"), r"x\.sum: got the dims twice"),
        (lambda x: x.max(x), r"torch\.maximum\(x, y\)"),
    ],
)
def test_positional_dims_and_keepdim_are_type_errors(call, match):
    with pytest.raises(TypeError, match=match):
        call(sim_x())


def test_positional_habits_error_text():
    with pytest.raises(TypeError) as info:
        sim_x()[0]
    assert str(info.value) == (
        "x[...] addresses dims by position, but a MeshTensor's dims are named: this one has dims (batch, ff). "
        "Instead: tm.slice(x, 'seq', start, stop) takes a range of a named dim; tm.gather(x, ids, 'vocab') picks "
        "entries by index; tm.where(mask, x, 0) masks."
    )


@pytest.mark.parametrize(
    "call,named",
    [
        (lambda x: x[:, 1:], "tm.slice"),
        (lambda x: x.narrow(0, 0, 1), "tm.slice"),
        (lambda x: x.index_select(0, torch.tensor([0])), "tm.gather"),
        (lambda x: x.__setitem__(0, 1.0), "tm.where"),
        (lambda x: x.view(15), "tm.rearrange"),
        (lambda x: x.reshape(15), "tm.rearrange"),
        (lambda x: x.flatten(), "tm.rearrange"),
        (lambda x: x.T, "x.rename"),
        (lambda x: x.mT, "x.rename"),
        (lambda x: x.transpose(0, 1), "x.rename"),
        (lambda x: x.permute(1, 0), "tm.rearrange"),
        (lambda x: x.unsqueeze(0), "broadcast a missing dim by name"),
        (lambda x: x.squeeze(), "broadcast"),
        (lambda x: x.expand(2, 3, 5), "tm.ones"),
        (lambda x: x @ x, "tm.einsum"),
        (lambda x: x.matmul(x), "tm.einsum"),
        (lambda x: x.topk(2), "tm.top_k"),
        (lambda x: x.sort(), "tm.top_k"),
        (lambda x: x.chunk(2), "tm.split"),
        (lambda x: x.unbind(), "tm.unstack"),
        (lambda x: x.gather(0, torch.tensor([[0]])), "tm.gather"),
        (lambda x: x.tolist(), "x.full"),
        (lambda x: x.std(), r"x.mean\('d'\)"),
    ],
)
def test_positional_methods_name_the_named_way(call, named):
    with pytest.raises(TypeError, match=rf"addresses dims by position, .* dims \(batch, ff\)\. Instead: .*{named}"):
        call(sim_x())


@pytest.mark.parametrize(
    "call,named",
    [
        (lambda x: torch.matmul(x, x), "torch.matmul is not supported on MeshTensors. Instead: tm.einsum"),
        (lambda x: F.linear(x, x), "F.linear is not supported on MeshTensors. Instead: tm.einsum"),
        (lambda x: torch.cat([x, x]), "torch.cat .* tm.concat"),
        (lambda x: torch.stack([x, x]), "torch.stack .* tm.stack"),
        (lambda x: torch.split(x, 2), "torch.split .* tm.split"),
        (lambda x: torch.topk(x, 2), "torch.topk .* tm.top_k"),
        (lambda x: torch.argmax(x), "torch.argmax .* tm.argmax"),
        (lambda x: torch.cumsum(x, 0), "torch.cumsum .* tm.cumsum"),
        (lambda x: torch.gather(x, 0, torch.tensor([[0]])), "torch.gather .* tm.gather"),
        (lambda x: torch.index_select(x, 0, torch.tensor([0])), "torch.index_select .* tm.gather"),
        (lambda x: torch.reshape(x, (15,)), "torch.reshape .* tm.rearrange"),
        (lambda x: torch.transpose(x, 0, 1), "torch.transpose .* tm.rearrange"),
        (lambda x: torch.permute(x, (1, 0)), "torch.permute .* tm.rearrange"),
        (lambda x: F.embedding(x, x), "F.embedding .* tm.embedding"),
        (lambda x: F.scaled_dot_product_attention(x, x, x), "F.scaled_dot_product_attention .* tm.attention"),
        (lambda x: F.dropout(x, 0.1), "F.dropout .* tm.dropout"),
        (lambda x: torch.rand_like(x), "torch.rand_like .* tm.rand"),
        (lambda x: F.rrelu(x), "F.rrelu .* tm.dropout"),
        (lambda x: F.layer_norm(x, (5,)), "tm.nn.LayerNorm"),
        (lambda x: F.cross_entropy(x, x), "tm.nn.cross_entropy"),
        (lambda x: torch.var(x), r"x.mean\('d'\)"),
    ],
)
def test_unsupported_torch_functions_name_the_named_way(call, named):
    with pytest.raises(TypeError, match=named):
        call(sim_x())


def test_other_torch_functions_name_where_the_supported_ones_are_listed():
    with pytest.raises(TypeError) as info:
        torch.prod(sim_x())
    text = str(info.value)
    assert text.startswith("torch.prod is not supported on MeshTensors. What works: torch's elementwise functions")
    assert "docs/tutorial.md, section 'Torch functions and torch habits'" in text
    assert ".py" not in text  # a document, never a source file


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: F.relu(x, inplace=True), r"relu\(\.\.\., inplace=True\): MeshTensors are not modified in place"),
        (lambda x: torch.exp(x, out=torch.empty(3, 5)), r"exp\(\.\.\., out=\): MeshTensors are not modified in place"),
        (lambda x: torch.sum(x, "ff", out=torch.empty(3)), r"torch\.sum\(\.\.\., out=\)"),
    ],
)
def test_in_place_and_out_are_refused(call, match):
    with pytest.raises(TypeError, match=match):
        call(sim_x())


def test_shape_and_size_keep_their_named_meaning():
    x = sim_x()
    assert x.shape[-1] == tm.Dim("ff", 5) and x.size("ff") == 5 and x.sizes == {"batch": 3, "ff": 5}


# ---- tm.nn.shard_parameters refuses a plain torch module --------------------------------------------
def test_shard_parameters_refuses_a_plain_torch_module():
    with pytest.raises(TypeError) as info:
        tm.nn.shard_parameters(torch.nn.Sequential(torch.nn.Linear(4, 4)), "d_model:dp")
    assert str(info.value) == (
        "shard_parameters stores the mesh parameters of tm.nn modules (MeshTensors assigned to a tm.nn.Module) "
        "split by the parameter rules; the model given, a Sequential, has none: its parameters are plain torch "
        "tensors, with no named dims to split. Fix: build the model from tm.nn layers (tm.nn.Linear, "
        "tm.nn.TransformerLM, ...) or assign MeshTensors to a tm.nn.Module; see docs/moe-and-fsdp.md."
    )
    # a plain container of tm.nn layers is fine: its children hold mesh parameters
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp")
    model = torch.nn.Sequential(tm.nn.Linear(mesh, "d_model:8", "ff:16", seed=0))
    assert tm.nn.shard_parameters(model, "d_model:dp") is model


# ---- the same cases on two gloo processes -------------------------------------------------------
GLOO_CASES = (
    "(matches_torch or empty_blocks) and (gelu or addcdiv or xlogy or masked_fill or nan_to_num "
    "or clamp_min or polygamma) or spelling or max_of_two"
)


def _habits_on_ranks(mesh_spec: str) -> tuple[int, str, str]:
    import contextlib
    import io
    import os
    import sys

    os.environ.update(TORCHMESH_TEST_BACKEND="dist", TORCHMESH_TEST_MESHES=mesh_spec)
    for name in ("reference", __name__):  # imported (unpickling this function) before the env was set
        sys.modules.pop(name, None)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pytest.main(["-q", "-p", "no:cacheprovider", "-k", f"({GLOO_CASES}) and not gloo", __file__])
    import reference

    return int(code), out.getvalue()[-3000:], reference.BACKEND


@pytest.mark.timeout(600)
def test_a_sample_on_two_gloo_processes():
    for rank, (code, text, backend) in enumerate(run_distributed(_habits_on_ranks, 2, args=("tp:2",), timeout=500)):
        assert code == 0 and backend == "dist", f"rank {rank} ({backend}): pytest exit {code}\n{text}"
        assert " passed" in text.splitlines()[-1], text
