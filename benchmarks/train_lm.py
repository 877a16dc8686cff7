"""Training throughput of tm.nn.TransformerLM against the same model written with DTensor
(torchtitan's recipe: parallelize_module with ColwiseParallel / RowwiseParallel on a plain
torch Transformer, vocab-parallel embedding and loss_parallel), on 4 gloo processes.

    python benchmarks/train_lm.py                          # meshes tp:4 and dp:2;tp:2, the demo's model
    python benchmarks/train_lm.py --d-model 256 --layers 4 --seq 128 --steps 20
    python benchmarks/train_lm.py --backend nccl --meshes "tp:8,dp:2;tp:4" --d-model 1024 --layers 8

It starts itself under torchrun (4 CPU processes; with `--backend nccl`, one per GPU). Both implementations start from the same
global weights (torchmesh's, copied into the torch model) and are checked to give the same
first loss; then their training steps run interleaved in the same processes, and the
medians give tokens/s. Bytes per step and per device: torchmesh's `tm.comm_stats`, and
DTensor's collectives recorded by `CommDebugMode` (torch.distributed.tensor.debug), sized
with the same ring formulas (all-reduce 2(k-1)/k·S, all-gather (k-1)·S, reduce-scatter
(k-1)/k·S, all-to-all (k-1)/k·S). The table is printed and saved as JSON under
benchmarks/results/.

Data parallelism on the DTensor side is DDP's: the tp-sharded gradients are flattened into
one bucket and all-reduced over dp once per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from launch import add_launch_args, init_process_group, relaunch_under_torchrun

import torchmesh as tm

RULES = "batch:dp;heads:tp;ff:tp;vocab:tp"


# ---- the plain torch model (torchtitan-style) -----------------------------------------------
class Attention(nn.Module):
    def __init__(self, d: int, heads: int, d_head: int) -> None:
        super().__init__()
        self.d_head = d_head
        self.wq, self.wk, self.wv = (nn.Linear(d, heads * d_head, bias=False) for _ in range(3))
        self.wo = nn.Linear(heads * d_head, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, -1, self.d_head).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # local heads under TP
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, c: tm.nn.LMConfig) -> None:
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.attention = Attention(c.d_model, c.heads, c.d_head)
        self.feed_forward = FeedForward(c.d_model, c.ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class TorchLM(nn.Module):
    def __init__(self, c: tm.nn.LMConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(c.vocab, c.d_model)
        self.pos = nn.Parameter(torch.zeros(c.seq, c.d_model))
        self.layers = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.d_model)
        self.output = nn.Linear(c.d_model, c.vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(ids) + self.pos[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


def load_weights(model: TorchLM, w: dict[str, torch.Tensor], c: tm.nn.LMConfig) -> None:
    """Copy torchmesh's global weights (named dims) into the torch model (nn.Linear layouts)."""
    hd = c.heads * c.d_head
    put = {
        "tok_embeddings.weight": w["embed.weight"],
        "pos": w["pos"],
        "norm.weight": w["norm.weight"],
        "norm.bias": w["norm.bias"],
        "output.weight": w["head.weight"].T,
    }
    for i in range(c.layers):
        p, q = f"blocks.{i}", f"layers.{i}"
        for n in ("wq", "wk", "wv"):
            put[f"{q}.attention.{n}.weight"] = w[f"{p}.attn.{n}"].reshape(c.d_model, hd).T
        put[f"{q}.attention.wo.weight"] = w[f"{p}.attn.wo"].reshape(hd, c.d_model).T
        put[f"{q}.feed_forward.w1.weight"] = w[f"{p}.ffn.w_in.weight"].T
        put[f"{q}.feed_forward.w1.bias"] = w[f"{p}.ffn.w_in.bias"]
        put[f"{q}.feed_forward.w2.weight"] = w[f"{p}.ffn.w_out.weight"].T
        put[f"{q}.feed_forward.w2.bias"] = w[f"{p}.ffn.w_out.bias"]
        for a, b in (("attention_norm", "norm1"), ("ffn_norm", "norm2")):
            put[f"{q}.{a}.weight"], put[f"{q}.{a}.bias"] = w[f"{p}.{b}.weight"], w[f"{p}.{b}.bias"]
    missing = set(model.state_dict()) ^ set(put)
    assert not missing, missing
    model.load_state_dict({k: v.contiguous() for k, v in put.items()})


def parallelize(model: TorchLM, tp_mesh) -> TorchLM:
    """torchtitan's tensor-parallel plan for this model."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    }
    for i in range(len(model.layers)):
        for n in ("wq", "wk", "wv"):
            plan[f"layers.{i}.attention.{n}"] = ColwiseParallel()
        plan[f"layers.{i}.attention.wo"] = RowwiseParallel()
        plan[f"layers.{i}.feed_forward.w1"] = ColwiseParallel()
        plan[f"layers.{i}.feed_forward.w2"] = RowwiseParallel()
    return parallelize_module(model, tp_mesh, plan)


# ---- one training step each -----------------------------------------------------------------
def tm_step(model, optimizer, mesh, batch: torch.Tensor) -> float:
    ids = tm.distribute(batch, "batch seq", mesh)
    seq = batch.shape[1] - 1
    loss = tm.nn.cross_entropy(model(tm.slice(ids, "seq", 0, seq)), tm.slice(ids, "seq", 1, seq + 1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def dtensor_step(model, optimizer, dp_group, dp: int, batch: torch.Tensor) -> float:
    from torch.distributed.tensor.parallel import loss_parallel

    rows = batch.shape[0] // dp
    local = batch[dist.get_rank(dp_group) * rows :][:rows] if dp > 1 else batch
    with loss_parallel():
        logits = model(local[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), local[:, 1:].flatten(0, 1))
        optimizer.zero_grad()
        loss.backward()
    return ddp_step(model, optimizer, dp_group, dp, loss)


def ddp_step(model, optimizer, dp_group, dp: int, loss) -> float:
    """After backward: DDP's one bucket of the (tp-local) gradients, averaged over dp, the
    optimizer step, and the loss averaged over dp."""
    if dp > 1:  # DDP: one bucket of the (tp-local) gradients, averaged over dp
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in model.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads]) / dp
        dist.all_reduce(flat, group=dp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    optimizer.step()
    loss = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
    if dp > 1:
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=dp_group)
        loss = loss / dp
    return loss.item()


# ---- bytes ----------------------------------------------------------------------------------
def dtensor_bytes(step) -> tuple[dict, int]:
    """Collectives of one DTensor step (CommDebugMode counts) and their ring bytes per device."""
    from torch.distributed.tensor.debug import CommDebugMode

    sizes: list[tuple[str, int, int]] = []

    class SizedCommMode(CommDebugMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func._overloadpacket).split(".")[-1]
            if not any(t.__name__ == "DTensor" for t in types) and _is_collective(name):
                t, k = _payload(name, args)
                sizes.append((name, t, k))
            return super().__torch_dispatch__(func, types, args, kwargs)

    with SizedCommMode() as mode:
        step()
    counts = {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()}
    return counts, int(sum(_ring_bytes(n, s, k) for n, s, k in sizes))


def _is_collective(name: str) -> bool:
    return any(
        s in name
        for s in ("all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "all_to_all", "alltoall")
    )


def _payload(name: str, args) -> tuple[int, int]:
    from torch.distributed.distributed_c10d import _resolve_process_group

    t = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
    group = next((a for a in reversed(args) if isinstance(a, str)), None)  # funcol: group name last
    if group is not None:
        k = _resolve_process_group(group).size()
    else:  # c10d ops: (tensors, process_group, ...)
        k = dist.ProcessGroup.unbox(args[1]).size()
    return t.numel() * t.element_size(), k


def _ring_bytes(name: str, s: int, k: int) -> float:
    if "reduce_scatter" in name:
        return (k - 1) / k * s
    if "all_reduce" in name or "allreduce" in name:
        return 2 * (k - 1) / k * s
    if "gather" in name:
        return (k - 1) * s
    return (k - 1) / k * s  # all-to-all


# ---- the benchmark --------------------------------------------------------------------------
def mesh_setup(spec: str, args: argparse.Namespace) -> tuple[int, int, str, tm.nn.LMConfig]:
    """The mesh's dp and tp sizes, the rules for its axes, and the model's config from the flags."""
    axes = dict(part.split(":") for part in spec.split(";"))
    dp, tp = int(axes.get("dp", 1)), int(axes.get("tp", 1))
    rules = ";".join(r for r in RULES.split(";") if r.split(":")[1] in axes)
    c = tm.nn.LMConfig(
        vocab=args.vocab,
        d_model=args.d_model,
        heads=args.heads,
        d_head=args.d_model // args.heads,
        ff=4 * args.d_model,
        layers=args.layers,
        seq=args.seq,
    )
    return dp, tp, rules, c


def add_model_args(parser: argparse.ArgumentParser, meshes: str, steps: int, out: str) -> None:
    """The flags every LM benchmark takes: meshes, timed steps, batch and model sizes, output."""
    parser.add_argument("--meshes", default=meshes)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps of each implementation")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / out))


def model_line(args: argparse.Namespace) -> str:
    """The table's first line: the model and the global batch."""
    return (
        f"\nmodel: d_model {args.d_model}, heads {args.heads}, layers {args.layers}, seq {args.seq}, "
        f"global batch {args.batch}, vocab {args.vocab}"
    )


def run_meshes(parser: argparse.ArgumentParser, run_mesh) -> tuple[argparse.Namespace, list[dict]]:
    """Parse the flags (plus the launcher's), start under torchrun on 4 processes, and run
    `run_mesh(spec, args)` for each mesh of `--meshes`: the flags and the rows."""
    add_launch_args(parser, nproc=4)
    args = parser.parse_args()
    relaunch_under_torchrun(args, default_nproc=4)
    args.device = init_process_group(args)
    return args, [run_mesh(spec, args) for spec in args.meshes.split(",")]


def save_results(args: argparse.Namespace, results: list[dict]) -> None:
    """Write the flags and the rows to `args.out` as JSON."""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    saved = {k: v for k, v in vars(args).items() if k != "device"}
    Path(args.out).write_text(json.dumps({"args": saved, "results": results}, indent=2))
    print(f"\nsaved {args.out}")


def run_mesh(spec: str, args: argparse.Namespace) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    dp, tp, rules, c = mesh_setup(spec, args)
    mesh = tm.Mesh(spec, rules=rules, backend="dist")  # NCCL when the process group is
    model = tm.nn.TransformerLM(mesh, c, seed=0)
    weights = {n: p.full() for n, p in tm.nn.mesh_parameters(model)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    device_mesh = init_device_mesh(args.device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    torch_model = TorchLM(c).to(args.device)
    load_weights(torch_model, weights, c)
    torch_model = parallelize(torch_model, device_mesh["tp"])
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-3)
    dp_group = device_mesh.get_group("dp")

    g = torch.Generator().manual_seed(0)  # the same batches on every rank and device
    batches = [
        torch.randint(0, c.vocab, (args.batch, c.seq + 1), generator=g, device="cpu").to(args.device)
        for _ in range(args.steps + 2)
    ]
    first_tm = tm_step(model, opt, mesh, batches[0])
    first_dt = dtensor_step(torch_model, torch_opt, dp_group, dp, batches[0])
    assert abs(first_tm - first_dt) <= 1e-4 * abs(first_tm), (first_tm, first_dt)

    with tm.comm_stats() as stats:
        tm_step(model, opt, mesh, batches[1])
    dt_counts, dt_bytes = dtensor_bytes(lambda: dtensor_step(torch_model, torch_opt, dp_group, dp, batches[1]))

    times: dict[str, list[float]] = {"torchmesh": [], "dtensor": []}
    for b in batches[2:]:  # interleaved: the same load on both
        for name, step in (
            ("torchmesh", lambda b=b: tm_step(model, opt, mesh, b)),
            ("dtensor", lambda b=b: dtensor_step(torch_model, torch_opt, dp_group, dp, b)),
        ):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch * c.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "mesh": spec,
        "rules": rules,
        "first_loss": {"torchmesh": first_tm, "dtensor": first_dt},
        "median_step_s": med,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "speedup": med["dtensor"] / med["torchmesh"],
        "bytes_per_step": {"torchmesh": stats.total_bytes, "dtensor": dt_bytes},
        "collectives_per_step": {"torchmesh": dict(stats.counts), "dtensor": dt_counts},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, meshes="tp:4,dp:2;tp:2", steps=30, out="train_lm.json")
    args, results = run_meshes(parser, run_mesh)
    if dist.get_rank() == 0:
        print(
            f"{model_line(args)}; {dist.get_world_size()} {args.backend} processes, "
            f"{args.steps} interleaved steps, medians"
        )
        print(
            "| mesh | torchmesh tokens/s | DTensor tokens/s | ratio | torchmesh bytes/step | DTensor bytes/step | "
            "torchmesh collectives | DTensor collectives |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            t, b, n = r["tokens_per_s"], r["bytes_per_step"], r["collectives_per_step"]
            print(
                f"| {r['mesh']} | {t['torchmesh']:,.0f} | {t['dtensor']:,.0f} | {r['speedup']:.2f}x | "
                f"{b['torchmesh']:,} | {b['dtensor']:,} | {n['torchmesh']} | {n['dtensor']} |"
            )
        save_results(args, results)
    dist.barrier()


if __name__ == "__main__":
    main()
