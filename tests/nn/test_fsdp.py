"""Fully sharded parameters: `shard_parameters(model, "d_model:dp")` stores parameters split
over dp (on top of tp); each is all-gathered before use and its gradient reduce-scattered;
parameter, gradient and AdamW-state bytes per device fall by dp (asserted), and 20 training
steps give single-device losses (sim and 4 gloo processes)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from harness import run_distributed
from reference_lm import assert_same_losses, train_single_device

import torchmesh as tm
from torchmesh.nn.fsdp import after_the_blocks

RULES = "batch:dp;ff:tp;heads:tp;kv_heads:tp;vocab:tp"
CONFIG = tm.nn.LMConfig(vocab=32, d_model=16, heads=8, d_head=4, ff=32, layers=2, seq=8, kv_heads=4)
BATCH, STEPS, LR = 4, 20, 1e-2
F32 = 4


def rules_for(mesh_spec: str) -> str:
    axes = {part.split(":")[0] for part in mesh_spec.split(";")}
    return ";".join(r for r in RULES.split(";") if r.split(":")[1] in axes)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab, (BATCH, CONFIG.seq + 1), generator=torch.Generator().manual_seed(step))


def lm_step(model: tm.nn.TransformerLM, mesh: tm.Mesh, step: int) -> tm.MeshTensor:
    ids = tm.distribute(batch(step), "batch seq", mesh)
    inputs, targets = tm.slice(ids, "seq", 0, CONFIG.seq), tm.slice(ids, "seq", 1, CONFIG.seq + 1)
    return tm.nn.cross_entropy(model(inputs), targets)


def train(
    mesh: tm.Mesh, fsdp: bool, steps: int = STEPS
) -> tuple[list[float], tm.nn.TransformerLM, torch.optim.Optimizer]:
    model = tm.nn.TransformerLM(mesh, CONFIG, seed=0)
    if fsdp:
        tm.nn.shard_parameters(model, "d_model:dp")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(steps):
        loss = lm_step(model, mesh, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model, optimizer


def train_reference(steps: int = STEPS) -> list[float]:
    return train_single_device(CONFIG, batch, steps, lambda ps: torch.optim.AdamW(ps, lr=LR), rules=RULES)


def bytes_per_device(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes of device 0 (each device's are alike)."""
    out = Counter()
    for _, p in tm.nn.mesh_parameters(model):
        shard = p.shards[0]
        out["param"] += shard.numel() * shard.element_size()
        out["grad"] += shard.grad.numel() * shard.grad.element_size()
        for v in optimizer.state[shard].values():
            if v.dim() > 0:
                out["optimizer"] += v.numel() * v.element_size()
    return dict(out)


#: Parameters that have no d_model (the feed-forward's input bias is ff only): not sharded over dp.
NO_D_MODEL = ("w_in.bias",)


def assert_memory_falls(dense: tuple, sharded: tuple, dp: int) -> None:
    """Per parameter, the stored shard is 1/dp of the dense shard; in all, parameter +
    gradient + optimizer bytes fall by dp except for the few parameters without d_model."""
    (_, dense_model, dense_opt), (_, fsdp_model, fsdp_opt) = dense, sharded
    left_whole = 0
    for (name, a), (_, b) in zip(tm.nn.mesh_parameters(dense_model), tm.nn.mesh_parameters(fsdp_model)):
        whole = a.shards[0].numel()
        if name.endswith(NO_D_MODEL):
            assert b.shards[0].numel() == whole, name
            left_whole += whole * F32
        else:
            assert b.shards[0].numel() * dp == whole, f"{name}: {b.shards[0].numel()} x {dp} != {whole}"
            assert b.layout["d_model"] == "dp"
    got, was = bytes_per_device(fsdp_model, fsdp_opt), bytes_per_device(dense_model, dense_opt)
    for kind, factor in (("param", 1), ("grad", 1), ("optimizer", 2)):  # AdamW: exp_avg, exp_avg_sq
        assert got[kind] == (was[kind] - factor * left_whole) // dp + factor * left_whole, (kind, got, was)
    assert sum(got.values()) < 0.6 * sum(was.values())


@pytest.fixture(scope="module")
def reference() -> list[float]:
    return train_reference()


@pytest.mark.parametrize("mesh_spec", ["dp:2;tp:2", "dp:4"])
def test_fsdp_training_matches_single_device_and_memory_falls(reference, mesh_spec):
    mesh = tm.Mesh(mesh_spec, rules=rules_for(mesh_spec))
    steps = STEPS if mesh_spec == "dp:2;tp:2" else 3
    sharded = train(mesh, fsdp=True, steps=steps)
    assert_same_losses(sharded[0], reference[:steps], f"sim {mesh_spec} fsdp")
    dense = train(mesh, fsdp=False, steps=1)
    assert_memory_falls(dense, sharded, mesh.axis_size("dp"))


@pytest.mark.parametrize("regather", [False, True])
def test_fsdp_collectives_per_step(regather):
    """Forward: one all-gather over dp per sharded parameter (the first step: prefetch has not
    learned their order yet); backward: their gradients' reduce-scatters in one bucket (one
    per unit, embedding, positions, each block, ..., for units of 1 MiB or more; no
    all-reduce over dp for them), and with `regather` an
    all-gather again for each parameter the forward would have kept; all-gather +
    reduce-scatter bytes are those of a dp all-reduce. With gradient buckets off, one
    reduce-scatter per parameter, the same bytes in all."""
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    model = tm.nn.shard_parameters(tm.nn.TransformerLM(mesh, CONFIG, seed=0), "d_model:dp", regather=regather)
    sharded = {n: p for n, p in tm.nn.mesh_parameters(model) if "dp" in p.tensor_layout.used_axes}
    with tm.comm_stats() as stats:
        lm_step(model, mesh, 0).backward()
    on_dp = Counter((r.kind, r.phase) for r in stats.records if r.axes == ("dp",))
    regathered = on_dp.pop(("all_gather", "backward"), 0)
    # + the loss's mean over batch (forward) and the ff biases' gradients (backward, one bucket)
    assert on_dp == {
        ("all_gather", "forward"): len(sharded),
        ("reduce_scatter", "backward"): 1,
        ("all_reduce", "forward"): 1,
        ("all_reduce", "backward"): 1,
    }
    # the weights of matmuls are needed in backward; norm scales and biases added are not
    assert (0.5 * len(sharded) < regathered < len(sharded)) if regather else regathered == 0
    gathered = sorted(r.bytes for r in stats.records if r.kind == "all_gather" and r.phase == "forward")
    expected = sorted(p.shards[0].numel() * F32 for p in sharded.values())  # (k-1) x shard, k = 2
    assert gathered == expected
    scattered = [r.bytes for r in stats.records if r.kind == "reduce_scatter"]
    assert sum(scattered) == sum(expected)  # (k-1)/k x the gathered gradients
    tm.nn.configure_grad_sync(mesh, enabled=False)
    with tm.comm_stats() as stats:
        lm_step(model, mesh, 0).backward()
    assert sorted(r.bytes for r in stats.records if r.kind == "reduce_scatter") == expected


def live_bytes_after_forward(model: tm.nn.TransformerLM, mesh: tm.Mesh) -> tuple[int, tm.MeshTensor]:
    """CPU bytes allocated during the forward and still alive after it (what backward keeps)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = lm_step(model, mesh, 0)
    return sum(e.self_cpu_memory_usage for e in prof.events()), loss


def test_regather_frees_gathered_parameters_after_forward():
    """Without regather the forward keeps each layer's gathered (full) weights for backward;
    with it, what the forward leaves alive is no more than for unsharded parameters (which
    are saved without a copy) but the final norm's and the head's (kept: backward starts with
    them), and gradients are the same."""
    mesh = tm.Mesh("dp:2", rules="batch:dp")
    config = tm.nn.LMConfig(vocab=32, d_model=64, heads=4, d_head=16, ff=256, layers=2, seq=8)
    live, grads = {}, {}
    for mode in ("dense", "keep", "regather"):
        model = tm.nn.TransformerLM(mesh, config, seed=0)
        if mode != "dense":
            tm.nn.shard_parameters(model, "d_model:dp", regather=mode == "regather")
        live[mode], loss = live_bytes_after_forward(model, mesh)
        loss.backward()
        grads[mode] = {n: p.grad.full() for n, p in tm.nn.mesh_parameters(model)}
    full_weights = sum(p.numel() * F32 for _, p in tm.nn.mesh_parameters(model) if p.ndim == 2 or p.ndim == 3)
    assert live["keep"] - live["dense"] > 0.5 * mesh.size * full_weights  # every device's gathered copy
    kept = sum(p.numel() * F32 for m in after_the_blocks(model) for _, p in tm.nn.mesh_parameters(m))
    assert 0 < kept < 0.2 * full_weights
    assert live["regather"] <= live["dense"] * 1.05 + mesh.size * kept
    for name in grads["dense"]:
        torch.testing.assert_close(grads["regather"][name], grads["keep"][name])
        torch.testing.assert_close(grads["regather"][name], grads["dense"][name], rtol=1e-4, atol=1e-6)


def test_gathered_weight_gradient_is_one_reduce_scatter():
    mesh = tm.Mesh("dp:4", rules="batch:dp")
    x = tm.randn("batch:8 d:16", mesh, seed=0)
    w = tm.randn("d:16 ff:8", mesh, seed=1, requires_grad=True).relayout("d:dp").detach().requires_grad_()
    with tm.comm_stats() as stats:
        y = tm.einsum("batch d, d ff -> batch ff", x, w)
        (y * y).sum().backward()
    assert [(r.kind, r.phase, r.bytes) for r in stats.records if r.kind != "all_reduce"] == [
        ("all_gather", "forward", 3 * 4 * 8 * F32),
        ("reduce_scatter", "backward", 3 * 4 * 8 * F32),
    ]
    xr, wr = x.full(), w.full().detach().requires_grad_()
    ((xr @ wr) ** 2).sum().backward()
    torch.testing.assert_close(w.grad.full(), wr.grad)
    assert w.grad.tensor_layout == w.tensor_layout


def test_axis_already_used_is_skipped_and_errors_name_the_parameter():
    mesh = tm.Mesh("dp:2", rules="experts:dp")
    m = tm.nn.Module()
    m.experts_w = tm.randn("experts:2 d_model:4", mesh, seed=0, requires_grad=True)
    m.odd = tm.randn("d_model:4 x:3", mesh, seed=0, requires_grad=True)
    tm.nn.shard_parameters(m, "d_model:dp")
    assert m.experts_w.layout == {"experts": "dp"} and m.odd.layout == {"d_model": "dp"}
    m.uneven = tm.randn("x:3", mesh, seed=0, requires_grad=True)
    tm.nn.shard_parameters(m, "x:dp")  # 3 over dp:2: stored in blocks of 2 and 1
    assert m.uneven.layout == {"x": "dp"} and [tuple(s.shape) for s in m.uneven.shards] == [(2,), (1,)]
    m.bad = tm.randn("y:4", mesh, seed=0, requires_grad=True)
    with pytest.raises(ValueError, match=r"shard_parameters: parameter 'bad' cannot be stored split .* 'y:fsdp'"):
        tm.nn.shard_parameters(m, "y:fsdp")


def fsdp_on_ranks(mesh_spec: str) -> list[float]:
    mesh = tm.Mesh(mesh_spec, rules=rules_for(mesh_spec), backend="dist")
    sharded = train(mesh, fsdp=True)
    assert_memory_falls(train(mesh, fsdp=False, steps=1), sharded, mesh.axis_size("dp"))
    return sharded[0]


def test_fsdp_on_gloo(reference):
    for losses in run_distributed(fsdp_on_ranks, 4, args=("dp:2;tp:2",)):
        assert_same_losses(losses, reference, "gloo dp:2;tp:2 fsdp")
