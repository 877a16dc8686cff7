"""torch.compile of a torchmesh training step against eager torchmesh and against the same
model in DTensor, compiled too (benchmarks/train_lm.py's plain-torch model parallelised
with parallelize_module), on 4 gloo processes.

    python benchmarks/compile_lm.py                                  # dp:2;tp:2, inductor
    python benchmarks/compile_lm.py --meshes "tp:4,dp:2;tp:2" --d-model 256 --layers 4 --seq 128
    python benchmarks/compile_lm.py --compile-backend aot_eager      # compile without inductor's codegen
    python benchmarks/compile_lm.py --backend nccl --meshes "dp:2;tp:4" --d-model 1024 --layers 8

It starts itself under torchrun (4 CPU processes; with `--backend nccl`, one per GPU). Each
step is: the forward and the loss compiled (torchmesh's with `fullgraph=True`: no graph
break; DTensor's model compiled, its vocab-parallel loss (`loss_parallel`, which dynamo
cannot trace) eager), backward (the compiled graphs' backward, through AOTAutograd), then
AdamW's step eagerly. The three models start from the same
global weights and are checked to give the same first loss; their steps run interleaved in
the same processes after one warm-up step each (where compilation happens, timed apart), and
the medians give tokens/s. The table is printed and saved as JSON under benchmarks/results/.

Compiled torchmesh reduces each parameter's gradient at each use (the bucketed reduction of
`torchmesh.comm.grad_sync` needs autograd-engine callbacks a compiled graph does not run:
docs/compile.md); data parallelism on the DTensor side is DDP's one bucket per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from launch import synchronize
from train_lm import (
    TorchLM,
    add_model_args,
    ddp_step,
    load_weights,
    mesh_setup,
    model_line,
    parallelize,
    run_meshes,
    save_results,
)

import torchmesh as tm


def tm_loss(model):
    def loss(ids: tm.MeshTensor, targets: tm.MeshTensor) -> tm.MeshTensor:
        return tm.nn.cross_entropy(model(ids), targets)

    return loss


def tm_step(loss_fn, optimizer, mesh, batch: torch.Tensor) -> float:
    ids, targets = tm.distribute(batch[:, :-1], "batch seq", mesh), tm.distribute(batch[:, 1:], "batch seq", mesh)
    loss = loss_fn(ids, targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def dtensor_step(forward, model, optimizer, dp_group, dp: int, batch: torch.Tensor) -> float:
    from torch.distributed.tensor.parallel import loss_parallel

    rows = batch.shape[0] // dp
    local = batch[dist.get_rank(dp_group) * rows :][:rows] if dp > 1 else batch
    logits = forward(local[:, :-1])
    optimizer.zero_grad()
    with loss_parallel():  # (dynamo cannot trace loss_parallel: the loss runs eagerly on the DTensor logits)
        loss = F.cross_entropy(logits.flatten(0, 1), local[:, 1:].flatten(0, 1))
        loss.backward()
    return ddp_step(model, optimizer, dp_group, dp, loss)


def run_mesh(spec: str, args: argparse.Namespace) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    dp, tp, rules, c = mesh_setup(spec, args)
    mesh = tm.Mesh(spec, rules=rules, backend="dist")  # NCCL when the process group is
    eager_model, compiled_model = tm.nn.TransformerLM(mesh, c, seed=0), tm.nn.TransformerLM(mesh, c, seed=0)
    weights = {n: p.full() for n, p in tm.nn.mesh_parameters(eager_model)}
    eager_opt = torch.optim.AdamW(eager_model.parameters(), lr=1e-3)
    compiled_opt = torch.optim.AdamW(compiled_model.parameters(), lr=1e-3)
    compiled_loss = torch.compile(tm_loss(compiled_model), fullgraph=True, backend=args.compile_backend)

    device_mesh = init_device_mesh(args.device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    torch_model = TorchLM(c).to(args.device)
    load_weights(torch_model, weights, c)
    torch_model = parallelize(torch_model, device_mesh["tp"])
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-3)
    dtensor_forward = torch.compile(torch_model, backend=args.compile_backend)
    dp_group = device_mesh.get_group("dp")

    g = torch.Generator().manual_seed(0)  # the same batches on every rank and device
    batches = [
        torch.randint(0, c.vocab, (args.batch, c.seq + 1), generator=g, device="cpu").to(args.device)
        for _ in range(args.steps + 1)
    ]
    steps = {
        "eager": lambda b: tm_step(tm_loss(eager_model), eager_opt, mesh, b),
        "compiled": lambda b: tm_step(compiled_loss, compiled_opt, mesh, b),
        "dtensor_compiled": lambda b: dtensor_step(dtensor_forward, torch_model, torch_opt, dp_group, dp, b),
    }
    first, compile_s = {}, {}
    for name, step in steps.items():  # the warm-up step: compilation happens here
        dist.barrier()
        t0 = time.perf_counter()
        first[name] = step(batches[0])
        compile_s[name] = time.perf_counter() - t0
    for loss in first.values():
        assert abs(loss - first["eager"]) <= 1e-4 * abs(first["eager"]), first

    times: dict[str, list[float]] = {name: [] for name in steps}
    for b in batches[1:]:  # interleaved: the same load on all three
        for name, step in steps.items():
            dist.barrier()
            t0 = time.perf_counter()
            step(b)
            synchronize(args.device)
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch * c.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "mesh": spec,
        "rules": rules,
        "first_loss": first,
        "first_step_s": compile_s,
        "median_step_s": med,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "compiled_over_eager": med["eager"] / med["compiled"],
        "compiled_over_dtensor": med["dtensor_compiled"] / med["compiled"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, meshes="dp:2;tp:2", steps=20, out="compile_lm.json")
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile's backend: inductor, aot_eager, eager"
    )
    args, results = run_meshes(parser, run_mesh)
    if dist.get_rank() == 0:
        print(
            f"{model_line(args)}; {dist.get_world_size()} {args.backend} processes, "
            f"torch.compile backend {args.compile_backend}, {args.steps} interleaved steps, medians"
        )
        print(
            "| mesh | eager tokens/s | compiled tokens/s | DTensor compiled tokens/s | compiled/eager | "
            "compiled/DTensor | first step s (eager, compiled, DTensor) |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in results:
            t, f = r["tokens_per_s"], r["first_step_s"]
            print(
                f"| {r['mesh']} | {t['eager']:,.0f} | {t['compiled']:,.0f} | {t['dtensor_compiled']:,.0f} | "
                f"{r['compiled_over_eager']:.2f}x | {r['compiled_over_dtensor']:.2f}x | "
                f"{f['eager']:.1f}, {f['compiled']:.1f}, {f['dtensor_compiled']:.1f} |"
            )
        save_results(args, results)
    dist.barrier()


if __name__ == "__main__":
    main()
