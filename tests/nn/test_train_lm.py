"""Training parity: 20 AdamW steps of a small TransformerLM (dropout off) on sharded meshes give,
step for step, the losses of plain single-device torch over the same global weights (within
1e-4 relative): on sim dp:2;tp:2, on 4 gloo processes (dp:2;tp:2 and tp:4), on 2 gloo
processes (tp:2). Also: the modules forward and backward against plain torch on those gloo
processes, parameter bytes per rank are total/N for weights split N ways, bf16 autocast runs
on sim and dist and stays close to fp32, and examples/train_lm.py prints the same losses on
one device, on sim and under torchrun."""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed
from reference_lm import assert_same_losses, train_single_device

import torchmesh as tm

RULES = "batch:dp;ff:tp;heads:tp;kv_heads:tp;vocab:tp"
CONFIG = tm.nn.LMConfig(vocab=32, d_model=16, heads=8, d_head=4, ff=32, layers=2, seq=8, kv_heads=4)
BATCH, STEPS, LR = 4, 20, 1e-2
#: Weights split over tp by the rules (the rest are replicated).
TP_SPLIT = (
    "embed.weight",
    "attn.wq",
    "attn.wk",
    "attn.wv",
    "attn.wo",
    "w_in.weight",
    "w_in.bias",
    "w_out.weight",
    "head.weight",
)


def rules_for(mesh_spec: str) -> str:
    axes = {part.split(":")[0] for part in mesh_spec.split(";")}
    return ";".join(r for r in RULES.split(";") if r.split(":")[1] in axes)


def batch(step: int) -> torch.Tensor:
    """The global token batch of a step: [BATCH, seq + 1] ids (inputs and shifted targets)."""
    return torch.randint(0, CONFIG.vocab, (BATCH, CONFIG.seq + 1), generator=torch.Generator().manual_seed(step))


def train_mesh(mesh: tm.Mesh, steps: int = STEPS, autocast: bool = False) -> list[float]:
    model = tm.nn.TransformerLM(mesh, CONFIG, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(steps):
        ids = tm.distribute(batch(step), "batch seq", mesh)
        inputs, targets = tm.slice(ids, "seq", 0, CONFIG.seq), tm.slice(ids, "seq", 1, CONFIG.seq + 1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = tm.nn.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_reference(steps: int = STEPS) -> list[float]:
    """Plain torch on one device, from the weights a one-device mesh gets for the same seed."""
    return train_single_device(CONFIG, batch, steps, lambda ps: torch.optim.AdamW(ps, lr=LR), rules=RULES)


def assert_param_bytes(model: torch.nn.Module, mesh: tm.Mesh) -> None:
    """Each weight split over tp holds 1/tp of its bytes on every device; the rest hold all."""
    tp = mesh.axis_size("tp") if "tp" in mesh.axis_names else 1
    total = local = expected = 0
    for name, p in tm.nn.mesh_parameters(model):
        split = tp if name.endswith(TP_SPLIT) else 1
        shard_bytes = p.shards[0].numel() * p.shards[0].element_size()
        full_bytes = p.numel() * p.shards[0].element_size()
        assert shard_bytes * split == full_bytes, f"{name}: {shard_bytes} bytes per device, {full_bytes} in all"
        total, local, expected = total + full_bytes, local + shard_bytes, expected + full_bytes // split
    assert local == expected < total or tp == 1


@pytest.fixture(scope="module")
def reference() -> list[float]:
    return train_reference()


def test_losses_fall(reference):
    assert reference[-1] < reference[0] - 0.3


def test_sim_dp2_tp2_matches_single_device(reference):
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES, backend="sim")
    assert_same_losses(train_mesh(mesh), reference, "sim dp:2;tp:2")


def test_param_bytes_per_device_sim():
    mesh = tm.Mesh("tp:4", rules=rules_for("tp:4"), backend="sim")
    model = tm.nn.TransformerLM(mesh, CONFIG, seed=0)
    assert_param_bytes(model, mesh)
    split = sum(p.numel() for n, p in tm.nn.mesh_parameters(model) if n.endswith(TP_SPLIT))
    assert split > 0.8 * sum(p.numel() for _, p in tm.nn.mesh_parameters(model))


def test_bf16_autocast_sim_close_to_fp32(reference):
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES, backend="sim")
    bf16 = train_mesh(mesh, steps=5, autocast=True)
    for a, b in zip(bf16, reference[:5]):
        assert abs(a - b) <= 2e-2 * abs(b)


def check_modules_on_ranks(spec: str) -> None:
    """Each module, forward and backward, against plain torch on real processes."""
    from reference_lm import attention, feed_forward
    from test_nn import activations, check_module

    mesh = tm.Mesh(spec, rules=rules_for(spec), backend="dist")
    attn = tm.nn.MultiHeadAttention(mesh, d_model=16, heads=8, d_head=4, kv_heads=4, seed=8)
    check_module(attn, activations(mesh), lambda w, x: attention({f"a.{k}": v for k, v in w.items()}, "a", x, 8, 4))
    ffn = tm.nn.FeedForward(mesh, "d_model:16", "ff:32", seed=6)
    check_module(ffn, activations(mesh), lambda w, x: feed_forward({f"f.{k}": v for k, v in w.items()}, "f", x))
    emb = tm.nn.Embedding(mesh, "vocab:12", "d_model:16", seed=3, std=1.0)
    ids = tm.distribute(torch.randint(0, 12, (4, 6), generator=torch.Generator().manual_seed(0)), "batch seq", mesh)
    check_module(emb, ids, lambda w, i: w["weight"][i])
    norm = tm.nn.LayerNorm(mesh, "d_model:16")
    check_module(norm, activations(mesh), lambda w, x: torch.nn.functional.layer_norm(x, (16,), w["weight"], w["bias"]))


def train_on_ranks(mesh_specs: tuple[str, ...], autocast: bool) -> dict[str, list[float]]:
    """Body run on every gloo rank: the modules, then parity training on each mesh (plus bf16
    on the first)."""
    check_modules_on_ranks(mesh_specs[0])
    out = {}
    for spec in mesh_specs:
        mesh = tm.Mesh(spec, rules=rules_for(spec), backend="dist")
        model = tm.nn.TransformerLM(mesh, CONFIG, seed=0)
        assert_param_bytes(model, mesh)
        out[spec] = train_mesh(mesh)
    if autocast:
        out["bf16"] = train_mesh(
            tm.Mesh(mesh_specs[0], rules=rules_for(mesh_specs[0]), backend="dist"), steps=5, autocast=True
        )
    return out


@pytest.mark.parametrize("nprocs,mesh_specs", [(4, ("dp:2;tp:2", "tp:4")), (2, ("tp:2",))])
def test_gloo_matches_single_device(reference, nprocs, mesh_specs):
    results = run_distributed(train_on_ranks, nprocs, args=(mesh_specs, nprocs == 4), timeout=240)
    for rank, result in enumerate(results):
        for spec in mesh_specs:
            assert_same_losses(result[spec], reference, f"{nprocs} gloo processes, {spec}, rank {rank}")
        if "bf16" in result:
            for a, b in zip(result["bf16"], reference[:5]):
                assert abs(a - b) <= 2e-2 * abs(b)


def run_example(*flags: str, torchrun: bool = False) -> list[float]:
    """examples/train_lm.py (a small model, 4 steps) as a user runs it; its per-step losses."""
    import subprocess
    import sys
    from pathlib import Path

    from harness import free_port

    root = Path(__file__).resolve().parents[2]
    launcher = [sys.executable]
    if torchrun:
        launcher += [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "4",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        ]
    out = subprocess.run(
        [
            *launcher,
            str(root / "examples" / "train_lm.py"),
            "--steps",
            "4",
            "--batch",
            "4",
            "--seq",
            "16",
            "--d-model",
            "32",
            "--plot",
            "",
            "--dropout",
            "0.1",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()  # exactly the step lines, nothing else
    assert [l.split()[:3] for l in lines] == [["step", str(i), "loss"] for i in range(4)], out.stdout
    return [float(l.split()[3]) for l in lines]


def test_example_prints_the_single_device_losses_on_sim_and_torchrun():
    """Dropout on: its masks do not depend on the mesh, so the losses still agree. The corpus's
    own vocabulary, 65 characters, is split unevenly over tp (33 and 32 rows)."""
    single = run_example("--mesh", "dp:1")
    assert single[-1] < single[0]
    sim = run_example("--backend", "sim", "--mesh", "dp:2;tp:2")
    assert_same_losses(sim, single, "examples/train_lm.py on sim dp:2;tp:2")
    dist = run_example("--backend", "dist", "--mesh", "dp:2;tp:2", torchrun=True)
    assert_same_losses(dist, single, "examples/train_lm.py under torchrun, dp:2;tp:2")
