"""torchmesh.mtf.layers against Mesh TF's layers_test.py and Mesh TF's formulas in plain torch.

Mesh TF's own cases (testDense, testLayerNorm, testWeightsNonzero, testDenseReluDense,
testMaskedLocalAttention1D, testDotProductAttention, testMultiheadAttention) keep its sizes and
checks; each layer is also checked against its formula written in plain torch from the
variables it created, forward and gradients (inputs and weights), on one device and on a 2x2
sim mesh with the relevant dims split (batch, d_ff, heads, vocab, length). Variables come from
`mtf.get_variable` with Mesh TF's names and initializers: the same seed gives the same weights
on every mesh. The `case_*` bodies take a mesh, so the gloo launch at the end and
tests/xla/suite/test_mtf_layers_xla.py run the same code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from harness import run_distributed

import torchmesh as tm
import torchmesh.mtf as mtf

D = mtf.Dimension
RULES = "batch:b;hidden:m;ff:m;heads:m;vocab:m"
RULES_LOCAL = "batch:b;length_q:m"  # the blocks dim keeps the length's name: split, halo over m


def one_device() -> tm.Mesh:
    return tm.Mesh("b:1", rules="batch:b")


def sim_2x2() -> tm.Mesh:
    return tm.Mesh("b:2;m:2", rules=RULES)


def sim_2x2_local() -> tm.Mesh:
    return tm.Mesh("b:2;m:2", rules=RULES_LOCAL)


MESHES = [pytest.param(one_device, id="1dev"), pytest.param(sim_2x2, id="b2m2")]
LOCAL_MESHES = [*MESHES, pytest.param(sim_2x2_local, id="b2m2len")]


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a.detach().cpu().to(b.dtype), b.detach(), rtol=tol, atol=tol)


def leaf(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(True)


def tape(x: tm.MeshTensor) -> tm.MeshTensor:
    """x on the autograd tape (xla's import starts a new leaf)."""
    return x if x.requires_grad else x.requires_grad_(True)


def variables(mesh: tm.Mesh) -> dict[str, mtf.Variable]:
    return {v.name: v for v in mtf.all_variables(mesh)}


def check_grads(y, xs, ref, refs, dy_seed: int = 9, tol: float = 1e-5) -> None:
    """mtf.gradients of y (weighted by a random dy) w.r.t. xs equal torch.autograd's of ref."""
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(dy_seed))
    dy_m = mtf.import_tf_tensor(y.mesh, dy, y.shape)
    got = mtf.gradients([y], xs, [dy_m])
    want = torch.autograd.grad(ref, refs, dy, allow_unused=True, retain_graph=True)
    for g, w in zip(got, want):
        close(g.full(), w, tol)


def weight(mesh: tm.Mesh, name: str) -> tuple[tm.MeshTensor, torch.Tensor]:
    """The variable's value (a MeshTensor on the tape) and a torch leaf copy for the reference."""
    v = variables(mesh)[name].value
    return v, v.full().detach().cpu().clone().requires_grad_(True)


# ---- dense ---------------------------------------------------------------------------------


def case_dense(mesh: tm.Mesh) -> dict:
    tm.manual_seed(1)
    batch, channels, ff = D("batch", 4), D("channels", 6), D("ff", 8)
    xt = leaf(4, 6)
    x = tape(mtf.import_tf_tensor(mesh, xt, [batch, channels]))
    with mtf.variable_scope("model"):
        y = mtf.layers.dense(x, ff, reduced_dims=[channels], activation=mtf.relu, name="wi")
    assert y.dims == ("batch", "ff")
    w, wt = weight(mesh, "model/wi/kernel")
    b, bt = weight(mesh, "model/wi/bias")
    assert w.dims == ("channels", "ff") and b.dims == ("ff",)
    assert torch.equal(bt, torch.zeros(8))
    ref = torch.relu(xt @ wt + bt)
    close(y.full(), ref)
    check_grads(y, [x, w, b], ref, [xt, wt, bt])
    return {"w": wt.detach(), "y": y.full().detach().cpu()}


@pytest.mark.parametrize("make_mesh", MESHES)
def test_dense(make_mesh):
    got = case_dense(make_mesh())
    # Mesh TF's default kernel: truncated normal (2 stddevs) with stddev 1/sqrt(fan_in)
    assert got["w"].abs().max() <= 2 * 6**-0.5


def test_dense_is_the_same_on_every_mesh():
    a, b = case_dense(one_device()), case_dense(sim_2x2())
    assert torch.equal(a["w"], b["w"])
    close(a["y"], b["y"])


@pytest.mark.parametrize("units, use_bias, new_dim_name", [(4, True, "not_channels"), (8, False, "channels")])
def test_mesh_tf_dense(units, use_bias, new_dim_name):
    """Mesh TF's testDense: [batch=2, channels=3] -> [batch, units]; a new dim named like the
    reduced one makes the reduced one '_channels' in the kernel."""
    mesh = sim_2x2()
    x = mtf.import_tf_tensor(mesh, torch.randn(2, 3), [D("batch", 2), D("channels", 3)])
    with mtf.variable_scope("t"):
        y = mtf.layers.dense(
            x, new_dims=D(new_dim_name, units), reduced_dims=[D("channels", 3)], activation=mtf.relu, use_bias=use_bias
        )
    assert tuple(y.full().shape) == (2, units)
    names = sorted(variables(mesh))
    assert names == (["t/dense/kernel", "t/dense_1/bias"] if use_bias else ["t/dense/kernel"])
    if new_dim_name == "channels":
        assert variables(mesh)["t/dense/kernel"].value.dims == ("_channels", "channels")


def test_dense_expert_dims_and_initializers():
    mesh = sim_2x2()
    experts, d, h = D("experts", 2), D("d", 4), D("hidden", 6)
    xt = leaf(2, 3, 4)
    x = tape(mtf.import_tf_tensor(mesh, xt, [experts, D("batch", 3), d]))
    with mtf.variable_scope("e"):
        y = mtf.layers.dense(x, [h], reduced_dims=[d], expert_dims=[experts], name="wi")
    w, wt = weight(mesh, "e/wi/kernel")
    b, bt = weight(mesh, "e/wi/bias")
    assert w.dims == ("experts", "d", "hidden") and b.dims == ("experts", "hidden")
    ref = torch.einsum("ebd,edh->ebh", xt, wt) + bt[:, None, :]
    close(y.full(), ref)
    check_grads(y, [x, w], ref, [xt, wt])
    # VarianceScalingInitializer: modes and distributions (fan from dims)
    red, new = [D("d", 400)], [D("ff", 100)]
    for mode, n in (("fan_in", 400), ("fan_out", 100), ("fan_avg", 250)):
        t = mtf.layers.VarianceScalingInitializer(2.0, mode)(red, new)([400, 100])
        assert abs(t.std().item() / math.sqrt(2.0 / n) - 0.88) < 0.03  # truncated at 2 stddevs: 0.88 of it
        u = mtf.layers.VarianceScalingInitializer(2.0, mode, "uniform")(red, new)([400, 100])
        assert u.abs().max() <= math.sqrt(3 * 2.0 / n) and abs(u.std().item() / math.sqrt(2.0 / n) - 1) < 0.03
    with pytest.raises(tm.ConfigError, match="mode"):
        mtf.layers.VarianceScalingInitializer(mode="fan")(red, new)


def test_dense_product_is_a_gated_linear_unit():
    mesh = sim_2x2()
    d, ff = D("d", 4), D("ff", 6)
    xt = leaf(3, 4)
    x = tape(mtf.import_tf_tensor(mesh, xt, [D("batch", 3), d]))
    with mtf.variable_scope("g"):
        y = mtf.layers.dense_product(x, [d], [ff], ["linear", "sigmoid"], use_bias=False)
    w0, w0t = weight(mesh, "g/dense_product_0/kernel")
    w1, w1t = weight(mesh, "g/dense_product_1/kernel")
    ref = (xt @ w0t) * torch.sigmoid(xt @ w1t)
    close(y.full(), ref)
    check_grads(y, [x, w0, w1], ref, [xt, w0t, w1t])


# ---- layer norm, losses, weights_nonzero ---------------------------------------------------


def case_layer_norm(mesh: tm.Mesh) -> None:
    ff = D("ff", 8)
    xt = leaf(4, 8, seed=2)
    x = tape(mtf.import_tf_tensor(mesh, xt, [D("batch", 4), ff]))
    with mtf.variable_scope("m"):
        y = mtf.layers.layer_norm(x, ff)
    s, st = weight(mesh, "m/layer_prepostprocess/layer_norm/layer_norm_scale")
    b, bt = weight(mesh, "m/layer_prepostprocess/layer_norm/layer_norm_bias")
    assert torch.equal(st, torch.ones(8)) and torch.equal(bt, torch.zeros(8))
    ref = F.layer_norm(xt, (8,), st, bt, eps=1e-6)
    close(y.full(), ref)
    check_grads(y, [x, s, b], ref, [xt, st, bt])


@pytest.mark.parametrize("make_mesh", MESHES)
def test_layer_norm(make_mesh):
    case_layer_norm(make_mesh())


def test_mesh_tf_weights_nonzero():
    mesh = tm.Mesh("b:2;m:2", rules="batch:b;channels:m")
    x = mtf.import_tf_tensor(mesh, torch.tensor([[3, 1, 0], [1, 0, 0]]), "batch:2 channels:3")
    got = mtf.layers.weights_nonzero(x)
    assert got.dtype == torch.float32 and got.full().tolist() == [[1, 1, 0], [1, 0, 0]]


def case_cross_entropy(mesh: tm.Mesh) -> None:
    vocab = D("vocab", 6)
    lt = leaf(4, 6, seed=3)
    logits = tape(mtf.import_tf_tensor(mesh, lt, [D("batch", 4), vocab]))
    ids = torch.tensor([0, 5, 2, 3])
    targets = mtf.import_tf_tensor(mesh, ids, "batch:4")
    for z in (0.0, 1e-2):
        loss = mtf.layers.softmax_cross_entropy_with_logits(logits, targets, vocab, z_loss=z)
        ref = F.cross_entropy(lt, ids, reduction="none") + z * torch.logsumexp(lt, -1) ** 2
        close(loss.full(), ref)
        check_grads(loss, [logits], ref, [lt])
    soft = torch.softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(4)), -1)
    loss = mtf.layers.softmax_cross_entropy_with_logits(logits, mtf.import_tf_tensor(mesh, soft, logits.shape), vocab)
    ref = -(soft * torch.log_softmax(lt, -1)).sum(-1)
    close(loss.full(), ref)
    check_grads(loss, [logits], ref, [lt])
    z = torch.tensor([[1.0, 0, 1, 0, 0, 1]] * 4)
    loss = mtf.layers.sigmoid_cross_entropy_with_logits(logits, mtf.import_tf_tensor(mesh, z, logits.shape))
    ref = F.binary_cross_entropy_with_logits(lt, z, reduction="none")
    close(loss.full(), ref)
    check_grads(loss, [logits], ref, [lt])


@pytest.mark.parametrize("make_mesh", MESHES)
def test_cross_entropy(make_mesh):
    case_cross_entropy(make_mesh())


def test_cross_entropy_refuses_wrong_dims():
    mesh = one_device()
    logits = mtf.zeros(mesh, "batch:2 vocab:3")
    with pytest.raises(tm.DimError, match="hard targets"):
        mtf.layers.softmax_cross_entropy_with_logits(logits, mtf.zeros(mesh, "x:2", torch.int32), D("vocab", 3))
    with pytest.raises(tm.DimError, match="same shape"):
        mtf.layers.sigmoid_cross_entropy_with_logits(logits, mtf.zeros(mesh, "vocab:3 batch:2"))


def case_dense_relu_dense(mesh: tm.Mesh) -> None:
    channels, hidden = D("channels", 3), D("hidden", 6)
    xt = leaf(2, 3, seed=5)
    x = tape(mtf.import_tf_tensor(mesh, xt, [D("batch", 2), channels]))
    with mtf.variable_scope("f"):
        y = mtf.layers.dense_relu_dense(x, hidden_channels=hidden, is_training=False)
    assert tuple(y.full().shape) == (2, 3)  # Mesh TF's testDenseReluDense
    wi, wit = weight(mesh, "f/dense_relu_dense/wi/kernel")
    wo, wot = weight(mesh, "f/dense_relu_dense/wo/kernel")
    ref = torch.relu(xt @ wit) @ wot
    close(y.full(), ref)
    check_grads(y, [x, wi, wo], ref, [xt, wit, wot])


@pytest.mark.parametrize("make_mesh", MESHES)
def test_dense_relu_dense(make_mesh):
    case_dense_relu_dense(make_mesh())


def test_dense_relu_dense_dropout_broadcast():
    mesh = sim_2x2()
    x = mtf.ones(mesh, "batch:4 length:5 channels:3")
    tm.manual_seed(0)
    with mtf.variable_scope("drop"):
        y = mtf.layers.dense_relu_dense(
            x, D("hidden", 8), is_training=True, dropout=0.5, dropout_broadcast_dims=[D("length", 5)]
        )
    full = y.full()
    assert torch.allclose(full, full[:, :1].expand_as(full))  # one draw shared over length


# ---- attention -----------------------------------------------------------------------------


def case_dot_product_attention(mesh: tm.Mesh) -> None:
    """Mesh TF's testDotProductAttention sizes (2, 4, 5, 7, 3, 1), with a mask."""
    qt, kt, vt = leaf(2, 4, 5, 3, seed=6), leaf(2, 4, 7, 3, seed=7), leaf(2, 4, 7, 1, seed=8)
    b, h = D("batch", 2), D("heads", 4)
    q = tape(mtf.import_tf_tensor(mesh, qt, [b, h, D("length_q", 5), D("depth_k", 3)]))
    k = tape(mtf.import_tf_tensor(mesh, kt, [b, h, D("length_kv", 7), D("depth_k", 3)]))
    v = tape(mtf.import_tf_tensor(mesh, vt, [b, h, D("length_kv", 7), D("depth_v", 1)]))
    out = mtf.layers.dot_product_attention(q, k, v, mask=None, is_training=False)
    assert out.dims == ("batch", "heads", "length_q", "depth_v")
    ref = torch.softmax(qt @ kt.transpose(-1, -2), -1) @ vt
    close(out.full(), ref)
    check_grads(out, [q, k, v], ref, [qt, kt, vt])
    mt = torch.where(torch.arange(7)[None, :] > torch.arange(5)[:, None] + 1, -1e9, 0.0)
    mask = mtf.import_tf_tensor(mesh, mt, "length_q:5 length_kv:7")
    out = mtf.layers.dot_product_attention(q, k, v, mask=mask, is_training=False)
    ref = torch.softmax(qt @ kt.transpose(-1, -2) + mt, -1) @ vt
    close(out.full(), ref)
    check_grads(out, [q, k, v], ref, [qt, kt, vt])


@pytest.mark.parametrize("make_mesh", MESHES)
def test_dot_product_attention(make_mesh):
    case_dot_product_attention(make_mesh())


def ref_multihead(xt, mt, qkvo, mask=None):
    """Mesh TF's multihead_attention in plain torch: qkvo [4, heads, io, kv]."""
    wq, wk, wv, wo = qkvo
    q = torch.einsum("bli,hik->bhlk", xt, wq)
    k = torch.einsum("bmi,hik->bhmk", mt, wk)
    v = torch.einsum("bmi,hik->bhmk", mt, wv)
    logits = q @ k.transpose(-1, -2) + (0 if mask is None else mask)
    o = torch.softmax(logits, -1) @ v
    return torch.einsum("bhlk,hik->bli", o, wo)


def case_multihead_attention(mesh: tm.Mesh, kv: int = 16, heads: int = 4) -> dict:
    """Mesh TF's testMultiheadAttention (batch 2, length 8, channels 3), self-attention with the
    autoregressive mask, then attention over a memory with a padding mask."""
    tm.manual_seed(2)
    batch, length, channels = D("batch", 2), D("length", 8), D("channels", 3)
    xt = leaf(2, 8, 3, seed=10)
    x = tape(mtf.import_tf_tensor(mesh, xt, [batch, length, channels]))
    pos = mtf.range(mesh, length, torch.int32)
    mask = mtf.layers.attention_mask_autoregressive(pos)
    y = mtf.layers.multihead_attention(
        x, None, mask, kv_channels=D("kv_channels", kv), heads=D("heads", heads), is_training=False
    )
    assert tuple(y.full().shape) == (2, 8, 3)
    w, wt = weight(mesh, "multihead_attention/qkvo")
    assert w.dims == ("qkvo", "heads", "channels", "kv_channels")
    causal = torch.where(torch.arange(8)[None, :] > torch.arange(8)[:, None], -1e9, 0.0)
    ref = ref_multihead(xt, xt, wt, causal)
    close(y.full(), ref, 1e-4)
    check_grads(y, [x, w], ref, [xt, wt], tol=1e-4)
    mem_t = leaf(2, 5, 3, seed=11)
    memory = tape(mtf.import_tf_tensor(mesh, mem_t, [batch, D("memory_length", 5), channels]))
    ids = torch.tensor([[3, 4, 0, 0, 0], [1, 2, 3, 4, 5]])
    pad = mtf.layers.attention_mask_ignore_padding(mtf.import_tf_tensor(mesh, ids, "batch:2 length:5"))
    y2 = mtf.layers.multihead_attention(
        x, memory, pad, kv_channels=D("kv_channels", kv), heads=D("heads", heads), is_training=False
    )
    ref2 = ref_multihead(xt, mem_t, wt, torch.where(ids == 0, -1e9, 0.0)[:, None, None, :])
    close(y2.full(), ref2, 1e-4)
    check_grads(y2, [x, memory, w], ref2, [xt, mem_t, wt], tol=1e-4)
    return {"qkvo": wt.detach(), "y": y.full().detach().cpu()}


@pytest.mark.parametrize("make_mesh", MESHES)
@pytest.mark.parametrize("kv, heads", [(16, 4), (32, 8)])
def test_multihead_attention(make_mesh, kv, heads):
    case_multihead_attention(make_mesh(), kv, heads)


def test_multihead_attention_weights_are_mesh_tf_and_seeded():
    a, b = case_multihead_attention(one_device()), case_multihead_attention(sim_2x2())
    assert torch.equal(a["qkvo"], b["qkvo"])
    close(a["y"], b["y"], 1e-5)
    mesh = one_device()
    tm.manual_seed(0)
    h, io, kv = D("heads", 8), D("io", 64), D("kv", 16)
    wq, wk, wv, wo = mtf.layers.multihead_attention_params(mesh, h, io, kv, mtf.VariableDType(), combine=False)
    want = [64**-0.5 * 16**-0.25, 64**-0.5 * 16**-0.25, 64**-0.5, (64 * 8) ** -0.5]
    for w, s in zip((wq, wk, wv, wo), want):
        assert abs(w.full().std().item() / s - 1) < 0.05
    assert sorted(variables(mesh)) == ["k", "o", "q", "v"]


def test_incremental_self_attention_equals_the_causal_layer():
    mesh = sim_2x2()
    batch, length, ch = D("batch", 2), D("length", 4), D("channels", 3)
    heads, kv = D("heads", 2), D("kv", 5)
    xt = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(12))
    x = mtf.import_tf_tensor(mesh, xt, [batch, length, ch])
    mask = mtf.layers.attention_mask_autoregressive(mtf.range(mesh, length, torch.int32))
    with mtf.variable_scope("inc"):
        full = mtf.layers.multihead_attention(x, None, mask, kv, heads, is_training=False).full()
    k = v = mtf.zeros(mesh, [batch, heads, D("memory_length", 4), kv])
    for step in range(4):
        xs = mtf.import_tf_tensor(mesh, xt[:, step], [batch, ch])
        with mtf.variable_scope("inc"):
            y, k, v = mtf.layers.multihead_self_attention_incremental(xs, k, v, step, torch.float32, torch.float32)
        close(y.full(), full[:, step], 1e-5)


def test_masks_and_biases():
    mesh = sim_2x2()
    seg = mtf.import_tf_tensor(mesh, torch.tensor([[1, 1, 2], [1, 2, 2]]), "batch:2 length:3")
    m = mtf.layers.attention_mask_same_segment(seg)
    assert m.dims == ("batch", "length", "memory_length")
    want = torch.tensor([[[0, 0, 1], [0, 0, 1], [1, 1, 0]], [[0, 1, 1], [1, 0, 0], [1, 0, 0]]]) * -1e9
    assert torch.equal(m.full(), want)
    pos = mtf.range(mesh, D("length", 3), torch.int32)
    assert torch.equal(mtf.layers.attention_mask_autoregressive(pos).full(), torch.triu(torch.ones(3, 3), 1) * -1e9)
    ids = mtf.import_tf_tensor(mesh, torch.tensor([[4, 0, 2]]), "b:1 length:3")
    pad = mtf.layers.attention_mask_ignore_padding(ids)
    assert pad.dims == ("b", "memory_length") and torch.equal(pad.full(), torch.tensor([[0, -1e9, 0]]))
    bias = mtf.layers.attention_bias_local_block(mesh, D("w", 3), D("mw", 3))
    want = torch.cat([torch.zeros(3, 3), torch.triu(torch.ones(3, 3), 1)], 1) * -1e9
    assert bias.dims == ("w", "mw") and torch.equal(bias.full(), want)


def test_halo_exchange_on_split_blocks():
    mesh = tm.Mesh("b:2;m:2", rules="blocks:b")
    xt = torch.arange(12.0).reshape(4, 3)
    x = mtf.import_tf_tensor(mesh, xt, "blocks:4 block:3")
    blocks, block = D("blocks", 4), D("block", 3)
    for halo in (0, 2, 3, 5):
        left = mtf.layers.left_halo_exchange(x, blocks, block, halo).full()
        both = mtf.layers.halo_exchange(x, blocks, block, halo).full()
        flat = torch.cat([torch.zeros(halo), xt.flatten(), torch.zeros(halo)])
        for i in range(4):  # block i extended by the halo elements of the sequence before (and after) it
            s = halo + 3 * i
            assert torch.equal(left[i], flat[s - halo : s + 3])
            assert torch.equal(both[i], flat[s - halo : s + 3 + halo])
    wrapped = mtf.layers.halo_exchange(x, blocks, block, 1, wrap=True).full()
    assert wrapped[0].tolist() == [11.0, 0.0, 1.0, 2.0, 3.0]


def ref_masked_local_attention(xt, qkvo, window, block):
    """Mesh TF's masked_local_attention_1d in plain torch: query p of block b sees keys m with
    max(p - block + 1, b * block - window) <= m <= p; keys before 0 are zeros."""
    wq, wk, wv, wo = qkvo
    q = torch.einsum("bli,hik->bhlk", xt, wq)
    k = torch.einsum("bli,hik->bhlk", xt, wk)
    v = torch.einsum("bli,hik->bhlk", xt, wv)
    k = F.pad(k, (0, 0, window, 0))
    v = F.pad(v, (0, 0, window, 0))
    length = xt.shape[1]
    p = torch.arange(length)[:, None]
    m = torch.arange(-window, length)[None, :]
    visible = (m <= p) & (m >= p - block + 1) & (m >= (p // block) * block - window)
    logits = q @ k.transpose(-1, -2) + torch.where(visible, 0.0, -1e9)
    o = torch.softmax(logits, -1) @ v
    return torch.einsum("bhlk,hik->bli", o, wo)


def case_masked_local_attention(mesh, batch, length, io, kv, heads, window, length_per_split=None):
    xt = leaf(batch, length, io, seed=13)
    x = tape(mtf.import_tf_tensor(mesh, xt, [D("batch", batch), D("length_q", length), D("io_channels", io)]))
    with mtf.variable_scope("local"):
        y = mtf.layers.masked_local_attention_1d(
            x,
            D("kv_channels", kv),
            D("heads", heads),
            is_training=False,
            window_size=window,
            length_per_split=length_per_split,
        )
    assert tuple(y.full().shape) == (batch, length, io)  # Mesh TF's testMaskedLocalAttention1D
    w, wt = weight(mesh, "local/masked_local_attention_1d/qkvo")
    per_split = length if length_per_split is None else length_per_split
    block = max(window, 128)
    while per_split % block:
        block -= 1
    ref = ref_masked_local_attention(xt, wt, window, block)
    close(y.full(), ref, 1e-4)
    check_grads(y, [x, w], ref, [xt, wt], tol=1e-4)


@pytest.mark.parametrize("make_mesh", LOCAL_MESHES)
@pytest.mark.parametrize(
    "batch, length, io, kv, heads, window, per_split",
    [(2, 16, 3, 4, 2, 2, None), (1, 8, 5, 3, 1, 4, None), (2, 16, 3, 4, 2, 3, 4), (2, 16, 3, 4, 2, 6, 4)],
)
def test_masked_local_attention_1d(make_mesh, batch, length, io, kv, heads, window, per_split):
    case_masked_local_attention(make_mesh(), batch, length, io, kv, heads, window, per_split)


@pytest.mark.parametrize("make_mesh", MESHES)
@pytest.mark.parametrize("mask_right", [False, True])
def test_memory_compressed_attention(make_mesh, mask_right):
    mesh = make_mesh()
    xt = leaf(2, 8, 3, seed=14)
    x = tape(mtf.import_tf_tensor(mesh, xt, [D("batch", 2), D("length", 8), D("io", 3)]))
    y = mtf.layers.multihead_self_attention_memory_compressed(
        x, mask_right, 2, D("kv", 4), D("heads", 2), is_training=False, name="mc"
    )
    w, wt = weight(mesh, "mc/qkvo")
    wq, wk, wv, wo = wt
    mem = xt.reshape(2, 4, 2, 3).mean(2)
    q = torch.einsum("bli,hik->bhlk", xt, wq)
    k = torch.einsum("bmi,hik->bhmk", mem, wk)
    v = torch.einsum("bmi,hik->bhmk", mem, wv)
    logits = q @ k.transpose(-1, -2)
    if mask_right:
        logits = logits + torch.where(torch.arange(4)[None, :] * 2 + 1 > torch.arange(8)[:, None], -1e9, 0.0)
    logits = torch.cat([logits, torch.zeros(*logits.shape[:-1], 1)], -1)  # the extra logit 0
    o = torch.softmax(logits, -1)[..., :-1] @ v
    ref = torch.einsum("bhlk,hik->bli", o, wo)
    close(y.full(), ref, 1e-5)
    check_grads(y, [x, w], ref, [xt, wt], tol=1e-5)


@pytest.mark.parametrize("make_mesh", MESHES)
def test_embedding(make_mesh):
    mesh = make_mesh()
    tm.manual_seed(4)
    ids = torch.tensor([[1, 5, 0], [2, 2, 4]])
    with mtf.variable_scope("emb"):
        y = mtf.layers.embedding(mtf.import_tf_tensor(mesh, ids, "batch:2 length:3"), D("vocab", 6), D("d", 4), None)
    w, wt = weight(mesh, "emb/embedding")
    assert w.dims == ("vocab", "d")
    ref = wt[ids]
    close(y.full(), ref)
    check_grads(y, [w], ref, [wt])


# ---- the same cases on 4 gloo processes ---------------------------------------------------


def layers_on_ranks() -> dict:
    mesh = tm.Mesh("b:2;m:2", rules=RULES, backend="dist")
    out = case_dense(mesh)
    case_layer_norm(mesh)
    case_cross_entropy(tm.Mesh("b:2;m:2", rules=RULES, backend="dist"))
    case_dot_product_attention(tm.Mesh("b:2;m:2", rules=RULES, backend="dist"))
    out["mha"] = case_multihead_attention(tm.Mesh("b:2;m:2", rules=RULES, backend="dist"))["y"]
    case_masked_local_attention(tm.Mesh("b:2;m:2", rules=RULES_LOCAL, backend="dist"), 2, 16, 3, 4, 2, 3, 4)
    return out


def test_layers_on_gloo():
    want = case_dense(one_device())
    want["mha"] = case_multihead_attention(one_device())["y"]
    for got in run_distributed(layers_on_ranks, 4):
        assert torch.equal(got["w"], want["w"])
        close(got["y"], want["y"])
        close(got["mha"], want["mha"])
