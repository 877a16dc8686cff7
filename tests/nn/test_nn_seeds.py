"""`tm.nn` layers built without a seed draw one from torch's default generator.

So `torch.manual_seed(s)` makes a model's initialisation reproducible, two layers built in a
row differ, the values do not depend on the mesh or backend (sim meshes here, 2 gloo processes
below), and ranks that seeded torch differently are told so instead of training different
replicas. An explicit seed gives the values it always gave and leaves torch's generator alone.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from harness import run_distributed
from reference import rules_on

import torchmesh as tm
from torchmesh.nn.init import derive_seed

RULES = "batch:dp;ff:tp;heads:tp;vocab:tp;experts:dp"
MESHES = ["dp:1", "tp:2", "dp:2;tp:2"]
CONFIG = tm.nn.LMConfig(vocab=11, d_model=8, heads=2, d_head=4, ff=7, layers=2, seq=6)
MOE_CONFIG = SimpleNamespace(d_model=8, ff=7, num_experts=4, top_k=2, capacity_factor=1.0, dropout=0.0)

#: Every tm.nn layer with weights, built without a seed (ff:7 and vocab:11 split unevenly over tp).
LAYERS = {
    "Linear": lambda mesh: tm.nn.Linear(mesh, "d_model:8", "ff:7"),
    "Embedding": lambda mesh: tm.nn.Embedding(mesh, "vocab:11", "d_model:8"),
    "FeedForward": lambda mesh: tm.nn.FeedForward(mesh, "d_model:8", "ff:7"),
    "MultiHeadAttention": lambda mesh: tm.nn.MultiHeadAttention(mesh, d_model=8, heads=2, d_head=4),
    "TransformerBlock": lambda mesh: tm.nn.TransformerBlock(mesh, CONFIG),
    "TransformerLM": lambda mesh: tm.nn.TransformerLM(mesh, CONFIG),
    "MoE": lambda mesh: tm.nn.MoE(mesh, MOE_CONFIG),
}


def sim_mesh(spec: str) -> tm.Mesh:
    return tm.Mesh(spec, rules=rules_on(spec, RULES), backend="sim")


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.full().detach() for name, p in tm.nn.mesh_parameters(model)}


def random_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights drawn at random (not the ones and zeros of norms and biases)."""
    return {k: v for k, v in weights(model).items() if v.unique().numel() > 1}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_torch_manual_seed_reproduces_and_layers_built_in_a_row_differ(layer):
    mesh = sim_mesh("dp:2;tp:2")
    torch.manual_seed(0)
    first, second = random_weights(LAYERS[layer](mesh)), random_weights(LAYERS[layer](mesh))
    torch.manual_seed(0)
    again = random_weights(LAYERS[layer](mesh))
    assert first and same(first, again)
    assert all(not torch.equal(first[k], second[k]) for k in first), "two layers built in a row share weights"
    torch.manual_seed(1)
    assert all(not torch.equal(first[k], v) for k, v in random_weights(LAYERS[layer](mesh)).items())


@pytest.mark.parametrize("layer", list(LAYERS))
def test_the_same_values_on_every_mesh(layer):
    built = []
    for spec in MESHES:
        torch.manual_seed(3)
        built.append(weights(LAYERS[layer](sim_mesh(spec))))
    assert all(same(built[0], other) for other in built[1:])


def test_layers_draw_from_torch_not_from_tm_manual_seed():
    mesh = sim_mesh("tp:2")
    torch.manual_seed(5)
    tm.manual_seed(1)
    a = weights(tm.nn.Linear(mesh, "d_model:8", "ff:7"))
    torch.manual_seed(5)
    tm.manual_seed(2)
    assert same(a, weights(tm.nn.Linear(mesh, "d_model:8", "ff:7")))


def test_an_explicit_seed_gives_its_values_and_leaves_torchs_generator_alone():
    mesh = sim_mesh("dp:2;tp:2")
    state = torch.get_rng_state()
    lin = tm.nn.Linear(mesh, "d_model:8", "ff:7", seed=5)
    model = tm.nn.TransformerLM(mesh, CONFIG, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    one = sim_mesh("dp:1")
    expected = tm.randn("d_model:8 ff:7", one, seed=derive_seed(5, "weight")) * 8**-0.5
    assert torch.equal(lin.weight.full().detach(), expected.full())
    embed = tm.randn("vocab:11 d_model:8", one, seed=derive_seed(derive_seed(0, "embed"), "weight")) * 0.02
    assert torch.equal(model.embed.weight.full().detach(), embed.full())


# ---- two gloo processes ------------------------------------------------------------------------------
def _seeded_on_dist(seed: int) -> dict:
    """On each rank: seed torch alike, build layers on a dist mesh, return their global
    weights; then seed torch differently per rank and report what building a layer says."""
    import torch.distributed as dist

    mesh = tm.Mesh("tp:2", rules=rules_on("tp:2", RULES), backend="dist")
    torch.manual_seed(seed)
    built = {layer: weights(LAYERS[layer](mesh)) for layer in ("Linear", "TransformerLM", "MoE")}
    # plain lists: tensors would travel through shared memory that dies with this process
    out = {"weights": {layer: {k: v.tolist() for k, v in w.items()} for layer, w in built.items()}}
    torch.manual_seed(seed + dist.get_rank())
    try:
        tm.nn.Linear(mesh, "d_model:8", "ff:7")
        out["disagreement"] = None
    except tm.CollectiveMismatch as error:
        out["disagreement"] = str(error)
    return out


@pytest.mark.timeout(300)
def test_the_same_values_on_two_gloo_processes_and_disagreeing_ranks_are_told():
    ranks = run_distributed(_seeded_on_dist, 2, args=(11,), timeout=240)
    torch.manual_seed(11)
    mesh = sim_mesh("dp:2;tp:2")
    expected = {layer: weights(LAYERS[layer](mesh)) for layer in ("Linear", "TransformerLM", "MoE")}
    for rank, result in enumerate(ranks):
        for layer, values in expected.items():
            got = {k: torch.tensor(v, dtype=torch.float32) for k, v in result["weights"][layer].items()}
            assert same(got, values), f"rank {rank}: {layer}"
        text = result["disagreement"]
        assert text is not None, f"rank {rank} was not told the ranks drew different seeds"
        assert text.startswith(
            "Linear was built without seed=, so it drew its seed from torch's default "
            "generator, and the ranks drew different seeds ("
        )
        assert text.endswith(
            "Fix: call torch.manual_seed(<the same value>) on every rank before building the model, or pass seed=<int>."
        )
