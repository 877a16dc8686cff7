"""A tensor- and data-parallel MLP, trained on a simulated 2x2 mesh, checked against one device.

    python examples/mlp_sim.py                       # sim backend, mesh dp:2;tp:2
    python examples/mlp_sim.py --mesh "dp:2;tp:4"    # any mesh; the losses do not change

The model code below names dims and never mentions the mesh; the layout rules beside it
say what is split where. The same script is run twice, on the mesh and on one device,
and the losses agree step for step.
"""

from __future__ import annotations

import argparse

import torch

import torchmesh as tm

RULES = "batch:dp;hidden:tp"  # data parallel over dp, Megatron-style tensor parallel over tp


def init_params(mesh: tm.Mesh, d: int, hidden: int) -> dict[str, tm.MeshTensor]:
    """Weights from a seed: the same values on every mesh (layout-invariant randomness)."""
    return {
        "w_in": (tm.randn(f"d:{d} hidden:{hidden}", mesh, seed=1) * d**-0.5).requires_grad_(),
        "b_in": tm.zeros(f"hidden:{hidden}", mesh, requires_grad=True),
        "w_out": (tm.randn(f"hidden:{hidden} d:{d}", mesh, seed=2) * hidden**-0.5).requires_grad_(),
    }


def mlp(p: dict[str, tm.MeshTensor], x: tm.MeshTensor) -> tm.MeshTensor:
    h = tm.einsum("batch d, d hidden -> batch hidden", x, p["w_in"]) + p["b_in"]
    return tm.einsum("batch hidden, hidden d -> batch d", torch.relu(h), p["w_out"])


def train(mesh: tm.Mesh, steps: int, batch: int = 16, d: int = 32, hidden: int = 64) -> list[float]:
    params = init_params(mesh, d, hidden)
    # torch.optim works on the local shards: every replica of a weight gets the same update.
    optimizer = torch.optim.SGD([t for p in params.values() for t in p.shards], lr=0.5)
    x = tm.randn(f"batch:{batch} d:{d}", mesh, seed=3)
    target = torch.tanh(x)  # a fixed function to fit
    losses = []
    for _ in range(steps):
        loss = ((mlp(params, x) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")  # one line, exit 2
    parser.add_argument("--mesh", default="dp:2;tp:2")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"argument --steps: {args.steps} is below 1")
    try:
        mesh = tm.Mesh(args.mesh, rules=RULES, backend="sim")
    except tm.TorchMeshError as e:
        parser.error(f"argument --mesh: {e}")
    single = tm.Mesh("dp:1;tp:1", rules=RULES, backend="sim")
    print(f"mesh {mesh.shape}, rules {RULES!r}\n")
    w = init_params(mesh, 8, 8)["w_in"]
    print("w_in, laid out on the mesh (each block with the coordinates of the devices holding it):")
    print(w.detach(), "\n")
    print(tm.show_layout(w), "\n")

    with tm.comm_stats() as stats:
        sharded = train(mesh, args.steps)
    reference = train(single, args.steps)
    for step, (a, b) in enumerate(zip(sharded, reference)):
        print(f"step {step} loss {a:.6f}   (one device: {b:.6f})")
    print(f"\ncollectives per device over {args.steps} steps: {stats.counts}, {stats.total_bytes} bytes")
    worst = max(abs(a - b) / abs(b) for a, b in zip(sharded, reference))
    print(f"largest relative difference from one device: {worst:.2e}")
    assert worst < 1e-5, "the sharded run must give the single-device numbers"


if __name__ == "__main__":
    main()
