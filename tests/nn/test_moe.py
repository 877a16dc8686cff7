"""MoE against a plain-torch reference of the same routing (forward and backward), on sim
meshes and on gloo processes; dispatch and combine are all-to-alls, never all-gathers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from harness import run_distributed
from reference_lm import assert_same_losses, train_single_device

import torchmesh as tm
from torchmesh.nn.moe import MoE, expert_capacity

SIZES = dict(batch=4, seq=6, d_model=8, ff=16)


def config(top_k: int = 2, num_experts: int = 4, capacity_factor: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(
        d_model=SIZES["d_model"],
        ff=SIZES["ff"],
        num_experts=num_experts,
        top_k=top_k,
        capacity_factor=capacity_factor,
        dropout=0.0,
    )


def reference(x, router, wi, wo, top_k: int, capacity_factor: float):
    """The routing written densely in torch: every expert runs on every token, and the
    output keeps each token's top-k experts that still had room (first come, first served
    along the sequence, all first choices before any second choice)."""
    _, seq, _ = x.shape
    e = router.shape[1]
    cap = expert_capacity(seq, e, top_k, capacity_factor)
    probs = torch.softmax(x @ router, -1)
    expert_out = torch.einsum("bsef,efd->bsed", F.gelu(torch.einsum("bsd,edf->bsef", x, wi)), wo)
    candidates, taken = probs.detach().clone(), 0.0
    picks = []
    for k in range(top_k):
        mask = F.one_hot(candidates.argmax(-1), e).float()
        if k == 0:
            aux = (mask.mean(1) * probs.mean(1)).mean() * e * e
        position = torch.cumsum(mask, 1) - mask + taken
        keep = mask * (position < cap)
        taken = taken + keep.sum(1, keepdim=True)
        picks.append((keep, (probs * mask).sum(-1)))
        candidates = candidates.masked_fill(mask > 0, -1.0)
    norm = 1.0 if top_k == 1 else sum(g for _, g in picks) + 1e-9
    y = sum(torch.einsum("bse,bsed->bsd", keep * (gate / norm)[..., None], expert_out) for keep, gate in picks)
    return y, aux


def run_moe(mesh: tm.Mesh, cfg: SimpleNamespace) -> dict[str, torch.Tensor]:
    """MoE forward and backward on `mesh`; global values of output, loss and gradients."""
    moe = MoE(mesh, cfg, seed=3)
    x = tm.randn("batch:4 seq:6 d_model:8", mesh, seed=1, requires_grad=True)
    y = moe(x)
    loss = (y * y).sum() + moe.aux_loss
    loss.backward()
    out = {"y": y.full(), "aux": moe.aux_loss.full(), "grad_x": x.grad.full()}
    for name in ("router", "wi", "wo"):
        out[f"grad_{name}"] = getattr(moe, name).grad.full()
    return out


def run_reference(cfg: SimpleNamespace) -> dict[str, torch.Tensor]:
    one = tm.Mesh("dp:1", backend="sim")
    moe = MoE(one, cfg, seed=3)
    x = tm.randn("batch:4 seq:6 d_model:8", one, seed=1).full().requires_grad_()
    params = {n: getattr(moe, n).full().detach().requires_grad_() for n in ("router", "wi", "wo")}
    y, aux = reference(x, params["router"], params["wi"], params["wo"], cfg.top_k, cfg.capacity_factor)
    ((y * y).sum() + aux).backward()
    return {"y": y, "aux": aux, "grad_x": x.grad, **{f"grad_{n}": p.grad for n, p in params.items()}}


def compare(got: dict, want: dict, where: str) -> None:
    for k in want:
        torch.testing.assert_close(got[k], want[k].detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{k} on {where}: {m}")


MESHES = [  # (mesh, rules): experts on the batch axis (all-to-all), on their own axis, 2-D with tp
    ("dp:2", "batch:dp;experts:dp"),
    ("dp:2;tp:2", "batch:dp;experts:dp;ff:tp"),
    ("dp:4", "batch:dp;experts:dp"),
    ("dp:2;ep:2", "batch:dp;experts:ep"),
    ("dp:2;ep:2", "batch:dp,ep;experts:ep"),
    ("dp:2;sp:2", "batch:dp;experts:dp;seq:sp"),  # sequence split too: the routing's cumsum all-reduces
]


@pytest.mark.parametrize("top_k,capacity_factor", [(2, 1.0), (1, 1.0), (2, 0.5)])
@pytest.mark.parametrize("mesh_spec,rules", MESHES)
def test_moe_matches_torch_on_sim(mesh_spec, rules, top_k, capacity_factor):
    cfg = config(top_k, capacity_factor=capacity_factor)
    want = run_reference(cfg)
    compare(run_moe(tm.Mesh(mesh_spec, rules=rules), cfg), want, f"sim {mesh_spec} {rules}")


def test_reference_drops_tokens_over_capacity():
    """The capacity matters in these tests: a smaller capacity changes the output."""
    full, tight = run_reference(config(2, capacity_factor=4.0)), run_reference(config(2, capacity_factor=0.5))
    assert not torch.allclose(full["y"], tight["y"])


def test_dispatch_and_combine_are_all_to_all():
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;experts:dp;ff:tp")
    moe = MoE(mesh, config(), seed=0)
    x = tm.randn("batch:4 seq:6 d_model:8", mesh, seed=1, requires_grad=True)
    with tm.comm_stats() as stats:
        y = moe(x)
        ((y * y).sum() + moe.aux_loss).backward()
    by_phase = {(r.kind, r.axes, r.phase) for r in stats.records}
    assert ("all_to_all", ("dp",), "forward") in by_phase and ("all_to_all", ("dp",), "backward") in by_phase
    assert not any(r.kind == "all_gather" for r in stats.records), stats.records
    a2a = [r for r in stats.records if r.kind == "all_to_all"]
    assert len(a2a) == 4  # dispatch and combine, each with its conjugate in backward
    # each moves (k-1)/k of a device's expert buffer: experts x batch x capacity x d_model / dp
    cap = expert_capacity(6, 4, 2, 1.0)
    assert all(r.bytes == 4 * 2 * cap * 8 * 4 // 2 for r in a2a)


def test_experts_on_their_own_axis_need_no_all_to_all():
    mesh = tm.Mesh("dp:2;ep:2", rules="batch:dp;experts:ep")
    moe = MoE(mesh, config(), seed=0)
    with tm.comm_stats() as stats:
        moe(tm.randn("batch:4 seq:6 d_model:8", mesh, seed=1))
    assert "all_to_all" not in stats.counts
    assert [p.shape for p in moe.wi.shards] == [torch.Size([2, 8, 16])] * 4


def test_bad_input_dims():
    mesh = tm.Mesh("dp:2", rules="batch:dp;experts:dp")
    moe = MoE(mesh, config(), seed=0)
    with pytest.raises(ValueError, match=r"MoE takes a tensor with dims \(batch, seq, d_model\)"):
        moe(tm.randn("batch:4 d_model:8", mesh, seed=1))
    with pytest.raises(tm.ConfigError, match="top_k=5 must be between 1 and num_experts=4"):
        MoE(mesh, config(top_k=5), seed=0)


# ---- the LM with experts: 20 steps equal single-device training -----------------------------------
LM_RULES = "batch:dp;experts:dp;ff:tp;heads:tp;kv_heads:tp;vocab:tp"
LM_CONFIG = tm.nn.LMConfig(
    vocab=32,
    d_model=16,
    heads=8,
    d_head=4,
    ff=32,
    layers=1,
    seq=8,
    kv_heads=4,
    num_experts=4,
    top_k=2,
    capacity_factor=1.0,
)
LM_STEPS = 20


def lm_batch(step: int) -> torch.Tensor:
    return torch.randint(0, LM_CONFIG.vocab, (4, LM_CONFIG.seq + 1), generator=torch.Generator().manual_seed(step))


def train_moe_lm(mesh: tm.Mesh) -> list[float]:
    model = tm.nn.TransformerLM(mesh, LM_CONFIG, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(LM_STEPS):
        ids = tm.distribute(lm_batch(step), "batch seq", mesh)
        inputs, targets = tm.slice(ids, "seq", 0, LM_CONFIG.seq), tm.slice(ids, "seq", 1, LM_CONFIG.seq + 1)
        loss = tm.nn.cross_entropy(model(inputs), targets) + LM_CONFIG.aux_loss_weight * model.aux_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def moe_lm_loss(w: dict, ids: torch.Tensor, targets: torch.Tensor, c) -> torch.Tensor:
    """reference_lm's LM with each block's feed-forward replaced by the reference MoE."""
    from reference_lm import attention, norm

    x = w["embed.weight"][ids] + w["pos"][: ids.shape[1]]
    aux_total = 0.0
    for i in range(c.layers):
        p = f"blocks.{i}"
        x = x + attention(w, f"{p}.attn", norm(w, f"{p}.norm1", x, c.norm), c.heads, c.kv_heads)
        y, aux = reference(
            norm(w, f"{p}.norm2", x, c.norm),
            w[f"{p}.ffn.router"],
            w[f"{p}.ffn.wi"],
            w[f"{p}.ffn.wo"],
            c.top_k,
            c.capacity_factor,
        )
        x, aux_total = x + y, aux_total + aux
    logits = norm(w, "norm", x, c.norm) @ w["head.weight"]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return ce + c.aux_loss_weight * aux_total


def train_moe_lm_reference() -> list[float]:
    return train_single_device(
        LM_CONFIG, lm_batch, LM_STEPS, lambda ps: torch.optim.AdamW(ps, lr=1e-2), loss_fn=moe_lm_loss
    )


@pytest.fixture(scope="module")
def lm_reference() -> list[float]:
    return train_moe_lm_reference()


def test_moe_lm_sim_matches_single_device(lm_reference):
    assert lm_reference[-1] < lm_reference[0] - 0.3
    assert_same_losses(train_moe_lm(tm.Mesh("dp:2;tp:2", rules=LM_RULES)), lm_reference, "sim dp:2;tp:2")


def moe_on_ranks() -> list[float]:
    """On every gloo rank: the layer against the reference, then 20 LM steps."""
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;experts:dp;ff:tp", backend="dist")
    for top_k in (1, 2):
        cfg = config(top_k, capacity_factor=0.75)
        compare(run_moe(mesh, cfg), run_reference(cfg), "gloo dp:2;tp:2")
    return train_moe_lm(tm.Mesh("dp:2;tp:2", rules=LM_RULES, backend="dist"))


def test_moe_and_moe_lm_on_gloo(lm_reference):
    for losses in run_distributed(moe_on_ranks, 4):
        assert_same_losses(losses, lm_reference, "gloo dp:2;tp:2")


def test_train_moe_example_matches_single_device():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]

    def run(mesh: str) -> list[float]:
        out = subprocess.run(
            [
                sys.executable,
                str(root / "examples" / "train_moe.py"),
                "--mesh",
                mesh,
                "--steps",
                "2",
                "--seq",
                "16",
                "--batch",
                "4",
                "--plot",
                "",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=root,
        )
        assert out.returncode == 0, out.stderr
        assert "all_to_all" in out.stderr or mesh == "dp:1"
        return [float(line.split()[3]) for line in out.stdout.splitlines()]

    assert_same_losses(run("dp:2;tp:2"), run("dp:1"), "examples/train_moe.py")
