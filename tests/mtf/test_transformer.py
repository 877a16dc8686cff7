"""torchmesh.mtf.transformer.attention and .moe against Mesh TF's formulas in plain torch.

attention, AttentionParams (combined heads/key dims, Mesh TF's initializers) and
local_attention_1d against their formulas; the MoE layer's capacity (Mesh TF's 4 where
tm.nn.MoE gives 5), groups, top-2 gating (every second-place policy, importance, the
second-place loss) and the whole transformer_moe_layer_v1 against a plain-torch transcription
of Mesh TF's moe.py, forward and gradients, on one device and on a 2x2 sim mesh with the batch,
experts and heads split; one 4-process gloo launch.
"""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn.functional as F
from harness import run_distributed
from test_layers import check_grads, close, leaf, tape, variables, weight

import torchmesh as tm
import torchmesh.mtf as mtf
from torchmesh.nn.moe import expert_capacity as tm_expert_capacity

D = mtf.Dimension
moe = mtf.transformer.moe
att = mtf.transformer.attention
RULES = "batch:b;heads:m;experts:m"
LAYOUT, MESH_SHAPE = "batch:b,experts:m", "b:2,m:2"  # Mesh TF's strings, given to the MoE layer


def one_device() -> tm.Mesh:
    return tm.Mesh("b:1", rules="batch:b")


def sim_2x2() -> tm.Mesh:
    return tm.Mesh("b:2;m:2", rules=RULES)


MESHES = [pytest.param(one_device, id="1dev"), pytest.param(sim_2x2, id="b2m2")]


# ---- attention -----------------------------------------------------------------------------


def case_attention_params(mesh: tm.Mesh) -> torch.Tensor:
    tm.manual_seed(7)
    d_model, d_kv, heads = D("d_model", 6), D("d_kv", 4), D("heads", 2)
    xt = leaf(2, 5, 6, seed=20)
    x = tape(mtf.import_tf_tensor(mesh, xt, [D("batch", 2), D("length", 5), d_model]))
    with mtf.variable_scope("att"):
        p = att.attention_params_simple(mesh, d_model, d_kv, heads, mtf.VariableDType())
    assert p.wq.dims == ("d_model", "heads") and p.wq.sizes["heads"] == 8 and p.wo.dims == ("heads", "d_model")
    q = p.compute_q(x)
    k = p.compute_k(mtf.layers.rename_length_to_memory_length(x))
    v = p.compute_v(mtf.layers.rename_length_to_memory_length(x))
    assert q.dims == ("batch", "length", "heads", "d_kv")
    mask = mtf.layers.attention_mask_autoregressive(mtf.range(mesh, D("length", 5), torch.int32))
    o = att.attention(q, k, v, D("memory_length", 5), d_kv, d_kv, bias=mask)
    y = p.compute_output(o, output_shape=x.shape)
    ws = {n: weight(mesh, f"att/{n}") for n in "qkvo"}
    wq, wk, wv, wo = (ws[n][1] for n in "qkvo")
    qt = (xt @ wq).reshape(2, 5, 2, 4)
    kt = (xt @ wk).reshape(2, 5, 2, 4)
    vt = (xt @ wv).reshape(2, 5, 2, 4)
    logits = torch.einsum("blhk,bmhk->bhlm", qt, kt) + torch.triu(torch.ones(5, 5), 1) * -1e9
    ot = torch.einsum("bhlm,bmhk->blhk", torch.softmax(logits, -1), vt)
    ref = ot.reshape(2, 5, 8) @ wo
    close(y.full(), ref, 1e-5)
    check_grads(y, [x, *(ws[n][0] for n in "qkvo")], ref, [xt, wq, wk, wv, wo], tol=1e-5)
    return wq.detach()


@pytest.mark.parametrize("make_mesh", MESHES)
def test_attention_params_and_attention(make_mesh):
    case_attention_params(make_mesh())


def test_attention_params_initializers_and_options():
    assert torch.equal(case_attention_params(one_device()), case_attention_params(sim_2x2()))
    mesh = one_device()
    tm.manual_seed(0)
    d, kv, h = D("d_model", 64), D("d_kv", 16), D("heads", 4)
    p = att.attention_params_simple(mesh, d, kv, h, None)
    for w, s in ((p.wq, 64**-0.5 * 16**-0.5), (p.wk, 64**-0.5), (p.wv, 64**-0.5), (p.wo, 64**-0.5)):
        assert abs(w.full().std().item() / s - 1) < 0.05
    with mtf.variable_scope("split"):
        p2 = att.AttentionParams(mesh, d, d, d, kv, kv, [h], [h], None, combine_dims=False, shared_kv=True)
    assert p2.wq.dims == ("d_model", "heads", "d_kv") and p2.wkv.dims == ("d_model", "heads", "d_kv")
    with pytest.raises(tm.ArgumentError, match="shared_kv"):
        p2.compute_k(mtf.zeros(mesh, [d]))


@pytest.mark.parametrize("make_mesh", MESHES)
def test_attention_dropout_and_float32_logits(make_mesh):
    mesh = make_mesh()
    q = mtf.ones(mesh, "batch:2 heads:2 length:3 d_k:4", dtype=torch.bfloat16)
    k = mtf.ones(mesh, "batch:2 heads:2 memory_length:5 d_k:4", dtype=torch.bfloat16)
    v = mtf.ones(mesh, "batch:2 heads:2 memory_length:5 d_v:2", dtype=torch.bfloat16)
    dims = (D("memory_length", 5), D("d_k", 4), D("d_v", 2))
    out = att.attention(q, k, v, *dims)
    assert out.dtype == torch.bfloat16 and torch.equal(out.full(), torch.ones(2, 2, 3, 2, dtype=torch.bfloat16))
    tm.manual_seed(0)
    dropped = att.attention(q, k, v, *dims, dropout_rate=0.5, context=NS(train=True)).full()
    assert set(dropped.float().flatten().tolist()) != {1.0}
    assert torch.equal(att.attention(q, k, v, *dims, dropout_rate=0.5, context=NS(train=False)).full(), out.full())


def ref_local_attention(qt, kt, vt, radius, autoregressive, seq):
    length = qt.shape[-2]
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # memory - query
    visible = (rel > -radius) & (rel <= (0 if autoregressive else radius)) & (seq[:, None] == seq[None, :])
    logits = qt @ kt.transpose(-1, -2) + torch.where(visible, 0.0, -1e9)
    return torch.softmax(logits, -1) @ vt


@pytest.mark.parametrize("make_mesh", [*MESHES, pytest.param(lambda: tm.Mesh("b:2;m:2", rules="length:m"), id="len")])
@pytest.mark.parametrize("radius, autoregressive, splits", [(2, True, 1), (3, False, 2), (8, True, 2), (2, False, 4)])
def test_local_attention_1d(make_mesh, radius, autoregressive, splits):
    mesh = make_mesh()
    length, dk = D("length", 16), D("d_k", 3)
    qt, kt, vt = leaf(2, 16, 3, seed=21), leaf(2, 16, 3, seed=22), leaf(2, 16, 3, seed=23)
    shape = [D("batch", 2), length, dk]
    q, k, v = (tape(mtf.import_tf_tensor(mesh, t, shape)) for t in (qt, kt, vt))
    seq_t = torch.tensor([1] * 6 + [2] * 10)
    seq = mtf.import_tf_tensor(mesh, seq_t, [length])
    out = att.local_attention_1d(
        q,
        k,
        v,
        length,
        dk,
        dk,
        fully_autoregressive=autoregressive,
        length_dim_num_splits=splits,
        radius=radius,
        sequence_id=seq,
    )
    assert out.dims == ("batch", "length", "d_k")
    ref = ref_local_attention(qt, kt, vt, radius, autoregressive, seq_t)
    close(out.full(), ref, 1e-5)
    check_grads(out, [q, k, v], ref, [qt, kt, vt], tol=1e-5)


# ---- mixture of experts --------------------------------------------------------------------


def test_expert_capacity_is_mesh_tf_s():
    assert moe.expert_capacity(8, 4, 1.25) == 4  # int(2.5) = 2, raised to moe_min_expert_capacity 4
    assert tm_expert_capacity(8, 4, 2, 1.25) == 5  # torchmesh's own: ceil(2 * 8 * 1.25 / 4)
    assert moe.expert_capacity(64, 4, 1.25) == 20 and moe.expert_capacity(64, 4, 2.0) == 32
    assert moe.expert_capacity(64, 4, 8.0) == 64 and moe.expert_capacity(8, 4, 1.0, min_expert_capacity=1) == 2
    assert moe.split_into_groups(4096, 1024, 2) == (4, 1024)
    assert moe.split_into_groups(16, 4, 2) == (4, 4)
    assert moe.split_into_groups(16, 1024, 2) == (2, 8)
    assert moe.split_into_groups(24, 5, 4) == (4, 6)
    with pytest.raises(tm.DimError, match="multiple"):
        moe.split_into_groups(10, 4, 4)


def ref_top_2(x, wg, capacity, policy="all", threshold=0.2, importance=None, second_loss=False, draw=None):
    """Mesh TF's _top_2_gating in plain torch: x [G, S, M], wg [M, E] -> dispatch, combine, loss."""
    raw = torch.softmax(x @ wg, -1)
    e = raw.shape[-1]
    gate_1, index_1 = raw.max(-1)
    mask_1 = F.one_hot(index_1, e).float()
    proxy = raw
    if importance is not None:
        first = (importance == 1.0).float()
        mask_1, gate_1, proxy = mask_1 * first[..., None], gate_1 * first, proxy * first[..., None]
    without_1 = raw * (1 - mask_1)
    gate_2, index_2 = without_1.max(-1)
    mask_2 = F.one_hot(index_2, e).float()
    if importance is not None:
        mask_2 = mask_2 * (importance > 0).float()[..., None]
    denom = gate_1 + gate_2 + 1e-9
    gate_1, gate_2 = gate_1 / denom, gate_2 / denom
    loss = (proxy.mean(1) * mask_1.mean(1)).mean() * e * e
    if second_loss:
        normalized = without_1 / (without_1.sum(-1, keepdim=True) + 1e-9)
        loss = loss + (normalized.mean(1) * mask_2.mean(1)).mean() * e * e * 0.5
    if policy == "none":
        mask_2 = torch.zeros_like(mask_2)
    elif policy == "threshold":
        mask_2 = mask_2 * (gate_2 > threshold).float()[..., None]
    elif policy == "random":
        mask_2 = mask_2 * (draw < gate_2 / threshold).float()[..., None]
    pos_1 = (mask_1.cumsum(1) - mask_1) * mask_1
    mask_1 = mask_1 * (pos_1 < capacity).float()
    count_1 = mask_1.sum(1, keepdim=True)
    flat_1 = mask_1.sum(-1)
    pos_1 = pos_1.sum(-1)
    gate_1 = gate_1 * flat_1
    pos_2 = (mask_2.cumsum(1) - mask_2 + count_1) * mask_2
    mask_2 = mask_2 * (pos_2 < capacity).float()
    flat_2 = mask_2.sum(-1)
    gate_2 = gate_2 * flat_2
    pos_2 = pos_2.sum(-1)

    def slot(gate, flat, index, pos):
        hot_pos = F.one_hot(pos.long().clamp(max=capacity - 1), capacity) * (pos < capacity)[..., None]
        return (gate * flat)[..., None, None] * F.one_hot(index, e)[..., None] * hot_pos[..., None, :]

    combine = slot(gate_1, flat_1, index_1, pos_1) + slot(gate_2, flat_2, index_2, pos_2)
    return (combine != 0).float(), combine, loss


def hparams(**kw) -> moe.HParams:
    hp = moe.set_default_moe_hparams(moe.HParams())
    hp.moe_num_experts, hp.moe_hidden_size, hp.moe_group_size = 4, 6, 8
    hp.moe_use_second_place_loss = False
    for k, v in kw.items():
        setattr(hp, k, v)
    return hp


@pytest.mark.parametrize("make_mesh", MESHES)
@pytest.mark.parametrize(
    "policy, importance, second_loss, capacity",
    [("all", False, False, 4), ("threshold", False, True, 3), ("none", True, False, 4), ("all", True, True, 2)],
)
def test_top_2_gating(make_mesh, policy, importance, second_loss, capacity):
    mesh = make_mesh()
    tm.manual_seed(3)
    xt = leaf(2, 8, 5, seed=24)
    x = tape(mtf.import_tf_tensor(mesh, xt, [D("batch", 2), D("group", 8), D("d", 5)]))
    imp_t = torch.tensor([[1.0, 1, 0.5, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 0.5, 1, 0]]) if importance else None
    imp = mtf.import_tf_tensor(mesh, imp_t, "batch:2 group:8") if importance else None
    hp = hparams(moe_second_policy_eval=policy, moe_second_threshold_eval=0.3, moe_use_second_place_loss=second_loss)
    with mtf.variable_scope("gate"):
        dispatch, combine, loss = moe.top_2_gating(
            x, None, D("experts", 4), D("expert_capacity", capacity), hp, False, mtf.VariableDType(), importance=imp
        )
    assert combine.dims == ("batch", "group", "experts", "expert_capacity") and loss.dims == ()
    w, wt = weight(mesh, "gate/top_2_gating/kernel")
    want_d, want_c, want_loss = ref_top_2(xt, wt, capacity, policy, 0.3, imp_t, second_loss)
    assert torch.equal(dispatch.full(), want_d)
    close(combine.full(), want_c)
    close(loss.full(), want_loss)
    check_grads(combine, [x, w], want_c, [xt, wt])
    check_grads(loss, [x, w], want_loss, [xt, wt])


def test_top_2_gating_random_policy_is_the_same_on_every_mesh():
    got = []
    for mesh in (one_device(), sim_2x2()):
        tm.manual_seed(4)
        x = mtf.import_tf_tensor(
            mesh, torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(1)), "batch:2 group:8 d:5"
        )
        hp = hparams(moe_second_policy_train="random", moe_second_threshold_train=0.5)
        d, c, _ = moe.top_2_gating(x, None, D("experts", 4), D("expert_capacity", 8), hp, True, None)
        got.append(d.full())
    assert torch.equal(got[0], got[1])
    firsts = 2 * 8
    assert firsts < got[0].sum() < 2 * firsts  # some second choices kept, not all
    with pytest.raises(tm.ConfigError, match="policy"):
        moe.top_2_gating(
            x, None, D("experts", 4), D("expert_capacity", 8), hparams(moe_second_policy_eval="x"), False, None
        )


def ref_moe_layer(xt, wg, wi, wo, num_groups, capacity, **gating):
    b, length, m = xt.shape
    xs = xt.reshape(num_groups, -1, m)
    dispatch, combine, loss = ref_top_2(xs, wg, capacity, **gating)
    expert_inputs = torch.einsum("gsm,gsec->egcm", xs, dispatch)
    h = torch.relu(torch.einsum("egcm,emh->egch", expert_inputs, wi))
    out = torch.einsum("egch,ehn->egcn", h, wo)
    return torch.einsum("egcn,gsec->gsn", out, combine).reshape(b, length, -1), loss


def case_moe_layer(mesh: tm.Mesh) -> dict:
    tm.manual_seed(5)
    xt = leaf(4, 4, 6, seed=25)
    d_model = D("d_model", 6)
    x = tape(mtf.import_tf_tensor(mesh, xt, [D("batch", 4), D("length", 4), d_model]))
    hp = hparams(moe_second_policy_eval="all", moe_capacity_factor_eval=1.25)
    with mtf.variable_scope("moe"):
        y, loss = moe.transformer_moe_layer_v1(
            x, d_model, hp, False, mtf.VariableDType(), layout=LAYOUT, mesh_shape=MESH_SHAPE
        )
    assert y.dims == ("batch", "length", "d_model")
    # 16 positions, batch split 2 ways: 2 groups of 8; capacity max(int(8 * 1.25 / 4), 4) = 4
    wg, wgt = weight(mesh, "moe/top_2_gating/kernel")
    wi, wit = weight(mesh, "moe/wi/kernel")
    wo, wot = weight(mesh, "moe/wo/kernel")
    assert wi.dims == ("experts", "d_model", "expert_hidden") and wo.dims == ("experts", "expert_hidden", "d_model")
    ref, ref_loss = ref_moe_layer(xt, wgt, wit, wot, 2, 4, policy="all")
    close(y.full(), ref, 1e-5)
    close(loss.full(), ref_loss * 1e-2)
    check_grads(y, [x, wg, wi, wo], ref, [xt, wgt, wit, wot], tol=1e-5)
    check_grads(loss, [x, wg], ref_loss * 1e-2, [xt, wgt], tol=1e-6)
    return {"y": y.full().detach().cpu(), "wi": wit.detach()}


@pytest.mark.parametrize("make_mesh", MESHES)
def test_transformer_moe_layer_v1(make_mesh):
    case_moe_layer(make_mesh())


def test_moe_layer_groups_follow_the_mesh_and_moe1d():
    """Without layout/mesh_shape the inputs' mesh rules give the batch's split (what Mesh TF's
    MoE1D passes); MoE1D reshapes an input without a length dim and appends its loss."""
    a, b = case_moe_layer(one_device()), case_moe_layer(sim_2x2())
    assert torch.equal(a["wi"], b["wi"])
    close(a["y"], b["y"], 1e-5)
    mesh = sim_2x2()
    tm.manual_seed(5)
    d_model = D("d_model", 6)
    xt = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    model = NS(model_dim=d_model, layout=None, mesh_shape=None, ensemble_dim=None)
    ctx = NS(
        model=model,
        train=False,
        variable_dtype=mtf.VariableDType(),
        length_dim=D("length", 4),
        nonpadding=None,
        num_microbatches=2,
        losses=[],
    )
    layer = moe.MoE1D(num_experts=4, hidden_size=6, group_size=8, second_policy_eval="none")
    with mtf.variable_scope("moe1d"):
        y = layer.call(ctx, mtf.import_tf_tensor(mesh, xt, [D("batch", 4), d_model]))
    assert y.dims == ("batch", "d_model") and len(ctx.losses) == 1
    vs = variables(mesh)
    wgt, wit, wot = (vs[f"moe1d/{n}/kernel"].value.full().detach() for n in ("top_2_gating", "wi", "wo"))
    ref, ref_loss = ref_moe_layer(xt[:, None], wgt, wit, wot, 2, 4, policy="none")  # batch split 2 ways by the rules
    close(y.full(), ref[:, 0], 1e-5)
    close(ctx.losses[0].full(), ref_loss * 1e-2 / 2)  # divided by num_microbatches
    with pytest.raises(tm.ConfigError, match="switch"):
        moe.transformer_moe_layer_v1(
            mtf.zeros(mesh, "batch:2 length:2 d_model:6"), d_model, hparams(moe_gating="switch"), False, None
        )


# ---- the same cases on 4 gloo processes ---------------------------------------------------


def transformer_on_ranks() -> dict:
    case_attention_params(tm.Mesh("b:2;m:2", rules=RULES, backend="dist"))
    return case_moe_layer(tm.Mesh("b:2;m:2", rules=RULES, backend="dist"))


def test_transformer_on_gloo():
    want = case_moe_layer(one_device())
    for got in run_distributed(transformer_on_ranks, 4):
        assert torch.equal(got["wi"], want["wi"])
        close(got["y"], want["y"], 1e-5)
