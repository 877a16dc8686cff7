"""`tm.nn.num_parameters` and `tm.nn.parameter_bytes` give the single-device model's
`sum(p.numel() for p in model.parameters())` (and its bytes) on any mesh and backend:
sim (where parameters() holds every device's shard), abstract (meta shards), dist (one
rank's shard), with even and uneven splits, sharded parameters (FSDP), a mixed dtype and
ordinary torch parameters beside the mesh ones."""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed

import torchmesh as tm

RULES = "batch:dp;ff:tp;heads:tp;kv_heads:tp;vocab:tp"
CONFIG = tm.nn.LMConfig(vocab=32, d_model=16, heads=8, d_head=4, ff=32, layers=2, seq=8, kv_heads=4)
#: vocab 33 and ff 30 do not divide by 4: blocks of uneven sizes.
UNEVEN = tm.nn.LMConfig(vocab=33, d_model=16, heads=6, d_head=4, ff=30, layers=1, seq=8)


def single_device(config: tm.nn.LMConfig) -> tuple[int, int]:
    """The count and the bytes that plain torch gives for the one-device model."""
    model = tm.nn.TransformerLM(tm.Mesh("dp:1", rules="batch:dp"), config, seed=0)
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize(
    ("config", "mesh", "rules"),
    [
        (CONFIG, "dp:2;tp:2", RULES),
        (CONFIG, "tp:4", "ff:tp;heads:tp;kv_heads:tp;vocab:tp"),
        (UNEVEN, "dp:2;tp:2", "batch:dp;ff:tp;heads:tp;vocab:tp"),
        (UNEVEN, "tp:4", "ff:tp;heads:tp;vocab:tp"),
    ],
    ids=["2x2", "tp4", "uneven-2x2", "uneven-tp4"],
)
@pytest.mark.parametrize("backend", ["sim", "abstract"])
def test_counts_the_single_device_model(config, mesh, rules, backend):
    count, nbytes = single_device(config)
    model = tm.nn.TransformerLM(tm.Mesh(mesh, rules=rules, backend=backend), config, seed=0)
    assert tm.nn.num_parameters(model) == count
    assert tm.nn.parameter_bytes(model) == nbytes
    held = sum(p.numel() for p in model.parameters())
    assert held != count  # what parameters() holds is not the model's size (the reason for the function)


def test_sharded_parameters_and_a_bf16_weight():
    count, nbytes = single_device(CONFIG)
    model = tm.nn.TransformerLM(tm.Mesh("dp:2;tp:2", rules=RULES), CONFIG, seed=0)
    tm.nn.shard_parameters(model, "d_model:dp")  # FSDP: every weight split over dp too
    assert (tm.nn.num_parameters(model), tm.nn.parameter_bytes(model)) == (count, nbytes)
    model.head.weight = model.head.weight.to(torch.bfloat16)  # 2 bytes each instead of 4
    head = CONFIG.vocab * CONFIG.d_model
    assert (tm.nn.num_parameters(model), tm.nn.parameter_bytes(model)) == (count, nbytes - 2 * head)


def test_ordinary_torch_parameters_count_once():
    mesh = tm.Mesh("dp:2;tp:2", rules="ff:tp")
    model = tm.nn.Module()
    model.mlp = tm.nn.FeedForward(mesh, "d_model:4", "ff:6")  # 4*6 + 6 + 6*4 + 4 = 58
    model.proj = torch.nn.Linear(3, 2)  # 3*2 + 2 = 8, an ordinary torch parameter: once
    model.again = model.mlp  # the same module twice: its parameters once
    assert tm.nn.num_parameters(model) == 66
    assert tm.nn.parameter_bytes(model) == 66 * 4
    assert sum(p.numel() for p in model.parameters()) == 4 * (12 + 3 + 12 + 4) + 8  # 4 devices, each its shards
    assert tm.nn.num_parameters(torch.nn.Linear(3, 2)) == 8  # a plain torch module too


def _count_on_rank(config: tm.nn.LMConfig, mesh: str, rules: str) -> tuple[int, int, int]:
    model = tm.nn.TransformerLM(tm.Mesh(mesh, rules=rules, backend="dist"), config, seed=0)
    return tm.nn.num_parameters(model), tm.nn.parameter_bytes(model), sum(p.numel() for p in model.parameters())


def test_dist_every_rank_counts_the_whole_model():
    count, nbytes = single_device(UNEVEN)
    results = run_distributed(_count_on_rank, nprocs=2, args=(UNEVEN, "tp:2", "ff:tp;heads:tp;vocab:tp"))
    assert [r[:2] for r in results] == [(count, nbytes)] * 2
    assert all(r[2] < count for r in results)  # each rank holds less than the model
