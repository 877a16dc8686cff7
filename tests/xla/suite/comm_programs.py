"""Small programs whose communication is compared between backends (tests/xla/suite/
test_xla_backend.py): each takes a mesh and returns the tensors the program produces (on
xla, the program compiled is the one computing them). Kept free of torch_xla so that gloo
processes can import it."""

from __future__ import annotations

import torch

import torchmesh as tm

MESH = "dp:2;tp:2"
RULES = "batch:dp;ff:tp;vocab:tp"


def mlp_forward(mesh):
    x = tm.randn("batch:8 d:16", mesh, seed=0)
    w1, w2 = tm.randn("d:16 ff:32", mesh, seed=1), tm.randn("ff:32 d:16", mesh, seed=2)
    return [tm.einsum("batch ff, ff d -> batch d", torch.relu(tm.einsum("batch d, d ff -> batch ff", x, w1)), w2)]


def reduce_split_dim(mesh):
    return [tm.randn("batch:8 ff:16", mesh, seed=0).sum("ff")]


def gather_split_dim(mesh):
    return [tm.randn("batch:8 ff:16", mesh, seed=0).rename(ff="hidden") * 2]


def vocab_softmax(mesh):
    return [tm.softmax(tm.randn("batch:8 vocab:32", mesh, seed=0), "vocab")]


def mlp_train_step(mesh):
    x = tm.randn("batch:8 d:16", mesh, seed=0)
    w1 = tm.randn("d:16 ff:32", mesh, seed=1, requires_grad=True)
    w2 = tm.randn("ff:32 d:16", mesh, seed=2, requires_grad=True)
    y = tm.einsum("batch ff, ff d -> batch d", torch.relu(tm.einsum("batch d, d ff -> batch ff", x, w1)), w2)
    loss = (y * y).mean()
    loss.backward()
    return [loss, w1.grad, w2.grad]


def embedding_step(mesh):
    table = tm.randn("vocab:32 d:16", mesh, seed=1, requires_grad=True)
    ids = tm.distribute(torch.arange(8) * 3 % 32, "batch", mesh)
    loss = (tm.gather(table, ids, "vocab") ** 2).sum()
    loss.backward()
    return [loss, table.grad]


def move_between_axes(mesh):
    return [tm.randn("batch:8 ff:16", mesh, seed=0).relayout("ff:dp") * 2]


#: Programs whose every input and output sharding is pinned by the annotations and whose
#: The communication of docs/design.md, "Communication" is one natural collective per step: must match exactly.
FORWARD = {
    "mlp_forward": mlp_forward,
    "reduce_split_dim": reduce_split_dim,
    "gather_split_dim": gather_split_dim,
    "vocab_softmax": vocab_softmax,
}
#: Forward and backward in one compiled program: the partitioner may combine or re-plan.
STEPS = {"mlp_train_step": mlp_train_step, "embedding_step": embedding_step}
#: A relayout: torchmesh's plan (gathers and an all-to-all) is one way; the partitioner
#: finds its own (collective-permutes and a smaller all-gather).
REPLANNED = {"move_between_axes": move_between_axes}
PROGRAMS = {**FORWARD, **STEPS, **REPLANNED}


def records(stats: tm.CommStats) -> list[tuple]:
    return sorted((r.kind, r.axes, r.bytes) for r in stats.records)


def measured(backend: str) -> dict[str, list[tuple]]:
    """Every program's collectives on a sim or dist mesh (under comm_stats)."""
    mesh = tm.Mesh(MESH, rules=RULES, backend=backend)
    out = {}
    for name, program in PROGRAMS.items():
        with tm.comm_stats() as stats:
            program(mesh)
        out[name] = records(stats)
    return out
