"""torchmesh.mtf's ops (torchmesh/mtf/ops.py) against Mesh TF's ops_test.py and Mesh TF's formulas.

Mesh TF's own cases (convert_to_*, pool/stride, top_k with its gradient, nth_largest, the
x^2 + x gradient) keep its hard-coded numbers; every other op is checked against the formula
written in plain torch, forward and gradient, on one device and on a 2x2 sim mesh with the
tensors split. The `case_*` bodies take a mesh, so the gloo launch below and
tests/xla/suite/test_mtf_xla.py run the same code on 4 processes and 4 XLA devices.

(Named test_mtf_ops.py: tests/tensor/test_ops.py is imported as `test_ops` by the XLA suite.)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from harness import run_distributed

import torchmesh as tm
import torchmesh.mtf as mtf

RULES = "batch:b;d:m;a:m"  # d split
RULES_V = "batch:b;vocab:m;a:m;heads:m"  # vocab split


def one_device() -> tm.Mesh:
    return tm.Mesh("b:1", rules="batch:b")


def sim_2x2() -> tm.Mesh:
    return tm.Mesh("b:2;m:2", rules=RULES)


def sim_2x2_vocab() -> tm.Mesh:
    return tm.Mesh("b:2;m:2", rules=RULES_V)


MESHES = [
    pytest.param(one_device, id="1dev"),
    pytest.param(sim_2x2, id="b2m2"),
    pytest.param(sim_2x2_vocab, id="b2m2v"),
]

D = mtf.Dimension
BATCH, DM, VOCAB = D("batch", 4), D("d", 6), D("vocab", 5)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a.detach().to(b.dtype), b.detach(), rtol=tol, atol=tol)


def grad_of(y: torch.Tensor, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(y, x, dy)
    return g


def tape(x: tm.MeshTensor) -> tm.MeshTensor:
    """x, checked to be on the autograd tape: a tensor imported from a torch tensor with
    requires_grad stays on it on every backend (xla's device copy included)."""
    assert x.requires_grad, "import_tf_tensor dropped requires_grad"
    return x


def leaf(*shape: int, seed: int = 0, lo: float = -2.0, hi: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) * (hi - lo) + lo).requires_grad_(True)


# ---- Mesh TF's conversion tests (ops_test.py) ---------------------------------------------


@pytest.mark.parametrize("inputs", [D("x", 5), ("x", 5)])
def test_convert_to_dimension(inputs):
    d = mtf.convert_to_dimension(inputs)
    assert (d.name, d.size) == ("x", 5)


def test_convert_to_dimension_generic_inputs():
    assert mtf.convert_to_dimension(None) is None
    with pytest.raises(TypeError):
        mtf.convert_to_dimension(5)


@pytest.mark.parametrize("inputs", [mtf.Shape([D("x", 4), D("y", 8)]), "x:4;y:8", "x:4.y:8", "x:4 y:8", "x:4,y:8"])
def test_convert_to_shape(inputs):
    assert mtf.convert_to_shape(inputs) == mtf.Shape([D("x", 4), D("y", 8)])


def test_convert_to_shape_generic_inputs():
    assert mtf.convert_to_shape([]).dims == []
    assert mtf.convert_to_shape(None) is None
    with pytest.raises(ValueError):
        mtf.convert_to_shape("x;4")


@pytest.mark.parametrize(
    "inputs",
    [
        "d_ff:model;heads:model",
        "d_ff:model.heads:model",
        "d_ff:model heads:model",
        "d_ff:model,heads:model",
        [("d_ff", "model"), ("heads", "model")],
    ],
)
def test_convert_to_layout_rules(inputs):
    rules = mtf.convert_to_layout_rules(inputs)
    assert isinstance(rules, tm.LayoutRules)
    assert rules == tm.LayoutRules.parse("d_ff:model;heads:model")


def test_convert_to_layout_rules_generic_inputs():
    with pytest.raises(ValueError):
        mtf.convert_to_layout_rules("d_ff;heads")


def test_layout_rules_torchmesh_syntax_with_several_axes():
    assert mtf.convert_to_layout_rules("batch:b,m;d:x") == tm.LayoutRules.parse("batch:b,m;d:x")
    # Mesh TF's pairs naming one dim twice split it over both axes, in order
    assert mtf.convert_to_layout_rules("batch:b,batch:m") == tm.LayoutRules.parse("batch:b,m")


def test_mesh_from_mesh_tf_syntax():
    mesh = tm.Mesh(mtf.convert_to_shape("b:2,m:2"), rules=mtf.convert_to_layout_rules("batch:b,vocab:m"))
    assert (str(mesh.shape), str(mesh.rules)) == ("b:2;m:2", "batch:b;vocab:m")
    made = mtf.make_mesh("rows:2,cols:2", "a:rows,b:cols,heads:model")  # 'model' is no axis: dropped
    assert (str(made.shape), str(made.rules)) == ("rows:2;cols:2", "a:rows;b:cols")
    assert mtf.tensor_dim_to_mesh_dim_size("heads:m", "b:2,m:4", D("heads", 8)) == 4
    assert mtf.tensor_dim_to_size_per_split("heads:m", "b:2,m:4", D("heads", 8)) == 2
    assert mtf.tensor_dim_to_mesh_dim_size("heads:m", "b:2,m:4", D("batch", 8)) == 1


def test_shape_accessors():
    s = mtf.Shape([D("a", 2), D("b", 3), D("c", 4)])
    assert s.to_integer_list == [2, 3, 4] and s.size == 24 and s.ndims == 3 and s.rank == 3
    assert s.dimension_names == ["a", "b", "c"] and s.dims == [D("a", 2), D("b", 3), D("c", 4)]
    assert s.cumprod == [1, 2, 6] and s.cumprod_to_tensor_axis(6) == 2 and s.cumprod_to_tensor_axis(5) is None
    assert s - D("b", 3) == mtf.Shape([D("a", 2), D("c", 4)]) and s - [D("z", 1)] == s
    assert s + D("d", 5) == mtf.Shape("a:2 b:3 c:4 d:5") and s + [D("d", 5)] == s + mtf.Shape("d:5")
    assert s.get_dim_by_name("b") == D("b", 3) and isinstance(s[1:], mtf.Shape)
    assert s.rename_dimension("b", "q")[1] == D("q", 3) and s.resize_dimension("b", 7)[1] == D("b", 7)
    assert repr(s) == "Shape[a=2, b=3, c=4]"
    with pytest.raises(tm.DimError):
        s - D("z", 1)
    with pytest.raises(tm.DimError):
        s.get_dim_by_name("z")
    with pytest.raises(ValueError):
        mtf.Shape([D("a", 2), D("a", 2)])
    x = tm.zeros(s, one_device())  # a Shape is taken wherever torchmesh takes dims
    assert x.shape == s and mtf.Shape(x.shape).dims == s.dims


# ---- component-wise ops -------------------------------------------------------------------


def gelu_tanh(t):
    return t * (0.5 * (1.0 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t * t * t))))


UNARY = [
    (mtf.exp, torch.exp, {}),
    (mtf.log, torch.log, {"lo": 0.1}),
    (mtf.sqrt, torch.sqrt, {"lo": 0.1}),
    (mtf.rsqrt, torch.rsqrt, {"lo": 0.1}),
    (mtf.square, torch.square, {}),
    (mtf.abs, torch.abs, {}),
    (mtf.sign, torch.sign, {}),
    (mtf.sigmoid, torch.sigmoid, {}),
    (mtf.tanh, torch.tanh, {}),
    (mtf.sin, torch.sin, {}),
    (mtf.cos, torch.cos, {}),
    (mtf.relu, torch.relu, {}),
    (mtf.leaky_relu, lambda t: torch.where(t > 0, t, 0.2 * t), {}),
    (lambda x: mtf.leaky_relu(x, alpha=0.1), lambda t: torch.where(t > 0, t, 0.1 * t), {}),
    (mtf.elu, lambda t: torch.where(t > 0, t, torch.exp(t) - 1), {}),
    (mtf.selu, lambda t: 1.0507009873554805 * torch.where(t > 0, t, 1.6732632423543772 * (torch.exp(t) - 1)), {}),
    (mtf.softplus, lambda t: torch.log1p(torch.exp(t)), {}),
    (mtf.gelu, gelu_tanh, {}),
    (mtf.swish, lambda t: t * torch.sigmoid(t), {}),
    (mtf.reciprocal, lambda t: 1 / t, {"lo": 0.5}),
    (mtf.negative, torch.neg, {}),
    (mtf.floor, torch.floor, {}),
    (mtf.ceil, torch.ceil, {}),
    (lambda x: mtf.pow(x, 3.0), lambda t: torch.exp(torch.log(t) * 3.0), {"lo": 0.5}),
    (lambda x: mtf.reduce_logsumexp(x, VOCAB), lambda t: torch.logsumexp(t, 1), {}),
    (lambda x: mtf.log_softmax(x, VOCAB), lambda t: torch.log_softmax(t, 1), {}),
    (lambda x: mtf.softmax(x, VOCAB), lambda t: torch.softmax(t, 1), {}),
]


@pytest.mark.parametrize("make_mesh", MESHES)
@pytest.mark.parametrize("fn,ref,rng", UNARY, ids=[f"unary{i}" for i in range(len(UNARY))])
def test_unary(make_mesh, fn, ref, rng):
    mesh = make_mesh()
    t = leaf(4, 5, seed=1, **rng)
    x = mtf.import_tf_tensor(mesh, t, [BATCH, VOCAB])
    y = fn(x)
    want = ref(t)
    close(y.full(), want, 1e-5)
    dy = leaf(*want.shape, seed=2).detach()
    dy_mtf = mtf.import_tf_tensor(mesh, dy, y.shape)
    (g,) = mtf.gradients([y], [x], [dy_mtf])
    close(g.full(), grad_of(want, t, dy), 1e-5)


def test_gelu_is_the_tanh_approximation():
    x = mtf.import_tf_tensor(sim_2x2(), torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 3.0]), "d:6")
    got = mtf.gelu(x).full()
    close(got, F.gelu(torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 3.0]), approximate="tanh"))
    assert abs(got[4].item() - 0.841192) < 1e-6  # erf's GELU(1) is 0.841345
    assert (got - F.gelu(torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 3.0]))).abs().max() > 1e-5


def test_relu_and_abs_gradients_at_zero():
    t = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    x = mtf.import_tf_tensor(sim_2x2(), t, "d:3")
    assert mtf.gradients([mtf.reduce_sum(mtf.relu(x))], [x])[0].full().tolist() == [0.0, 0.0, 1.0]
    assert mtf.gradients([mtf.reduce_sum(mtf.abs(x))], [x])[0].full().tolist() == [-1.0, 0.0, 1.0]
    close(mtf.gradients([mtf.reduce_sum(mtf.leaky_relu(x))], [x])[0].full(), torch.tensor([0.2, 0.2, 1.0]))


def test_cast():
    x = mtf.import_tf_tensor(sim_2x2(), torch.tensor([1.5, -2.5]), "d:2")
    assert mtf.to_int32(x).dtype == torch.int32 and mtf.to_int32(x).full().tolist() == [1, -2]
    assert mtf.to_bfloat16(x).dtype == torch.bfloat16 and mtf.to_float(mtf.to_int32(x)).dtype == torch.float32
    assert mtf.cast(x, torch.float32) is x


# ---- binary ops ---------------------------------------------------------------------------

BINARY = [
    (mtf.add, torch.add),
    (mtf.sub, torch.sub),
    (mtf.subtract, torch.sub),
    (mtf.multiply, torch.mul),
    (mtf.divide, torch.div),
    (mtf.minimum, torch.minimum),
    (mtf.maximum, torch.maximum),
]


@pytest.mark.parametrize("make_mesh", MESHES)
@pytest.mark.parametrize("fn,ref", BINARY, ids=[f"binary{i}" for i in range(len(BINARY))])
def test_binary_broadcast(make_mesh, fn, ref):
    mesh = make_mesh()
    a, b = leaf(4, 5, seed=3), leaf(5, seed=4, lo=0.5)
    xa = mtf.import_tf_tensor(mesh, a, [BATCH, VOCAB])
    xb = mtf.import_tf_tensor(mesh, b, [VOCAB])
    for y, want in ((fn(xa, xb), ref(a, b)), (fn(xb, xa), ref(b, a))):
        assert y.dims == ("batch", "vocab")  # the supersequence's dims, as Mesh TF
        close(y.full(), want, 1e-5)
    dy = leaf(4, 5, seed=5).detach()
    ga, gb = mtf.gradients([fn(xa, xb)], [xa, xb], [mtf.import_tf_tensor(mesh, dy, [BATCH, VOCAB])])
    wa, wb = torch.autograd.grad(ref(a, b), [a, b], dy)
    close(ga.full(), wa, 1e-5)
    close(gb.full(), wb, 1e-5)
    # a number operand; x1's order; an explicit output_shape orders the result
    close(fn(xa, 2.0).full(), ref(a, torch.tensor(2.0)), 1e-5)
    c = leaf(3, seed=6)
    xc = mtf.import_tf_tensor(mesh, c, "c:3")
    y = fn(xb, xc)
    assert y.dims == ("vocab", "c")
    close(y.full(), ref(b[:, None], c[None, :]), 1e-5)
    assert fn(xb, xc, output_shape="c:3 vocab:5").dims == ("c", "vocab")


def test_comparisons_and_logic():
    mesh = sim_2x2()
    a, b = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([3, 2, 1])
    xa, xb = mtf.import_tf_tensor(mesh, a, "batch:2 b:3"), mtf.import_tf_tensor(mesh, b, "b:3")
    for fn, ref in [
        (mtf.equal, torch.eq),
        (mtf.not_equal, torch.ne),
        (mtf.less, torch.lt),
        (mtf.less_equal, torch.le),
        (mtf.greater, torch.gt),
        (mtf.greater_equal, torch.ge),
        (mtf.floordiv, torch.floor_divide),
        (mtf.mod, torch.remainder),
    ]:
        assert torch.equal(fn(xa, xb).full(), ref(a, b)), fn
    p, q = mtf.greater(xa, 2), mtf.less(xb, 3)
    assert torch.equal(mtf.logical_and(p, q).full(), (a > 2) & (b < 3))
    assert torch.equal(mtf.logical_or(p, q).full(), (a > 2) | (b < 3))
    assert torch.equal(mtf.logical_xor(p, q).full(), (a > 2) ^ (b < 3))
    assert torch.equal(mtf.logical_not(p).full(), ~(a > 2))
    assert mtf.add_n([xb, xb, xb]).full().tolist() == [9, 6, 3] and mtf.add_n([]) == 0


def test_where():
    mesh = sim_2x2()
    t, f = leaf(4, 5, seed=7), leaf(5, seed=8)
    cond = torch.tensor([True, False, True, True, False])
    y = mtf.where(
        mtf.import_tf_tensor(mesh, cond, [VOCAB]),
        mtf.import_tf_tensor(mesh, t, [BATCH, VOCAB]),
        mtf.import_tf_tensor(mesh, f, [VOCAB]),
    )
    assert y.dims == ("batch", "vocab")
    close(y.full(), torch.where(cond, t, f))


# ---- einsum, reshape, broadcast -------------------------------------------------------------


@pytest.mark.parametrize("make_mesh", MESHES)
def test_einsum(make_mesh):
    mesh = make_mesh()
    a, w = leaf(4, 6, seed=9), leaf(6, 5, seed=10)
    xa, xw = mtf.import_tf_tensor(mesh, a, [BATCH, DM]), mtf.import_tf_tensor(mesh, w, [DM, VOCAB])
    y = mtf.einsum([xa, xw], output_shape=[VOCAB, BATCH])  # output_shape fixes the order
    assert y.dims == ("vocab", "batch")
    close(y.full(), (a @ w).T, 1e-5)
    assert mtf.einsum([xa, xw]).dims == ("batch", "vocab")  # dims appearing once, in order
    assert mtf.matmul(xa, xw, reduced_dims=[DM]).dims == ("batch", "vocab")
    z = mtf.einsum([xa, xw], reduced_dims=[DM, VOCAB])
    close(z.full(), (a @ w).sum(1), 1e-5)
    heads = D("heads", 2)
    b = mtf.einsum([xa], output_shape=[heads, BATCH])  # a dim no input has: broadcast; d summed
    close(b.full(), a.sum(1).expand(2, 4), 1e-5)
    dy = leaf(2, 4, seed=11).detach()
    (g,) = mtf.gradients([b], [xa], [mtf.import_tf_tensor(mesh, dy, [heads, BATCH])])
    close(g.full(), dy.sum(0)[:, None].expand(4, 6), 1e-5)
    with pytest.raises(tm.DimError):
        mtf.einsum([xa, xw], output_shape=[BATCH], reduced_dims=[DM])


@pytest.mark.parametrize("make_mesh", MESHES)
@pytest.mark.parametrize(
    "src,dst",
    [
        ("a:4 b:6", "c:24"),
        ("a:4 b:6", "c:2 e:12"),
        ("a:4 b:6", "b:6 a:4"),  # same names, other sizes: a row-major reshape
        ("a:4 b:6", "a:4 e:2 f:3"),
        ("a:4 b:6", "p:8 q:3"),
        ("a:2 b:3 c:4", "q:6 c:4"),
        ("a:4 b:6", "x:4 y:6"),
        ("a:4 b:6", "one:1 a:4 b:6"),
    ],
)
def test_reshape(make_mesh, src, dst):
    mesh = make_mesh()
    s, d = mtf.convert_to_shape(src), mtf.convert_to_shape(dst)
    t = leaf(*s.to_integer_list, seed=12)
    x = mtf.import_tf_tensor(mesh, t, s)
    y = mtf.reshape(x, d)
    assert y.shape == d
    close(y.full(), t.reshape(d.to_integer_list))
    dy = leaf(*d.to_integer_list, seed=13).detach()
    (g,) = mtf.gradients([y], [x], [mtf.import_tf_tensor(mesh, dy, d)])
    close(g.full(), dy.reshape(s.to_integer_list))


def test_replace_rename_transpose_broadcast():
    mesh = sim_2x2()
    t = leaf(4, 6, seed=14)
    x = mtf.import_tf_tensor(mesh, t, [BATCH, DM])
    y = mtf.replace_dimensions(x, DM, [D("d1", 2), D("d2", 3)])
    close(y.full(), t.reshape(4, 2, 3))
    assert mtf.rename_dimension(x, "d", "e").dims == ("batch", "e")
    close(mtf.transpose(x, [DM, BATCH]).full(), t.T)
    with pytest.raises(tm.DimError):
        mtf.transpose(x, [DM])
    b = mtf.broadcast(x, [D("k", 3), BATCH, DM])
    close(b.full(), t.expand(3, 4, 6))


# ---- reductions ---------------------------------------------------------------------------


@pytest.mark.parametrize("make_mesh", MESHES)
def test_reductions(make_mesh):
    mesh = make_mesh()
    t = leaf(4, 6, seed=15)
    x = mtf.import_tf_tensor(mesh, t, [BATCH, DM])
    close(mtf.reduce_sum(x).full(), t.sum())
    close(mtf.reduce_sum(x, reduced_dim=BATCH).full(), t.sum(0), 1e-5)
    assert mtf.reduce_sum(x, output_shape=[DM, BATCH]).dims == ("d", "batch")
    close(mtf.reduce_mean(x, output_shape=[DM]).full(), t.sum(0) * (6 / 24), 1e-5)
    close(mtf.reduce_max(x, reduced_dim=DM).full(), t.amax(1))
    close(mtf.reduce_min(x, output_shape=[DM]).full(), t.amin(0))
    b = mtf.greater(x, 0.0)
    assert torch.equal(mtf.reduce_any(b, reduced_dim=DM).full(), (t > 0).any(1))
    assert torch.equal(mtf.reduce_all(b, reduced_dim=BATCH).full(), (t > 0).all(0))
    with pytest.raises(tm.DimError):
        mtf.reduce_sum(x, output_shape=[BATCH], reduced_dim=BATCH)
    dy = leaf(6, seed=16).detach()
    (g,) = mtf.gradients([mtf.reduce_mean(x, reduced_dim=BATCH)], [x], [mtf.import_tf_tensor(mesh, dy, [DM])])
    close(g.full(), (dy * 0.25).expand(4, 6))


@pytest.mark.parametrize("make_mesh", MESHES)
def test_reduce_max_gradient_with_ties_follows_mesh_tf(make_mesh):
    """Mesh TF: d x = cast(equal(x, max)) * dy, so every tied maximum gets dy whole (torch
    shares it: 1/2 each)."""
    mesh = make_mesh()
    t = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], requires_grad=True)
    x = mtf.import_tf_tensor(mesh, t, "batch:2 a:4")
    dy = torch.tensor([5.0, 7.0])
    (g,) = mtf.gradients([mtf.reduce_max(x, reduced_dim=D("a", 4))], [x], [mtf.import_tf_tensor(mesh, dy, "batch:2")])
    want = (t == t.amax(1, keepdim=True)).float() * dy[:, None]
    close(g.full(), want)
    assert g.full()[0].tolist() == [0.0, 5.0, 5.0, 0.0]
    (g,) = mtf.gradients([mtf.reduce_min(x, reduced_dim=D("a", 4))], [x], [mtf.import_tf_tensor(mesh, dy, "batch:2")])
    assert g.full()[1].tolist() == [7.0, 7.0, 7.0, 7.0]


def test_logsumexp_extra_logit():
    mesh = sim_2x2()
    t = leaf(4, 5, seed=17)
    x = mtf.import_tf_tensor(mesh, t, [BATCH, VOCAB])
    y = mtf.reduce_logsumexp(x, VOCAB, extra_logit=0.5)
    close(y.full(), torch.logsumexp(torch.cat([t, torch.full((4, 1), 0.5)], 1), 1), 1e-5)
    close(mtf.softmax(x, VOCAB, extra_logit=0.0).full(), torch.exp(t) / (1 + torch.exp(t).sum(1, keepdim=True)), 1e-5)


@pytest.mark.parametrize(
    "fn,ref", [(mtf.reduce_mean, torch.mean), (mtf.reduce_max, torch.amax), (mtf.reduce_min, torch.amin)]
)
def test_pool_tensor_1d(fn, ref):
    """ops_test.py testPoolTensor1d."""
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    want = torch.stack([ref(x[:, :, 0:2, :], 2), ref(x[:, :, 2:4, :], 2)], 2)
    xm = mtf.import_tf_tensor(sim_2x2(), x, "batch:2 c:3 d:4 e:5")
    pooled = mtf.pool_tensor_1d(xm, pool_dim=mtf.Shape(xm.shape).dims[2], reduce_fn=fn, pool_size=2)
    close(pooled.full(), want, 1e-6)


@pytest.mark.parametrize("pool_size", [2, 3])
def test_stride_tensor_1d_and_reduce_first(pool_size):
    """ops_test.py testStrideTensor1d and testReduceFirst."""
    x = torch.randint(0, 100, (2, 3, 6, 5), generator=torch.Generator().manual_seed(0))
    xm = mtf.import_tf_tensor(sim_2x2(), x, "batch:2 c:3 d:6 e:5")
    strided = mtf.stride_tensor_1d(xm, pool_dim=xm.shape[2], pool_size=pool_size)
    assert torch.equal(strided.full(), x[:, :, 0::pool_size, :])
    assert torch.equal(mtf.reduce_first(xm, reduced_dim=xm.shape[2]).full(), x[:, :, 0, :])


# ---- Mesh TF's top_k, nth-largest and gradient tests ----------------------------------------


def case_top_k(mesh: tm.Mesh) -> None:
    """ops_test.py TopKTest.testTopK (mesh rows:2,cols:2 with layout a:rows,b:cols)."""
    a_dim, b_dim, k_dim = D("a", 6), D("b", 2), D("k", 2)
    inputs = torch.tensor([[1, 10], [2, 9], [3, 8], [4, 7], [5, 6], [6, 5]], dtype=torch.float32, requires_grad=True)
    d_values = torch.tensor([[11, 12], [13, 14]], dtype=torch.float32)
    x = tape(mtf.import_fully_replicated(mesh, inputs, shape=mtf.Shape([a_dim, b_dim])))
    dv = mtf.import_tf_tensor(mesh, d_values, shape=mtf.Shape([b_dim, k_dim]))
    values, indices = mtf.top_k(x, reduced_dim=a_dim, k_dim=k_dim)
    (d_inputs,) = mtf.gradients([values], [x], [dv])
    assert values.full().tolist() == [[6, 5], [10, 9]]
    assert indices.full().tolist() == [[5, 4], [0, 1]] and indices.dtype == torch.int32
    assert d_inputs.full().tolist() == [[0, 13], [0, 14], [0, 0], [0, 0], [12, 0], [11, 0]]


def case_nth_element(mesh: tm.Mesh) -> None:
    """ops_test.py NthSmallestTest (mesh all:2, layout a:all)."""
    inputs = torch.tensor([[1, 10], [2, 9], [3, 8], [4, 7], [5, 6], [6, 5]])
    x = mtf.import_tf_tensor(mesh, inputs, shape=mtf.Shape([D("a", 6), D("b", 2)]))
    assert mtf.nth_largest_element(x, 1, D("a", 6)).full().tolist() == [5, 9]
    assert mtf.nth_smallest_element(x, 0, D("b", 2)).full().tolist() == [1, 2, 3, 4, 5, 5]


def case_x_squared_plus_x(mesh: tm.Mesh) -> None:
    """ops_test.py RecomputeGradTest's function: y = x^2 + x, dy/dx = 2x + 1."""
    t = torch.tensor([5.0, 10.0], requires_grad=True)
    x = tape(mtf.import_fully_replicated(mesh, t, shape=mtf.Shape([D("two", 2)])))
    dy = mtf.import_tf_tensor(mesh, torch.tensor([2.0, 3.0]), shape=mtf.Shape([D("two", 2)]))
    y = x * x + x
    (dx,) = mtf.gradients([y], [x], [dy])
    assert y.full().tolist() == [30, 110] and dx.full().tolist() == [22, 63]


def test_mesh_tf_top_k():
    case_top_k(mtf.make_mesh("rows:2,cols:2", "a:rows,b:cols"))
    case_top_k(one_device())


def test_mesh_tf_nth_element():
    case_nth_element(mtf.make_mesh("all:2", "a:all"))


def test_mesh_tf_x_squared_plus_x():
    case_x_squared_plus_x(mtf.make_mesh("processors:2", "two:processors"))


# ---- selection, scans, slicing, stacking ----------------------------------------------------


def case_selection(mesh: tm.Mesh) -> None:
    t = torch.tensor(
        [[1.0, 9.0, 9.0, 3.0, 0.0], [4.0, 2.0, 8.0, 8.0, 1.0], [0.0, 0.0, 0.0, 5.0, 5.0], [7.0, 6.0, 5.0, 4.0, 3.0]]
    )
    t.requires_grad_(True)
    x = tape(mtf.import_tf_tensor(mesh, t, [BATCH, VOCAB]))
    assert mtf.argmax(x, VOCAB).full().tolist() == [1, 2, 3, 0] and mtf.argmax(x, VOCAB).dtype == torch.int32
    v, i = mtf.top_1(x, VOCAB)
    assert v.full().tolist() == [9, 8, 5, 7] and i.full().tolist() == [1, 2, 3, 0]
    (g,) = mtf.gradients([v], [x])  # top_1's gradient: the selected element only (not every tie)
    assert g.full()[0].tolist() == [0, 1, 0, 0, 0]
    v3, i3 = mtf.top_k(x, VOCAB, D("k", 3))
    assert v3.dims == ("batch", "k") and v3.full()[1].tolist() == [8, 8, 4] and i3.full()[1].tolist() == [2, 3, 0]


def case_cumsum(mesh: tm.Mesh) -> None:
    t = leaf(4, 5, seed=18)
    x = tape(mtf.import_tf_tensor(mesh, t, [BATCH, VOCAB]))
    close(mtf.cumsum(x, VOCAB).full(), t.cumsum(1), 1e-5)
    close(mtf.cumsum(x, VOCAB, exclusive=True).full(), t.cumsum(1) - t, 1e-5)
    close(mtf.cumsum(x, VOCAB, reverse=True).full(), t.flip(1).cumsum(1).flip(1), 1e-5)
    (g,) = mtf.gradients([mtf.cumsum(x, BATCH)], [x])
    close(g.full(), torch.arange(4.0, 0.0, -1.0)[:, None].expand(4, 5))
    ints = mtf.import_tf_tensor(mesh, torch.tensor([1, 2, 3, 4], dtype=torch.int32), [BATCH])
    c = mtf.cumsum(ints, BATCH)
    assert c.dtype == torch.int32 and c.full().tolist() == [1, 3, 6, 10]


def case_one_hot_gather(mesh: tm.Mesh) -> None:
    ids = mtf.import_tf_tensor(mesh, torch.tensor([0, 4, 2, 7]), [BATCH])
    oh = mtf.one_hot(ids, VOCAB, on_value=3.0, off_value=-1.0, dtype=torch.float32)
    want = torch.full((4, 5), -1.0)
    want[0, 0], want[1, 4], want[2, 2] = 3.0, 3.0, 3.0  # id 7 lies outside vocab: a row of off_value
    assert oh.dims == ("batch", "vocab") and torch.equal(oh.full(), want)
    assert torch.equal(mtf.one_hot(ids, VOCAB, dtype=torch.int32).full(), (want > 0).to(torch.int32))
    table = leaf(5, 6, seed=19)
    w = tape(mtf.import_tf_tensor(mesh, table, [VOCAB, DM]))
    ok = mtf.import_tf_tensor(mesh, torch.tensor([0, 4, 2, 2]), [BATCH])
    y = mtf.gather(w, ok, VOCAB)
    close(y.full(), table[[0, 4, 2, 2]])
    assert mtf.gather(w, ok, VOCAB, output_shape=[DM, BATCH]).dims == ("d", "batch")
    (g,) = mtf.gradients([y], [w])
    close(g.full(), torch.tensor([1.0, 0, 2, 0, 1])[:, None].expand(5, 6))


def case_slicing(mesh: tm.Mesh) -> None:
    t = leaf(4, 6, seed=20)
    x = tape(mtf.import_tf_tensor(mesh, t, [BATCH, DM]))
    close(mtf.shift(x, 2, DM, wrap=False).full(), F.pad(t[:, :4], (2, 0)))
    close(mtf.shift(x, -1, "d", wrap=True).full(), t.roll(-1, 1))
    close(mtf.slice(x, 1, 3, "d").full(), t[:, 1:4])
    close(mtf.pad(x, [1, 2], "d").full(), F.pad(t, (1, 2)))
    close(mtf.concat([x, mtf.slice(x, 0, 2, "d")], "d").full(), torch.cat([t, t[:, :2]], 1))
    parts = mtf.split(x, DM, 3)
    assert [p.sizes["d"] for p in parts] == [2, 2, 2]
    close(parts[2].full(), t[:, 4:])
    assert [p.sizes["d"] for p in mtf.split(x, DM, [1, 5])] == [1, 5]
    s = mtf.stack(mtf.unstack(x, BATCH), "batch", axis=-1)
    assert s.dims == ("d", "batch")
    close(s.full(), t.T)
    dy = leaf(4, 3, seed=21).detach()
    (g,) = mtf.gradients([mtf.slice(x, 1, 3, "d")], [x], [mtf.import_tf_tensor(mesh, dy, "batch:4 d:3")])
    close(g.full(), F.pad(dy, (1, 2)))


def case_constants(mesh: tm.Mesh) -> None:
    assert mtf.range(mesh, VOCAB, torch.float32).full().tolist() == [0, 1, 2, 3, 4]
    assert mtf.range(mesh, VOCAB, torch.int32).dtype == torch.int32
    assert mtf.zeros(mesh, [BATCH, VOCAB]).full().sum().item() == 0
    assert mtf.ones(mesh, "batch:4", dtype=torch.int32).full().tolist() == [1, 1, 1, 1]
    x = mtf.constant(mesh, 2.5, [BATCH, DM])
    assert x.full().unique().tolist() == [2.5] and mtf.fill(mesh, "d:6", 7.0).full().unique().tolist() == [7.0]
    assert mtf.zeros_like(x).full().sum().item() == 0 and mtf.ones_like(x).full().sum().item() == 24
    assert mtf.constant(mesh, 3).dims == ()


@pytest.mark.parametrize("make_mesh", MESHES)
def test_selection(make_mesh):
    case_selection(make_mesh())


@pytest.mark.parametrize("make_mesh", MESHES)
def test_cumsum(make_mesh):
    case_cumsum(make_mesh())


@pytest.mark.parametrize("make_mesh", MESHES)
def test_one_hot_gather(make_mesh):
    case_one_hot_gather(make_mesh())


@pytest.mark.parametrize("make_mesh", MESHES)
def test_slicing(make_mesh):
    case_slicing(make_mesh())


@pytest.mark.parametrize("make_mesh", MESHES)
def test_constants(make_mesh):
    case_constants(make_mesh())


# ---- random ---------------------------------------------------------------------------------


def case_random(mesh: tm.Mesh) -> dict:
    u = mtf.random_uniform(mesh, [BATCH, DM], minval=-2.0, maxval=3.0, seed=5)
    n = mtf.random_normal(mesh, [BATCH, DM], mean=1.0, stddev=2.0, seed=6)
    x = mtf.ones(mesh, [BATCH, DM])
    drop = mtf.dropout(x, True, keep_prob=0.75, seed=7)
    shared = mtf.dropout(x, True, rate=0.5, noise_shape=[BATCH], seed=8)
    assert mtf.dropout(x, False, keep_prob=0.5) is x and mtf.dropout(x, True, rate=0.0) is x
    return {"u": u.full(), "n": n.full(), "drop": drop.full(), "shared": shared.full()}


def test_random_is_the_same_on_every_mesh():
    a, b = case_random(one_device()), case_random(sim_2x2())
    for k in a:
        assert torch.equal(a[k], b[k]), k
    u = a["u"]
    assert u.min() >= -2.0 and u.max() < 3.0 and u.std() > 0.5
    assert torch.equal(a["n"], tm.randn([BATCH, DM], one_device(), seed=6).full() * 2.0 + 1.0)
    keep = torch.tensor(1 / 0.75).item()  # in float32
    assert set(a["drop"].flatten().tolist()) <= {0.0, keep}
    mask = tm.rand([BATCH, DM], one_device(), seed=7).full() < 0.75
    assert torch.equal(a["drop"], mask.float() * keep)  # keep where uniform < keep_prob, as Mesh TF
    assert torch.equal(a["shared"], a["shared"][:, :1].expand(4, 6))  # one draw per batch row
    with pytest.raises(ValueError):
        mtf.dropout(mtf.ones(one_device(), "d:2"), True)


# ---- gradients and variables ----------------------------------------------------------------


def test_gradients_conventions():
    mesh = sim_2x2()
    a, b = leaf(4, 6, seed=22), leaf(6, seed=23)
    xa, xb = mtf.import_tf_tensor(mesh, a, [BATCH, DM]), mtf.import_tf_tensor(mesh, b, [DM])
    unrelated = mtf.import_tf_tensor(mesh, leaf(3, seed=24), "c:3")
    y1 = mtf.reduce_sum(mtf.multiply(xa, xb), reduced_dim=DM)  # batch
    y2 = mtf.reduce_sum(mtf.square(xb))
    ga, gb, gu = mtf.gradients([y1, y2], [xa, xb, unrelated])
    assert gu is None
    close(ga.full(), b.expand(4, 6))
    close(gb.full(), a.sum(0) + 2 * b, 1e-5)
    assert ga.layout == xa.layout
    # the tape is kept: gradients again, with grad_ys
    (ga2,) = mtf.gradients([y1], [xa], [mtf.import_tf_tensor(mesh, torch.arange(4.0), [BATCH])])
    close(ga2.full(), torch.arange(4.0)[:, None] * b)
    plain = mtf.import_tf_tensor(mesh, torch.ones(2), "c:2")  # not on the tape
    assert mtf.gradients([mtf.reduce_sum(plain)], [plain]) == [None]


def test_get_variable_initializer_contract_and_reuse():
    mesh = sim_2x2()
    calls = []

    def init(shape, dtype=None, partition_info=None):
        calls.append((list(shape), dtype, partition_info))
        return torch.arange(float(math.prod(shape))).reshape(shape)

    with mtf.variable_scope("model"):
        w = mtf.get_variable(mesh, "w", [DM, VOCAB], initializer=init)
    assert calls == [([6, 5], torch.float32, None)]
    assert torch.equal(w.full(), torch.arange(30.0).reshape(6, 5))
    var = w.operation
    assert isinstance(var, mtf.Variable) and var.name == "model/w" and var.value is w and var.trainable
    assert var.shape == mtf.Shape([DM, VOCAB]) and var.size == 30 and var.outputs == [w]
    with mtf.variable_scope("model"):
        assert mtf.get_variable(mesh, "w", [DM, VOCAB], initializer=init) is w  # the same variable
    assert len(calls) == 1
    with pytest.raises(tm.DimError):
        with mtf.variable_scope("model"):
            mtf.get_variable(mesh, "w", [DM])
    # gradients reach it; optimizers update it in place (held tensors see the new value)
    x = mtf.import_tf_tensor(mesh, torch.ones(4, 6), [BATCH, DM])
    (g,) = mtf.gradients([mtf.reduce_sum(mtf.einsum([x, w], output_shape=[BATCH, VOCAB]))], [w])
    close(g.full(), torch.full((6, 5), 4.0))
    mtf.assign_sub(w, g * 0.5)
    close(w.full(), torch.arange(30.0).reshape(6, 5) - 2.0)
    mtf.assign_add(var, 1.0)
    mtf.assign(w, mtf.transpose(mtf.import_tf_tensor(mesh, torch.ones(6, 5), [DM, VOCAB]), [VOCAB, DM]) * 3.0)
    assert w.full().unique().tolist() == [3.0] and w.requires_grad
    assert var in mtf.trainable_variables(mesh) and var in mtf.all_variables(mesh)


def test_get_variable_defaults():
    mesh, other = sim_2x2(), one_device()
    tm.manual_seed(123)
    w = mtf.get_variable(mesh, "glorot", [DM, VOCAB])
    tm.manual_seed(123)
    w1 = mtf.get_variable(other, "glorot", [DM, VOCAB])
    assert torch.equal(w.full(), w1.full())  # the same numbers on every mesh
    limit = math.sqrt(6.0 / (6 + 5))  # TF's glorot uniform: fans from the last two dims
    assert w.full().abs().max() <= limit and w.full().abs().max() > limit / 2
    k = mtf.get_variable(mesh, "conv", "h:3 w:3 c:4 o:8")
    assert k.full().abs().max() <= math.sqrt(6.0 / (9 * 4 + 9 * 8))
    i = mtf.get_variable(mesh, "step", [], dtype=torch.int32, trainable=False)
    assert i.dtype == torch.int32 and i.full().item() == 0 and not i.operation.trainable and not i.requires_grad
    assert i.operation not in mtf.trainable_variables(mesh)
    bf = mtf.get_variable(
        mesh,
        "mixed",
        [DM],
        dtype=mtf.VariableDType(torch.float32, torch.float32, torch.bfloat16),
        initializer=mtf.ones_initializer(),
    )
    assert bf.dtype == torch.bfloat16 and bf.operation.value.dtype == torch.float32
    for init in [
        mtf.zeros_initializer(),
        mtf.constant_initializer(2.0),
        mtf.random_normal_initializer(0.0, 0.02),
        mtf.truncated_normal_initializer(stddev=0.5),
        mtf.random_uniform_initializer(-1, 1),
    ]:
        t = init([3, 4], dtype=torch.float32, partition_info=None)
        assert t.shape == (3, 4) and t.dtype == torch.float32
    assert mtf.truncated_normal_initializer(stddev=0.5, seed=1)([1000]).abs().max() <= 1.0
    mtf.reset_variables(mesh)
    assert mtf.all_variables(mesh) == []


def test_variable_scope_default_names_repeat_each_step():
    names = []
    for _step in range(2):
        with mtf.variable_scope("model"):
            for _ in range(2):
                with mtf.variable_scope(None, default_name="dense") as s:
                    names.append(s)
    assert names == ["model/dense", "model/dense_1"] * 2


# ---- the same cases on 4 gloo processes ---------------------------------------------------


def ops_on_ranks() -> dict:
    mesh = tm.Mesh("b:2;m:2", rules=RULES, backend="dist")
    case_top_k(tm.Mesh("rows:2;cols:2", rules="a:rows;b:cols", backend="dist"))
    case_x_squared_plus_x(mesh)
    case_selection(mesh)
    case_one_hot_gather(mesh)
    t = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], requires_grad=True)
    x = mtf.import_tf_tensor(mesh, t, "batch:2 a:4")
    (g,) = mtf.gradients([mtf.reduce_max(x, reduced_dim=D("a", 4))], [x])
    assert g.full().tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]]
    y = mtf.reshape(mtf.import_tf_tensor(mesh, torch.arange(24.0).reshape(4, 6), [BATCH, DM]), "p:8 q:3")
    assert torch.equal(y.full(), torch.arange(24.0).reshape(8, 3))
    tm.manual_seed(3)
    w = mtf.get_variable(mesh, "w", [DM, VOCAB])
    out = case_random(mesh)
    out["w"] = w.full().detach()
    return out


def test_ops_on_gloo():
    tm.manual_seed(3)
    want_w = mtf.get_variable(one_device(), "w", [DM, VOCAB]).full()
    want = case_random(one_device())
    for got in run_distributed(ops_on_ranks, 4):
        assert torch.equal(got.pop("w"), want_w)
        for k in want:
            assert torch.equal(got[k], want[k]), k
