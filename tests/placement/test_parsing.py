"""Parsing of meshes, layout rules, dims, einsum equations and rearrange patterns.

Any string gives a value or a torchmesh error (a ValueError), never another exception;
valid specs survive a round trip through `str`; the value types are frozen and hashable.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchmesh as tm
from torchmesh.comm.stats import CommRecord
from torchmesh.placement.dims import Dim, dim_names, dims_str, parse_dims, parse_names
from torchmesh.placement.layout import TensorLayout
from torchmesh.placement.plan import AllToAll, Gather, Slice
from torchmesh.tensor.einsum import parse_equation

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))

NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,5}", fullmatch=True)
SPACE = st.sampled_from(["", " ", "  ", "\t"])
# Fragments of every grammar, glued at random: mostly-valid text with every kind of slip.
TOKENS = st.sampled_from(
    [
        "dp",
        "tp",
        "fsdp",
        "batch",
        "d",
        "ff",
        "heads",
        "dh",
        "a",
        "b",
        "_x",
        "1a",
        ":",
        ";",
        ",",
        " ",
        "  ",
        "\t",
        "\n",
        "->",
        "-",
        ">",
        "(",
        ")",
        "...",
        "=",
        "0",
        "1",
        "2",
        "4",
        "-1",
        "2.0",
        "\u00b2",
        "\u0663",
        "\u00e9",
        "\x00",
    ]
)
GRAMMAR_TEXT = st.lists(TOKENS, max_size=14).map("".join)
ANY_TEXT = st.one_of(st.text(), st.text(alphabet="ab:;, ->()\n2\u00b2"), GRAMMAR_TEXT)


def parses_or_raises(parse, text):
    """parse(text), or None when it raised a torchmesh error; anything else fails the test."""
    try:
        return parse(text)
    except ValueError as e:
        assert isinstance(e, tm.TorchMeshError), f"{parse.__name__}({text!r}) raised a bare {e!r}"
        return None


# ---- any string: a value or a ValueError ---------------------------------------------------------


@FUZZ
@given(ANY_TEXT)
def test_mesh_shape_parse_any_text(text):
    mesh = parses_or_raises(tm.MeshShape.parse, text)
    if mesh is not None:
        assert isinstance(mesh, tm.MeshShape)
        assert all(size >= 1 for size in mesh.sizes)
        assert tm.MeshShape.parse(str(mesh)) == mesh


@FUZZ
@given(ANY_TEXT)
def test_layout_rules_parse_any_text(text):
    rules = parses_or_raises(tm.LayoutRules.parse, text)
    if rules is not None:
        assert isinstance(rules, tm.LayoutRules)
        assert tm.LayoutRules.parse(str(rules)) == rules


@FUZZ
@given(ANY_TEXT)
def test_parse_dims_any_text(text):
    dims = parses_or_raises(parse_dims, text)
    if dims is not None:
        assert all(isinstance(d, Dim) for d in dims)
        assert parse_dims(dims_str(dims)) == dims


@FUZZ
@given(ANY_TEXT)
def test_parse_names_any_text(text):
    names = parses_or_raises(parse_names, text)
    if names is not None:
        assert len(set(names)) == len(names)
        assert parse_names(" ".join(names)) == names


@FUZZ
@given(ANY_TEXT)
def test_parse_equation_any_text(text):
    parsed = parses_or_raises(parse_equation, text)
    if parsed is not None:
        operands, out = parsed
        written = ", ".join(" ".join(op) for op in operands)
        if out is not None:
            written += " -> " + " ".join(out)
        assert parse_equation(written) == parsed


_REARRANGE_MESH = tm.Mesh("dp:2", rules="a:dp;c:dp")
_REARRANGE_X = tm.distribute(torch.arange(24).reshape(4, 6), "a b", _REARRANGE_MESH)
REARRANGE_TEXT = st.one_of(
    st.text(alphabet="abcd ()->:_,.1"),
    st.lists(st.sampled_from(["a", "b", "c", "d", "(", ")", " ", "->", ":", "g", "...", "1"]), max_size=14).map(
        "".join
    ),
)


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(REARRANGE_TEXT, st.sampled_from([{}, {"c": 2}, {"c": 3}, {"c": 2, "d": 3}, {"c": 5}]))
def test_rearrange_any_pattern(pattern, sizes):
    out = parses_or_raises(lambda p: tm.rearrange(_REARRANGE_X, p, **sizes), pattern)
    if out is not None:  # a rearrangement only moves values: the result is a permutation of 0..23
        assert out.numel() == 24
        assert torch.equal(out.full().flatten().sort().values, torch.arange(24))


# ---- round trips of valid specs ------------------------------------------------------------------


@st.composite
def mesh_specs(draw):
    names = draw(st.lists(NAME, min_size=0, max_size=4, unique=True))
    sizes = draw(st.lists(st.integers(1, 64), min_size=len(names), max_size=len(names)))
    sep = draw(st.lists(SPACE, min_size=4, max_size=4))
    text = ";".join(f"{sep[0]}{n}{sep[1]}:{sep[2]}{s}{sep[3]}" for n, s in zip(names, sizes))
    return text, tuple(zip(names, sizes))


@st.composite
def rules_specs(draw):
    dims = draw(st.lists(NAME, min_size=0, max_size=4, unique=True))
    axes = [tuple(draw(st.lists(NAME, min_size=1, max_size=3, unique=True))) for _ in dims]
    sep = draw(SPACE)
    text = ";".join(f"{d}{sep}:{sep}" + f",{sep}".join(a) for d, a in zip(dims, axes))
    return text, tuple(zip(dims, axes))


@FUZZ
@given(mesh_specs())
def test_mesh_shape_round_trip(spec):
    text, axes = spec
    mesh = tm.MeshShape.parse(text)
    assert mesh.axes == axes
    assert tm.MeshShape.parse(str(mesh)) == mesh
    assert tm.MeshShape.parse(dict(axes)) == mesh
    assert hash(tm.MeshShape.parse(str(mesh))) == hash(mesh)


@FUZZ
@given(rules_specs())
def test_layout_rules_round_trip(spec):
    text, rules = spec
    parsed = tm.LayoutRules.parse(text)
    assert parsed.rules == rules
    assert tm.LayoutRules.parse(str(parsed)) == parsed
    assert tm.LayoutRules.parse(dict(rules)) == parsed
    for dim, axes in rules:
        assert parsed.axes_of(dim) == axes


@FUZZ
@given(st.lists(st.tuples(NAME, st.integers(0, 99)), max_size=5, unique_by=lambda t: t[0]), SPACE)
def test_dims_round_trip(pairs, sep):
    dims = tuple(Dim(n, s) for n, s in pairs)
    text = (sep + " ").join(f"{n}:{s}" for n, s in pairs)
    assert parse_dims(text) == dims
    assert parse_dims(dims_str(dims)) == dims
    assert parse_dims(dict(pairs)) == dims
    assert parse_dims([n for n, _ in pairs], sizes=dict(pairs)) == dims
    assert parse_names(", ".join(n for n, _ in pairs)) == tuple(n for n, _ in pairs)


@FUZZ
@given(
    st.lists(st.lists(NAME, max_size=3, unique=True), min_size=1, max_size=3),
    st.none() | st.lists(NAME, max_size=3, unique=True),
)
def test_equation_round_trip(operands, out):
    text = " , ".join(" ".join(op) for op in operands) + ("" if out is None else " -> " + " ".join(out))
    assert parse_equation(text) == (tuple(map(tuple, operands)), None if out is None else tuple(out))


# ---- pinned examples ------------------------------------------------------------------------------


def test_parse_examples():
    assert tm.MeshShape.parse("dp:2;tp:4").axes == (("dp", 2), ("tp", 4))
    assert tm.MeshShape.parse(" dp : 2 ; tp:4 ;").axes == (("dp", 2), ("tp", 4))
    assert str(tm.MeshShape.parse("dp:02; tp:4")) == "dp:2;tp:4"
    assert tm.LayoutRules.parse("batch:dp,fsdp;ff:tp").rules == (("batch", ("dp", "fsdp")), ("ff", ("tp",)))
    assert str(tm.LayoutRules.parse(" batch : dp , fsdp ; ff:tp ")) == "batch:dp,fsdp;ff:tp"
    assert tm.LayoutRules.parse({"batch": "dp", "embed": ("dp", "fsdp")}).axes_of("embed") == ("dp", "fsdp")
    assert tm.LayoutRules.parse([("a", "x")]) == tm.LayoutRules.parse("a:x")
    assert tm.LayoutRules.parse(None) == tm.LayoutRules.parse("") == tm.LayoutRules()
    assert tm.LayoutRules.parse("batch:dp").axes_of("d") == ()
    assert parse_names("batch d") == parse_names("batch, d") == ("batch", "d")
    assert parse_dims("batch:8 d:16") == (Dim("batch", 8), Dim("d", 16))
    assert parse_equation("batch d, d ff -> batch ff") == ((("batch", "d"), ("d", "ff")), ("batch", "ff"))
    assert parse_equation("a b, b") == ((("a", "b"), ("b",)), None)
    assert parse_equation("a b ->") == ((("a", "b"),), ())


@pytest.mark.parametrize(
    "parse, text, match",
    [
        (tm.MeshShape.parse, "dp:2;dp:4", "mesh axis 'dp' appears twice"),
        (tm.MeshShape.parse, "dp:0", "has size 0; an axis size is an int >= 1"),
        (tm.MeshShape.parse, "dp", r"cannot read axis 'dp'. Write each axis as name:size"),
        (tm.MeshShape.parse, "dp:-1", "cannot read axis 'dp:-1'"),
        (tm.MeshShape.parse, "dp:2.0", "cannot read axis 'dp:2.0'"),
        (tm.MeshShape.parse, "dp:\u00b2", "cannot read axis"),
        (tm.MeshShape.parse, "1dp:2", "mesh axis name '1dp' is not valid"),
        (tm.LayoutRules.parse, "a:dp;a:tp", "dim 'a' has two rules"),
        (tm.LayoutRules.parse, "a:", r"cannot read 'a:'. Write each rule as dim:axis"),
        (tm.LayoutRules.parse, "a:dp,,tp", "cannot read 'a:dp,,tp'"),
        (tm.LayoutRules.parse, "a", "cannot read 'a'"),
        (tm.LayoutRules.parse, "a:dp,dp", "names a mesh axis twice"),
        (tm.LayoutRules.parse, "a:d p", "mesh axis name 'd p' is not valid"),
        (tm.LayoutRules.parse, 42, "cannot read layout rules from 42"),
        (parse_names, "batch batch", "dim 'batch' appears twice"),
        (parse_names, "batch 2d", "dim name '2d' is not valid"),
        (parse_dims, "batch", "dim 'batch' has no size: write 'batch:<size>'"),
        (parse_dims, "batch:x", "the size after ':' must be a non-negative integer"),
        (parse_dims, "batch:-1", "the size after ':' must be a non-negative integer"),
        (parse_dims, "a:1 a:2", "dim 'a' appears twice"),
        (parse_equation, "a a -> a", "a dim appears twice in one operand"),
        (parse_equation, "a b -> c -> d", "dim name '->' is not valid"),
        (parse_equation, "a.b -> a", r"dim name 'a.b' is not valid"),
    ],
)
def test_parse_errors(parse, text, match):
    with pytest.raises(ValueError, match=match) as info:
        parse(text)
    assert isinstance(info.value, tm.TorchMeshError)


def test_dim_size_with_non_ascii_digit_is_a_parse_error():
    # regression: "a:\u00b2" passed str.isdigit() and then int() raised a bare ValueError
    with pytest.raises(tm.ParseError, match="must be a non-negative integer"):
        parse_dims("a:\u00b2")


def test_names_with_a_trailing_newline_are_invalid():
    # regression: the name pattern ended in '$', which also matches before a final newline
    for make in (
        lambda: Dim("batch\n", 2),
        lambda: tm.MeshShape((("dp\n", 2),)),
        lambda: tm.LayoutRules((("a", ("dp\n",)),)),
    ):
        with pytest.raises(tm.ParseError, match=r"name .*\\n' is not valid"):
            make()


def test_rearrange_pattern_errors():
    with pytest.raises(tm.ParseError, match="write 'input dims -> output dims'"):
        tm.rearrange(_REARRANGE_X, "a b")
    with pytest.raises(tm.ParseError, match=r"'\.\.\.' is not supported"):
        tm.rearrange(_REARRANGE_X, "a ... -> a ...")
    with pytest.raises(tm.DimError, match="give the sizes of all but one"):
        tm.rearrange(_REARRANGE_X, "a (c d) -> a c d")
    with pytest.raises(tm.DimError, match="must use each of"):
        tm.rearrange(_REARRANGE_X, "a b -> a")


# ---- value types ----------------------------------------------------------------------------------

VALUES = [
    Dim("batch", 8),
    tm.MeshShape.parse("dp:2;tp:4"),
    tm.LayoutRules.parse("batch:dp,fsdp;ff:tp"),
    TensorLayout((Dim("batch", 8),), (("dp",),)),
    Gather("dp", 0),
    Slice("tp", 1),
    AllToAll("tp", 0, 1),
    CommRecord("all_gather", ("tp",), 16, (2, 2), torch.float32, "forward"),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_value_types_are_frozen_and_hashable(value):
    field = dataclasses.fields(value)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, field, getattr(value, field))
    assert not hasattr(value, "__dict__")  # slotted
    twin = dataclasses.replace(value)
    assert twin == value and twin is not value
    assert hash(twin) == hash(value)
    assert {value: 1}[twin] == 1


def test_value_types_validate_on_construction():
    with pytest.raises(tm.DimError, match="a dim size is an int >= 0"):
        Dim("a", -1)
    with pytest.raises(tm.DimError, match="a dim size is an int >= 0"):
        Dim("a", True)
    with pytest.raises(tm.ParseError, match="an axis size is an int >= 1"):
        tm.MeshShape((("dp", 2.0),))
    with pytest.raises(tm.ParseError, match="has a rule with no mesh axis"):
        tm.LayoutRules((("a", ()),))
    assert tm.Dimension is Dim
    assert repr(Dim("batch", 8)) == "Dim('batch', 8)" and str(Dim("batch", 8)) == "batch:8"


def test_rules_updated():
    rules = tm.LayoutRules.parse("batch:dp;ff:tp").updated("ff:fsdp,tp;heads:tp")
    assert str(rules) == "batch:dp;ff:fsdp,tp;heads:tp"
    assert rules.axes == frozenset({"dp", "fsdp", "tp"})


def test_rules_restricted_to_a_mesh():
    rules = tm.LayoutRules.parse("batch:dp,fsdp;ff:tp;heads:tp,dp")
    assert str(rules.restricted_to(tm.MeshShape.parse("dp:2;fsdp:2"))) == "batch:dp,fsdp;heads:dp"
    assert str(rules.restricted_to(tm.MeshShape.parse("tp:4"))) == "ff:tp;heads:tp"
    assert rules.restricted_to(tm.MeshShape.parse("pp:2")) == tm.LayoutRules()


def test_live_axes_and_is_split():
    mesh = tm.MeshShape.parse("dp:2;tp:1;fsdp:4")
    assert mesh.live_axes() == ("dp", "fsdp")
    assert mesh.live_axes(["fsdp", "tp", "dp"]) == ("fsdp", "dp")
    layout = TensorLayout(parse_dims("batch:8 ff:6 d:4"), (("dp", "fsdp"), ("tp",), ()))
    assert [layout.is_split(n, mesh) for n in ("batch", "ff", "d")] == [True, False, False]
    assert not layout.is_split("batch", tm.MeshShape.parse("dp:1;tp:1;fsdp:1"))  # xla's slicing mesh


@pytest.mark.parametrize(
    "dims,names",
    [
        ("batch d", ("batch", "d")),
        ("batch, d", ("batch", "d")),
        (Dim("d", 4), ("d",)),
        ([Dim("a", 2), "b"], ("a", "b")),
    ],
)
def test_dim_names(dims, names):
    assert dim_names(dims) == names
