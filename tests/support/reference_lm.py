"""The TransformerLM of torchmesh.nn written in plain single-device torch, over the same
global weights (a {qualified name: tensor} dict, each tensor's dims in the order torchmesh
stores them), for parity tests: same weights in, same losses out."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import torchmesh as tm


def global_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every mesh parameter of `model` as a global leaf tensor that requires grad."""
    return {name: p.full().detach().clone().requires_grad_() for name, p in tm.nn.mesh_parameters(model)}


def norm(w: dict, prefix: str, x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "rmsnorm":
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w[f"{prefix}.weight"]
    return F.layer_norm(x, x.shape[-1:], w[f"{prefix}.weight"], w[f"{prefix}.bias"], 1e-5)


def attention(w: dict, prefix: str, x: torch.Tensor, heads: int, kv_heads: int | None) -> torch.Tensor:
    """x: [batch, seq, d_model]; weights [d_model, heads, d_head] and [heads, d_head, d_model]."""
    q = torch.einsum("bsd,dhe->bhse", x, w[f"{prefix}.wq"])
    k = torch.einsum("bsd,dhe->bhse", x, w[f"{prefix}.wk"])
    v = torch.einsum("bsd,dhe->bhse", x, w[f"{prefix}.wv"])
    if kv_heads not in (None, heads):
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return torch.einsum("bhse,hed->bsd", out, w[f"{prefix}.wo"])


def feed_forward(w: dict, prefix: str, x: torch.Tensor, activation: str = "gelu") -> torch.Tensor:
    act = {"gelu": F.gelu, "relu": torch.relu, "silu": F.silu}[activation]
    h = act(x @ w[f"{prefix}.w_in.weight"] + w[f"{prefix}.w_in.bias"])
    return h @ w[f"{prefix}.w_out.weight"] + w[f"{prefix}.w_out.bias"]


def lm_logits(w: dict, ids: torch.Tensor, config) -> torch.Tensor:
    """ids [batch, seq] -> logits [batch, seq, vocab] (dropout off)."""
    seq = ids.shape[1]
    x = w["embed.weight"][ids] + w["pos"][:seq]
    for i in range(config.layers):
        p = f"blocks.{i}"
        x = x + attention(w, f"{p}.attn", norm(w, f"{p}.norm1", x, config.norm), config.heads, config.kv_heads)
        x = x + feed_forward(w, f"{p}.ffn", norm(w, f"{p}.norm2", x, config.norm), config.activation)
    return norm(w, "norm", x, config.norm) @ w["head.weight"]


def lm_loss(w: dict, ids: torch.Tensor, targets: torch.Tensor, config) -> torch.Tensor:
    logits = lm_logits(w, ids, config)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_single_device(
    config, batch, steps: int, make_optimizer, loss_fn=lm_loss, max_norm: float | None = None, rules: str = "batch:dp"
) -> list[float]:
    """Plain torch on one device, from the global weights a one-device mesh gets for seed 0:
    the losses of `steps` steps on `batch(step)`, optionally with global-norm clipping."""
    weights = global_weights(tm.nn.TransformerLM(tm.Mesh("dp:1;tp:1", rules=rules), config, seed=0))
    optimizer = make_optimizer(list(weights.values()))
    losses = []
    for step in range(steps):
        ids = batch(step)
        loss = loss_fn(weights, ids[:, :-1], ids[:, 1:], config)
        optimizer.zero_grad()
        loss.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(weights.values()), max_norm)
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_same_losses(got: list[float], want: list[float], what: str) -> None:
    """Each step's loss equals the single-device one within 1e-4 relative."""
    assert len(got) == len(want), f"{what}: {len(got)} steps, single device {len(want)}"
    for step, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= 1e-4 * abs(b), f"{what}: step {step} loss {a} != single-device {b}"
