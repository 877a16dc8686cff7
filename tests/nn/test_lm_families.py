"""The decoder-only families of one TransformerLM (issue 14.1): GPT-2/nanoGPT (learned positions,
biases, tanh-GELU, tied embedding) and Llama/Mistral (RoPE, RMSNorm, SwiGLU, grouped-query
attention, no biases). References are torch's functions and transformers' models: RoPE against
transformers' Llama rotary embedding, the feed-forwards against torch, one training step's loss
and every gradient against transformers' own backward on one device; the families give the same
numbers on 1 device and on dp:2;tp:2 with the vocab 101 split unevenly; the default config is
today's model; the tied table's gradient all-reduces are counted."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import torchmesh as tm
from torchmesh.nn import hf
from torchmesh.nn.rope import rope

RULES = "batch:dp;heads:tp;kv_heads:tp;ff:tp;vocab:tp"
SMALL = dict(vocab=101, d_model=16, heads=4, d_head=4, ff=24, layers=2, seq=8)
IDS = torch.randint(0, 101, (4, 8), generator=torch.Generator().manual_seed(1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """Within `rel` of b's largest value; a gradient that is zero in exact arithmetic (the key
    bias's: softmax ignores a constant per query) is rounding noise, compared absolutely."""
    return float((a - b).abs().max()) <= rel * float(b.abs().max()) + 1e-7


def test_default_config_is_todays_model():
    config = tm.nn.LMConfig(vocab=32, d_model=8, heads=2, d_head=4, ff=16, layers=1, seq=4)
    model = tm.nn.TransformerLM(tm.Mesh("dp:1"), config, seed=0)
    names = [n for n, _ in tm.nn.mesh_parameters(model)]
    assert names == [
        "pos", "embed.weight", "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.wq",
        "blocks.0.attn.wk", "blocks.0.attn.wv", "blocks.0.attn.wo", "blocks.0.norm2.weight", "blocks.0.norm2.bias",
        "blocks.0.ffn.w_in.weight", "blocks.0.ffn.w_in.bias", "blocks.0.ffn.w_out.weight", "blocks.0.ffn.w_out.bias",
        "norm.weight", "norm.bias", "head.weight",
    ]  # fmt: skip
    assert (config.positions, config.norm_eps, config.bias, config.tie_embeddings) == ("learned", None, None, False)
    assert model.norm.eps == 1e-5 and model.blocks[0].ffn.activation == "gelu"


def test_presets():
    g = tm.nn.LMConfig.gpt2(**SMALL)
    assert (g.positions, g.norm, g.activation, g.bias, g.tie_embeddings) == (
        "learned",
        "layernorm",
        "gelu_tanh",
        True,
        True,
    )
    ll = tm.nn.LMConfig.llama(**SMALL, kv_heads=2)
    assert (ll.positions, ll.norm, ll.activation, ll.bias, ll.kv_heads) == ("rope", "rmsnorm", "swiglu", False, 2)
    model = tm.nn.TransformerLM(tm.Mesh("dp:1"), ll, seed=0)
    names = {n for n, _ in tm.nn.mesh_parameters(model)}
    assert "pos" not in names and "blocks.0.norm1.bias" not in names and "head.weight" in names
    assert {"blocks.0.ffn.w_gate.weight", "blocks.0.ffn.w_up.weight", "blocks.0.ffn.w_down.weight"} <= names
    assert model.norm.eps == 1e-6


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(positions="alibi"), "positions='alibi'"),
        (dict(positions="rope", d_head=3), "even d_head"),
        (dict(activation="tanh"), "activation='tanh'"),
        (dict(norm_eps=0.0), "norm_eps must be positive"),
    ],
)
def test_config_errors(fields, match):
    with pytest.raises(tm.ConfigError, match=match):
        tm.nn.LMConfig(**{**SMALL, **fields})


@pytest.mark.parametrize("rules", ["batch:dp;heads:tp", "batch:dp;seq:tp"])
def test_rope_equals_transformers_llama(rules):
    """HF's rotary embedding and apply_rotary_pos_emb on (batch, heads, seq, d_head); ours on
    named dims, with heads or seq split, forward and backward."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, rope_theta=500.0)
    q_ref = torch.randn(2, 4, 6, 8, requires_grad=True)
    k_ref = torch.randn(2, 4, 6, 8, requires_grad=True)
    cos, sin = LlamaRotaryEmbedding(config)(q_ref, torch.arange(6)[None])
    q_out, k_out = apply_rotary_pos_emb(q_ref, k_ref, cos, sin)

    mesh = tm.Mesh("dp:2;tp:2", rules=rules)
    q = tm.distribute(q_ref.detach().transpose(1, 2), "batch seq heads d_head", mesh, requires_grad=True)
    out = rope(q, theta=500.0)
    assert rel_err(out.full().detach(), q_out.transpose(1, 2).detach()) < 1e-6
    weights = torch.randn(2, 6, 4, 8)
    (out * tm.distribute(weights, "batch seq heads d_head", mesh)).sum().backward()
    (q_out * weights.transpose(1, 2)).sum().backward()
    assert rel_err(q.grad.full(), q_ref.grad.transpose(1, 2)) < 1e-6


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_feed_forward_activations_equal_torch(activation):
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp")
    mlp = tm.nn.FeedForward(mesh, "d_model:8", "ff:12", activation, seed=0, bias=activation == "gelu_tanh")
    x_ref = torch.randn(4, 8, requires_grad=True)
    x = tm.distribute(x_ref.detach(), "batch d_model", mesh, requires_grad=True)
    w = {n: p.full().detach().requires_grad_() for n, p in tm.nn.mesh_parameters(mlp)}
    if activation == "swiglu":
        ref = (F.silu(x_ref @ w["w_gate.weight"]) * (x_ref @ w["w_up.weight"])) @ w["w_down.weight"]
    else:
        h = F.gelu(x_ref @ w["w_in.weight"] + w["w_in.bias"], approximate="tanh")
        ref = h @ w["w_out.weight"] + w["w_out.bias"]
    y = mlp(x)
    assert rel_err(y.full().detach(), ref.detach()) < 1e-6
    (y * y).sum().backward()
    (ref * ref).sum().backward()
    assert rel_err(x.grad.full(), x_ref.grad) < 1e-5
    for name, p in tm.nn.mesh_parameters(mlp):
        assert rel_err(p.grad.full(), w[name].grad) < 1e-5, name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layout_invariant(family):
    """The same seed gives the same logits and gradients on 1 device and on dp:2;tp:2."""
    preset = getattr(tm.nn.LMConfig, family)
    config = preset(**SMALL, **({"kv_heads": 2} if family == "llama" else {}))
    results = []
    for shape in ("dp:1;tp:1", "dp:2;tp:2"):
        mesh = tm.Mesh(shape, rules=RULES)
        model = tm.nn.TransformerLM(mesh, config, seed=5)
        ids = tm.distribute(IDS, "batch seq", mesh)
        loss = tm.nn.cross_entropy(model(ids), ids)
        loss.backward()
        results.append((loss.item(), {n: p.grad.full() for n, p in tm.nn.mesh_parameters(model)}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) <= 1e-5 * loss_a
    for name in grads_a:
        assert close(grads_b[name], grads_a[name]), name


def _hf_model(family: str):
    transformers = pytest.importorskip("transformers")
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=101, n_embd=16, n_head=4, n_layer=2, n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=101, hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, max_position_embeddings=8,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _as_ours(hf_tensor: torch.Tensor, weight: hf.HFWeight, dims: tuple[str, ...], sizes: dict[str, int]):
    """Our weight (dims `dims`) cut out of its Hugging Face tensor, for comparing gradients."""
    widths = [math.prod(sizes[n] for n in group) for group in weight.axes]
    piece = hf_tensor[tuple(slice(o, o + w) for o, w in zip(weight.offsets(), widths))]
    names = [n for group in weight.axes for n in group]
    return piece.reshape([sizes[n] for n in names]).permute([names.index(n) for n in dims])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_step_equals_transformers(family):
    """One step on one device: our loss (cross_entropy of the next token) equals transformers'
    `labels=` loss, and every gradient equals transformers' backward."""
    hf_model = _hf_model(family).train()
    loss_ref = hf_model(IDS, labels=IDS).loss
    loss_ref.backward()

    mesh = tm.Mesh("dp:1;tp:1", rules=RULES)
    model = tm.nn.TransformerLM.from_hf(hf_model, mesh).train()
    ids = tm.distribute(IDS, "batch seq", mesh)
    loss = tm.nn.cross_entropy(model(tm.slice(ids, "seq", 0, 7)), tm.slice(ids, "seq", 1, 8))
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * loss_ref.item()

    mapping = hf.weight_map(model.config)
    state = dict(hf_model.named_parameters())
    for name, p in tm.nn.mesh_parameters(model):
        key = mapping[name].key
        ref = _as_ours(state[key].grad, mapping[name], p.dims, p.sizes)
        grad = p.grad.full()
        assert abs(grad.norm() - ref.norm()) <= 1e-4 * ref.norm() + 1e-7, name
        assert close(grad, ref), name


def test_tied_table_gradient_all_reduces_once():
    """On dp:2 the tied table's gradient is all-reduced once per step, not once per use: its
    two partial gradients (the embedding lookup's and the output projection's) are summed
    before the data-parallel reduction (`torchmesh.comm.grad_sync`). Untied, the head is
    its own parameter, so the step all-reduces one more table's bytes; with bucketing off,
    every use reduces on its own and the tied table costs two all-reduces."""
    mesh = tm.Mesh("dp:2", rules="batch:dp")
    table_bytes = 16 * 101 * 4
    reduced = {}
    for bucketed in (True, False):
        tm.nn.configure_grad_sync(mesh, enabled=bucketed)
        for tie in (False, True):
            model = tm.nn.TransformerLM(mesh, tm.nn.LMConfig.gpt2(**SMALL, tie_embeddings=tie), seed=0)
            ids = tm.distribute(IDS, "batch seq", mesh)
            with tm.comm_stats() as stats:
                tm.nn.cross_entropy(model(ids), ids).backward()
            backward = [r for r in stats.records if r.kind == "all_reduce" and r.phase == "backward"]
            tables = [r for r in backward if sorted(r.shape) == [16, 101]]
            reduced[bucketed, tie] = (sum(r.bytes for r in backward), len(tables))
    tm.nn.configure_grad_sync(mesh)
    assert reduced[True, False][0] - reduced[True, True][0] == table_bytes  # tied: one table fewer
    assert reduced[False, True] == (reduced[False, False][0], 2)  # per use: the table twice
    assert reduced[False, False][1] == 2  # untied: the embedding and the head
