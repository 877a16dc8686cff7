"""Fully sharded training: tm.nn.TransformerLM with `shard_parameters(model, "d_model:dp")`
against the same plain torch model under FSDP2 (`fully_shard` on every block and the root;
on a dp x tp mesh after torchtitan's tensor-parallel plan), on 4 gloo processes.

    python benchmarks/fsdp_lm.py                             # meshes dp:4 and dp:2;tp:2, the demo's model
    python benchmarks/fsdp_lm.py --d-model 256 --heads 8 --layers 4 --seq 128 --vocab 256 --steps 15
    python benchmarks/fsdp_lm.py --backend nccl               # one process per GPU

Both start from the same global weights and are checked to give the same first loss; their
steps then run interleaved in the same processes (medians give tokens/s). Memory per rank:
the parameter and optimizer-state bytes the rank holds, plus the peak of what one training
step allocates on top, counted alike for both: every byte the process's allocator hands out,
on any thread (collectives' own buffers, such as gloo's staging copy, included). On the CPU,
the allocator's count of live bytes at each allocation and free that torch's profiler sees
(`count_cpu_allocations`); on CUDA, `max_memory_allocated`. Collectives per step: torchmesh's `tm.comm_stats`,
FSDP2's counted by `CommDebugMode`. The table is printed and saved as JSON under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from train_lm import (
    TorchLM,
    add_model_args,
    load_weights,
    mesh_setup,
    model_line,
    parallelize,
    run_meshes,
    save_results,
    tm_step,
)

import torchmesh as tm


def fsdp2_model(c: tm.nn.LMConfig, weights: dict, dp: int, tp: int, device: torch.device):
    """The plain model with torchmesh's weights, tensor-parallel over tp (if any), and every
    block and the root `fully_shard`ed over dp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = TorchLM(c).to(device)
    load_weights(model, weights, c)
    if tp > 1:
        mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
        model = parallelize(model, mesh["tp"])
        dp_mesh = mesh["dp"]
    else:
        dp_mesh = init_device_mesh(device.type, (dp,), mesh_dim_names=("dp",))
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model, dp_mesh.get_group(), tp > 1


def fsdp2_step(model, optimizer, dp_group, dp: int, tensor_parallel: bool, batch: torch.Tensor) -> float:
    from torch.distributed.tensor.parallel import loss_parallel

    rows = batch.shape[0] // dp
    local = batch[dist.get_rank(dp_group) * rows :][:rows]
    with loss_parallel() if tensor_parallel else torch.enable_grad():
        logits = model(local[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), local[:, 1:].flatten(0, 1))
        optimizer.zero_grad()
        loss.backward()
    optimizer.step()
    loss = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
    loss = loss.detach().clone()
    dist.all_reduce(loss, group=dp_group)
    return (loss / dp).item()


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's parameter shards and optimizer state."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    total = sum(local(p).numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(local(v).numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim())
    return total


def count_cpu_allocations() -> None:
    """Have c10's CPU allocator count the bytes of every allocation and free on every thread.
    By default it counts only where the profiler is on: a collective's buffers that gloo's
    worker thread lets go last (it holds the collective until it has finished) would never
    count as freed, and would inflate every later figure. Call it before the models are built."""
    import ctypes
    import os

    c10 = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    ctypes.c_bool.in_dll(c10, "FLAGS_caffe2_report_cpu_memory_usage").value = True


def step_peak_bytes(step, device: torch.device) -> int:
    """The most bytes one step has allocated at once on top of what was alive before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Each allocation and free the profiler records carries the allocator's count of the live
    # bytes just after it (every thread's, see count_cpu_allocations): the peak is the highest
    # count less the count before the first. (Summing the records themselves would miss the
    # frees made on threads the profiler does not watch.)
    found = []
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            found.append((node.start_time_ns, node.extra_fields))
        nodes.extend(node.children)
    found.sort(key=lambda f: f[0])
    first = found[0][1]
    return max(f.total_allocated for _, f in found) - (first.total_allocated - first.alloc_size)


def collectives(step) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as mode:
        step()
    return {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()}


def run_mesh(spec: str, args: argparse.Namespace) -> dict:
    dp, tp, rules, c = mesh_setup(spec, args)
    if args.device.type == "cpu":
        count_cpu_allocations()
    mesh = tm.Mesh(spec, rules=rules, backend="dist")
    model = tm.nn.TransformerLM(mesh, c, seed=0)
    weights = {n: p.full() for n, p in tm.nn.mesh_parameters(model)}
    tm.nn.shard_parameters(model, "d_model:dp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch_model, dp_group, tensor_parallel = fsdp2_model(c, weights, dp, tp, args.device)
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, c.vocab, (args.batch, c.seq + 1), generator=g).to(args.device) for _ in range(args.steps + 3)
    ]
    ours = {"torchmesh": lambda b: tm_step(model, opt, mesh, b)}
    theirs = {"fsdp2": lambda b: fsdp2_step(torch_model, torch_opt, dp_group, dp, tensor_parallel, b)}
    steps = {**ours, **theirs}
    first = {name: step(batches[0]) for name, step in steps.items()}
    assert abs(first["torchmesh"] - first["fsdp2"]) <= 1e-4 * abs(first["torchmesh"]), first

    with tm.comm_stats() as stats:  # the second step: prefetch runs from here on
        steps["torchmesh"](batches[1])
    counts = {"torchmesh": dict(stats.counts), "fsdp2": collectives(lambda: steps["fsdp2"](batches[1]))}
    peak = {
        name: held_bytes(m, o) + step_peak_bytes(lambda name=name: steps[name](batches[2]), args.device)
        for name, m, o in (("torchmesh", model, opt), ("fsdp2", torch_model, torch_opt))
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for b in batches[3:]:  # interleaved: the same load on both
        for name, step in steps.items():
            dist.barrier()
            t0 = time.perf_counter()
            step(b)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * c.seq
    return {
        "mesh": spec,
        "rules": rules,
        "first_loss": first,
        "median_step_s": med,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "speedup": med["fsdp2"] / med["torchmesh"],
        "peak_bytes_per_rank": peak,
        "collectives_per_step": counts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, meshes="dp:4,dp:2;tp:2", steps=30, out="fsdp_lm.json")
    args, results = run_meshes(parser, run_mesh)
    if dist.get_rank() == 0:
        print(
            f"{model_line(args)}; parameters sharded over dp; "
            f"{dist.get_world_size()} {args.backend} processes, {args.steps} interleaved steps, medians"
        )
        print(
            "| mesh | torchmesh tokens/s | FSDP2 tokens/s | ratio | torchmesh peak MB/rank | FSDP2 peak MB/rank | "
            "torchmesh collectives | FSDP2 collectives |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            t, m, n = r["tokens_per_s"], r["peak_bytes_per_rank"], r["collectives_per_step"]
            print(
                f"| {r['mesh']} | {t['torchmesh']:,.0f} | {t['fsdp2']:,.0f} | {r['speedup']:.2f}x | "
                f"{m['torchmesh'] / 2**20:.2f} | {m['fsdp2'] / 2**20:.2f} | {n['torchmesh']} | {n['fsdp2']} |"
            )
        save_results(args, results)
    dist.barrier()


if __name__ == "__main__":
    main()
