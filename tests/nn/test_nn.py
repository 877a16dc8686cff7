"""tm.nn modules, forward and backward, against plain single-device torch over the same
global weights, on sim meshes where their dims are split; layout-invariant initialisation;
torch.nn plumbing (parameters, state_dict, optimizers); communication; errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference_lm import attention, feed_forward, global_weights, lm_logits, norm

import torchmesh as tm

RULES = "batch:dp;ff:tp;heads:tp;kv_heads:tp;vocab:tp"
MESHES = ["dp:2;tp:2", "tp:4"]


def make_mesh(spec: str) -> tm.Mesh:
    axes = {part.split(":")[0] for part in spec.split(";")}
    return tm.Mesh(spec, rules=";".join(r for r in RULES.split(";") if r.split(":")[1] in axes))


def check_module(module: torch.nn.Module, x: tm.MeshTensor, reference, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """module(x) and every gradient (weights and x) equal `reference(weights, x)` in plain torch."""
    weights = global_weights(module)
    x_ref = x.full().detach().clone().requires_grad_(x.dtype.is_floating_point)
    y = module(x)
    y_ref = reference(weights, x_ref)
    probe = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(7))
    (y * tm.distribute(probe, y.dims, x.mesh)).sum().backward()
    (y_ref * probe).sum().backward()
    torch.testing.assert_close(y.full(), y_ref, atol=atol, rtol=rtol)
    for name, p in tm.nn.mesh_parameters(module):
        torch.testing.assert_close(p.grad.full(), weights[name].grad, atol=atol, rtol=rtol, msg=name)
    if x.requires_grad:
        torch.testing.assert_close(x.grad.full(), x_ref.grad, atol=atol, rtol=rtol)


def activations(mesh: tm.Mesh, dims: str = "batch:4 seq:6 d_model:16") -> tm.MeshTensor:
    return tm.randn(dims, mesh, seed=11, requires_grad=True)


@pytest.mark.parametrize("spec", MESHES)
def test_linear_to_several_dims(spec):
    mesh = make_mesh(spec)
    lin = tm.nn.Linear(mesh, "d_model:16", "heads:4 d_head:3", seed=1)
    lin.bias = (tm.randn("heads:4 d_head:3", mesh, seed=2)).requires_grad_()  # a nonzero bias
    check_module(lin, activations(mesh), lambda w, x: torch.einsum("bsd,dhe->bshe", x, w["weight"]) + w["bias"])


@pytest.mark.parametrize("spec", MESHES)
def test_linear_contracting_a_split_dim(spec):
    mesh = make_mesh(spec)
    lin = tm.nn.Linear(mesh, "ff:8", "d_model:16", bias=False, seed=1)
    check_module(lin, activations(mesh, "batch:4 ff:8"), lambda w, x: x @ w["weight"])


@pytest.mark.parametrize("spec", MESHES)
def test_embedding_with_split_vocab(spec):
    mesh = make_mesh(spec)
    emb = tm.nn.Embedding(mesh, "vocab:12", "d_model:16", seed=3, std=1.0)
    ids = tm.distribute(torch.randint(0, 12, (4, 6), generator=torch.Generator().manual_seed(0)), "batch seq", mesh)
    check_module(emb, ids, lambda w, i: w["weight"][i])


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norms(kind):
    mesh = make_mesh("dp:2;tp:2")
    layer = tm.nn.LayerNorm(mesh, "d_model:16") if kind == "layernorm" else tm.nn.RMSNorm(mesh, "d_model:16")
    layer.weight = tm.randn("d_model:16", mesh, seed=4, requires_grad=True)
    if kind == "layernorm":
        layer.bias = tm.randn("d_model:16", mesh, seed=5, requires_grad=True)
    check_module(layer, activations(mesh), lambda w, x: _norm(w, x, kind))


def _norm(w: dict, x: torch.Tensor, kind: str) -> torch.Tensor:
    return norm({f"n.{k}": v for k, v in w.items()}, "n", x, kind)


def test_norm_over_a_split_dim_all_reduces():
    mesh = tm.Mesh("tp:2", rules="d_model:tp")
    layer = tm.nn.LayerNorm(mesh, "d_model:16")
    with tm.comm_stats() as stats:
        check_module(layer, activations(mesh), lambda w, x: _norm(w, x, "layernorm"))
    assert stats.counts.get("all_reduce", 0) >= 2


@pytest.mark.parametrize("spec", MESHES)
def test_feed_forward(spec):
    mesh = make_mesh(spec)
    ffn = tm.nn.FeedForward(mesh, "d_model:16", "ff:32", seed=6)
    ffn.w_in.bias = tm.randn("ff:32", mesh, seed=7, requires_grad=True)
    check_module(ffn, activations(mesh), lambda w, x: feed_forward({f"f.{k}": v for k, v in w.items()}, "f", x))


@pytest.mark.parametrize("spec,kv_heads", [("dp:2;tp:2", None), ("dp:2;tp:2", 2), ("tp:4", None), ("tp:4", 4)])
def test_attention_causal_grouped(spec, kv_heads):
    mesh = make_mesh(spec)
    attn = tm.nn.MultiHeadAttention(mesh, d_model=16, heads=8, d_head=4, kv_heads=kv_heads, seed=8)
    check_module(
        attn, activations(mesh), lambda w, x: attention({f"a.{k}": v for k, v in w.items()}, "a", x, 8, kv_heads)
    )


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_attention_with_seq_split_is_exact(kv_heads):
    """seq split over dp: the fused per-device kernel cannot be used; the einsum path (scores
    over a gathered kv_seq, causal mask by position) gives the same values."""
    mesh = tm.Mesh("dp:2;tp:2", rules="seq:dp;heads:tp")
    attn = tm.nn.MultiHeadAttention(mesh, d_model=16, heads=4, d_head=4, kv_heads=kv_heads, seed=8)
    with tm.comm_stats() as stats:
        check_module(
            attn, activations(mesh), lambda w, x: attention({f"a.{k}": v for k, v in w.items()}, "a", x, 4, kv_heads)
        )
    assert stats.counts.get("all_gather", 0) >= 2  # keys and values gathered along kv_seq


def test_attention_with_heads_split_communicates_once_forward():
    """Heads split over tp: attention is local per head (grouped heads too: the rearrange of
    heads into kv_heads x group stays local); only the output projection all-reduces."""
    mesh = tm.Mesh("tp:2", rules="heads:tp;kv_heads:tp")
    attn = tm.nn.MultiHeadAttention(mesh, d_model=16, heads=8, d_head=4, kv_heads=2, seed=8)
    x = tm.randn("batch:2 seq:6 d_model:16", mesh, seed=1)
    with tm.comm_stats() as stats:
        attn(x)
    assert stats.counts == {"all_reduce": 1}


@pytest.mark.parametrize("spec", MESHES)
def test_cross_entropy_over_split_vocab(spec):
    mesh = make_mesh(spec)
    logits = tm.randn("batch:4 seq:6 vocab:12", mesh, seed=9, requires_grad=True)
    targets = torch.randint(0, 12, (4, 6), generator=torch.Generator().manual_seed(1))
    loss = tm.nn.cross_entropy(logits, tm.distribute(targets, "batch seq", mesh))
    ref_logits = logits.full().detach().requires_grad_()
    ref = F.cross_entropy(ref_logits.reshape(-1, 12), targets.reshape(-1))
    loss.backward()
    ref.backward()
    assert loss.dims == () and abs(loss.item() - ref.item()) < 1e-5
    torch.testing.assert_close(logits.grad.full(), ref_logits.grad)


def test_lm_forward_backward_against_torch():
    mesh = make_mesh("dp:2;tp:2")
    config = tm.nn.LMConfig(vocab=16, d_model=16, heads=4, d_head=4, ff=32, layers=2, seq=6, norm="rmsnorm")
    model = tm.nn.TransformerLM(mesh, config, seed=0)
    ids = tm.distribute(torch.randint(0, 16, (4, 5), generator=torch.Generator().manual_seed(2)), "batch seq", mesh)
    # seq 5 < config.seq: positions sliced. RMSNorm of small embeddings makes large gradients: rtol 1e-4.
    check_module(model, ids, lambda w, i: lm_logits(w, i, config), atol=1e-4, rtol=1e-4)
    assert model.aux_loss().item() == 0.0


def test_init_is_layout_invariant():
    config = tm.nn.LMConfig(vocab=16, d_model=8, heads=4, d_head=2, ff=16, layers=2, seq=4, kv_heads=2)
    models = [tm.nn.TransformerLM(make_mesh(s), config, seed=5) for s in ("dp:2;tp:2", "dp:1;tp:2", "tp:1")]
    weights = [global_weights(m) for m in models]
    assert len(weights[0]) == 29
    for w in weights[1:]:
        assert w.keys() == weights[0].keys()
        for k in w:
            assert torch.equal(w[k], weights[0][k]), k
    other = global_weights(tm.nn.TransformerLM(make_mesh("tp:2"), config, seed=6))
    assert not torch.equal(other["blocks.0.attn.wq"], weights[0]["blocks.0.attn.wq"])
    assert not torch.equal(weights[0]["blocks.0.attn.wq"], weights[0]["blocks.1.attn.wq"])  # seeds per name


def test_torch_nn_plumbing():
    """parameters(), state_dict(), train/eval and torch.optim work on the shards unchanged."""
    mesh = make_mesh("dp:2;tp:2")
    ffn = tm.nn.FeedForward(mesh, "d_model:8", "ff:16", seed=0)
    assert len(list(ffn.parameters())) == 4 * 4  # 4 weights x 4 devices on sim
    assert "w_in.weight.3" in ffn.state_dict()
    before = ffn.w_in.weight.full().clone()
    opt = torch.optim.SGD(ffn.parameters(), lr=0.1)
    ffn(activations(mesh, "batch:4 d_model:8")).sum().backward()
    opt.step()
    after = ffn.w_in.weight
    assert not torch.equal(after.full(), before)
    for s in after.shards[1:]:  # replicas stay identical
        assert torch.equal(s, after.shard(tp=1)) or torch.equal(s, after.shard(tp=0))


def test_dropout_mask_is_layout_invariant():
    outs = []
    for spec in ("dp:2;tp:2", "tp:1"):
        mesh = make_mesh(spec)
        drop = tm.nn.Dropout(0.5)
        x = tm.ones("batch:4 seq:6 d_model:16", mesh)
        tm.manual_seed(3)
        outs.append(drop(x).full())
        drop.eval()
        assert torch.equal(drop(x).full(), x.full())
    assert torch.equal(outs[0], outs[1])
    assert set(outs[0].unique().tolist()) == {0.0, 2.0}


def test_errors():
    mesh = make_mesh("tp:4")
    with pytest.raises(ValueError, match=r"Linear: input: dims \(d_model\) are not dims"):
        tm.nn.Linear(mesh, "d_model:8", "ff:8")(tm.ones("batch:2 d:8", mesh))
    with pytest.raises(tm.ConfigError, match="heads=6 must be a multiple of kv_heads=4"):
        tm.nn.MultiHeadAttention(mesh, 8, heads=6, d_head=2, kv_heads=4)
    with pytest.raises(tm.ConfigError, match="norm='batchnorm'"):
        tm.nn.LMConfig(vocab=8, d_model=8, heads=2, d_head=4, ff=8, layers=1, seq=4, norm="batchnorm")
    config = tm.nn.LMConfig(vocab=8, d_model=8, heads=4, d_head=2, ff=8, layers=1, seq=4)
    model = tm.nn.TransformerLM(mesh, config)
    with pytest.raises(ValueError, match="seq=5 is longer than config.seq=4"):
        model(tm.zeros("batch:2 seq:5", mesh, dtype=torch.int64))
    with pytest.raises(ValueError, match="targets must have the logits' dims without 'vocab'"):
        tm.nn.cross_entropy(tm.zeros("batch:2 vocab:8", mesh), tm.zeros("seq:2", mesh, dtype=torch.int64))


def test_grouped_attention_with_kv_heads_split_unevenly():
    """kv_heads:2 over tp:4 (blocks 1,1,0,0; it used to be refused): the same values and input
    gradient as on one device."""

    def run(spec, rules):
        mesh = tm.Mesh(spec, rules=rules)
        attn = tm.nn.MultiHeadAttention(mesh, 8, heads=8, d_head=2, kv_heads=2, seed=0)
        x = tm.randn("batch:3 seq:5 d_model:8", mesh, seed=1, requires_grad=True)
        y = attn(x)
        (y * y).sum().backward()
        return y.full().detach(), x.grad.full()

    (y1, g1), (y4, g4) = run("dp:1", ""), run("tp:4", "heads:tp;kv_heads:tp")
    torch.testing.assert_close(y4, y1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g4, g1, rtol=1e-5, atol=1e-5)
