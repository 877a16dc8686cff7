"""Tensor parallelism on 2 gloo processes: torchmesh against a hand-written Megatron-style
version (raw torch.distributed calls) and against DTensor's parallelize_module.

    python benchmarks/tp_mlp.py                 # ~2 minutes on 2 cores
    python benchmarks/tp_mlp.py --steps 50      # a quicker, noisier run
    python benchmarks/tp_mlp.py --backend nccl  # 2 GPUs (--processes N for more: tp:N)

It starts 2 processes itself under torchrun (gloo on 127.0.0.1, one thread each; NCCL, one
GPU each, with `--backend nccl`) and prints three tables:
1. fwd+bwd step time of a TP MLP (B=8 D=64 F=256 and B=64 D=256 F=1024) and of a Transformer block
   (attention with heads split + MLP), the three versions interleaved step by step,
   medians of many steps, ratios to the raw version (of the medians, and the median of each
   round's ratio);
2. eager per-op overhead on small tensors (einsum, add, sum; layouts that need no
   communication) against DTensor and plain torch on the local shards;
3. bytes each device sends per step: torchmesh's comm_stats against DTensor's collectives
   as seen by CommDebugMode, both counted with the same ring formulas.
Every version's loss is checked equal before timing. Results: benchmarks/results/tp_mlp.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from launch import add_launch_args, init_process_group, relaunch_under_torchrun, synchronize
from op_overhead import median_us
from torch import nn

HERE = Path(__file__).resolve().parent
DEVICE = torch.device("cpu")  # this rank's device: set by main (a GPU with --backend nccl)

MLP = dict(B=64, D=256, F=1024)
SMALL_MLP = dict(B=8, D=64, F=256)  # where the eager overhead shows most
BLOCK = dict(B=8, S=128, D=256, H=8, DH=32, F=1024)
#: The MLPs take about a millisecond a step, so their ratios are the noisiest: they are timed
#: over this many times `--steps` steps (a few seconds more).
MLP_STEPS = 5


# ---- raw torch.distributed (Megatron's f and g operators) -----------------------------------
class _AllReduce(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        return g


class _CopyToParallel(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


def local_cols(w: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's block of `w` along `dim` (2 ranks)."""
    return w.chunk(dist.get_world_size(), dim)[dist.get_rank()].clone().requires_grad_()


def causal_mask(s: int) -> torch.Tensor:
    return torch.full((s, s), float("-inf"), device=DEVICE).triu(1)


# ---- the three versions of each workload -------------------------------------------------------
def mlp_versions(mesh, device_mesh, shape: dict = MLP):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import torchmesh as tm

    B, D, Fd = shape["B"], shape["D"], shape["F"]
    torch.manual_seed(0)
    x = torch.randn(B, D, device=DEVICE)
    w1, w2 = torch.randn(D, Fd, device=DEVICE) / D**0.5, torch.randn(Fd, D, device=DEVICE) / Fd**0.5

    tx = tm.distribute(x, "batch d_model", mesh)
    tw1 = tm.distribute(w1, "d_model ff", mesh, requires_grad=True)
    tw2 = tm.distribute(w2, "ff d_model", mesh, requires_grad=True)

    def torchmesh_step():
        h = torch.relu(tm.einsum("batch d_model, d_model ff -> batch ff", tx, tw1))
        y = tm.einsum("batch ff, ff d_model -> batch d_model", h, tw2)
        loss = (y * y).sum()
        loss.backward()
        tw1.grad = tw2.grad = None
        return loss.item()

    rw1, rw2 = local_cols(w1, 1), local_cols(w2, 0)

    def raw_step():
        y = _AllReduce.apply(torch.relu(x @ rw1) @ rw2)
        loss = (y * y).sum()
        loss.backward()
        rw1.grad = rw2.grad = None
        return loss.item()

    model = nn.Sequential()
    model.add_module("w1", nn.Linear(D, Fd, bias=False, device=DEVICE))
    model.add_module("relu", nn.ReLU())
    model.add_module("w2", nn.Linear(Fd, D, bias=False, device=DEVICE))
    with torch.no_grad():
        model.w1.weight.copy_(w1.T)
        model.w2.weight.copy_(w2.T)
    model = parallelize_module(model, device_mesh, {"w1": ColwiseParallel(), "w2": RowwiseParallel()})

    def dtensor_step():
        y = model(x)
        loss = (y * y).sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    return {"torchmesh": torchmesh_step, "raw": raw_step, "dtensor": dtensor_step}


class Block(nn.Module):
    """A plain torch Transformer block (no norms), torchtitan style: heads inferred from shapes."""

    def __init__(self, D, H, DH, Fd):
        super().__init__()
        self.dh = DH
        self.wq, self.wk, self.wv = (nn.Linear(D, H * DH, bias=False) for _ in range(3))
        self.wo = nn.Linear(H * DH, D, bias=False)
        self.w1, self.w2 = nn.Linear(D, Fd, bias=False), nn.Linear(Fd, D, bias=False)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, -1, self.dh).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dh) + mask, -1)
        x = x + self.wo((att @ v).transpose(1, 2).reshape(b, s, -1))
        return x + self.w2(torch.relu(self.w1(x)))


def block_versions(mesh, device_mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import torchmesh as tm

    B, S, D, H, DH, Fd = (BLOCK[k] for k in ("B", "S", "D", "H", "DH", "F"))
    torch.manual_seed(0)
    ref = Block(D, H, DH, Fd).to(DEVICE)
    x = torch.randn(B, S, D, device=DEVICE)
    mask = causal_mask(S)

    # torchmesh: the weights by name, heads and ff split over tp by the rules.
    wq, wk, wv = (
        tm.distribute(w.weight.detach().T.reshape(D, H, DH), "d_model heads d_head", mesh, requires_grad=True)
        for w in (ref.wq, ref.wk, ref.wv)
    )
    wo = tm.distribute(ref.wo.weight.detach().T.reshape(H, DH, D), "heads d_head d_model", mesh, requires_grad=True)
    w1 = tm.distribute(ref.w1.weight.detach().T.contiguous(), "d_model ff", mesh, requires_grad=True)
    w2 = tm.distribute(ref.w2.weight.detach().T.contiguous(), "ff d_model", mesh, requires_grad=True)
    params = (wq, wk, wv, wo, w1, w2)
    tx = tm.distribute(x, "batch seq d_model", mesh)
    tmask = tm.distribute(mask, "seq kv_seq", mesh)

    def torchmesh_step():
        q = tm.einsum("batch seq d_model, d_model heads d_head -> batch heads seq d_head", tx, wq)
        xk = tx.rename(seq="kv_seq")
        k = tm.einsum("batch kv_seq d_model, d_model heads d_head -> batch heads kv_seq d_head", xk, wk)
        v = tm.einsum("batch kv_seq d_model, d_model heads d_head -> batch heads kv_seq d_head", xk, wv)
        s = tm.einsum("batch heads seq d_head, batch heads kv_seq d_head -> batch heads seq kv_seq", q, k)
        att = tm.softmax(s * (1 / math.sqrt(DH)) + tmask, "kv_seq")
        o = tm.einsum("batch heads seq kv_seq, batch heads kv_seq d_head -> batch seq heads d_head", att, v)
        h = tx + tm.einsum("batch seq heads d_head, heads d_head d_model -> batch seq d_model", o, wo)
        f = torch.relu(tm.einsum("batch seq d_model, d_model ff -> batch seq ff", h, w1))
        y = h + tm.einsum("batch seq ff, ff d_model -> batch seq d_model", f, w2)
        loss = (y * y).mean()
        loss.backward()
        for p in params:
            p.grad = None
        return loss.item()

    # raw: this rank's heads and ff columns, f/g operators where Megatron puts them.
    cols = lambda lin: local_cols(lin.weight.detach().T, 1)
    rq, rk, rv, r1 = cols(ref.wq), cols(ref.wk), cols(ref.wv), cols(ref.w1)
    ro, r2 = local_cols(ref.wo.weight.detach().T, 0), local_cols(ref.w2.weight.detach().T, 0)
    raw_params = (rq, rk, rv, ro, r1, r2)

    def raw_step():
        b, s, _ = x.shape
        q, k, v = ((x @ w).view(b, s, -1, DH).transpose(1, 2) for w in (rq, rk, rv))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DH) + mask, -1)
        h = x + _AllReduce.apply((att @ v).transpose(1, 2).reshape(b, s, -1) @ ro)
        y = h + _AllReduce.apply(torch.relu(_CopyToParallel.apply(h) @ r1) @ r2)
        loss = (y * y).mean()
        loss.backward()
        for p in raw_params:
            p.grad = None
        return loss.item()

    model = parallelize_module(
        ref,
        device_mesh,
        {
            "wq": ColwiseParallel(),
            "wk": ColwiseParallel(),
            "wv": ColwiseParallel(),
            "wo": RowwiseParallel(),
            "w1": ColwiseParallel(),
            "w2": RowwiseParallel(),
        },
    )

    def dtensor_step():
        y = model(x, mask)
        loss = (y * y).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    return {"torchmesh": torchmesh_step, "raw": raw_step, "dtensor": dtensor_step}


# ---- measuring ---------------------------------------------------------------------------------
def interleaved_ms(fns: dict, steps: int, warmup: int = 10) -> tuple[dict[str, float], dict[str, float]]:
    """Median step time of each version, the versions taking turns step by step; and each
    version's median ratio to "raw" over the rounds (paired: the two steps of a round run
    moments apart, so load that drifts during the run cancels)."""
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + steps):
        for n in names[i % len(names) :] + names[: i % len(names)]:  # rotate who goes first
            dist.barrier()
            t0 = time.perf_counter()
            fns[n]()
            dt = time.perf_counter() - t0
            if i >= warmup:
                samples[n].append(dt)
    ms = {n: statistics.median(s) * 1e3 for n, s in samples.items()}
    ratios = {n: statistics.median(a / b for a, b in zip(s, samples["raw"])) for n, s in samples.items()}
    return ms, ratios


def op_overhead_us(mesh, device_mesh, iters: int) -> list[dict]:
    """Small ops whose layouts need no communication: the cost of the eager machinery."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import torchmesh as tm

    a, b = torch.randn(8, 16, device=DEVICE), torch.randn(16, 32, device=DEVICE)
    x, w = tm.distribute(a, "batch d", mesh), tm.distribute(b, "d ff", mesh)
    h = tm.einsum("batch d, d ff -> batch ff", x, w)
    da, db = distribute_tensor(a, device_mesh, [Replicate()]), distribute_tensor(b, device_mesh, [Shard(1)])
    dh = da @ db
    la, lb = a, b.chunk(dist.get_world_size(), 1)[dist.get_rank()].contiguous()
    lh = la @ lb
    cases = {
        "einsum": (lambda: tm.einsum("batch d, d ff -> batch ff", x, w), lambda: da @ db, lambda: la @ lb),
        "add": (lambda: h + h, lambda: dh + dh, lambda: lh + lh),
        "sum(batch)": (lambda: h.sum("batch"), lambda: dh.sum(0), lambda: lh.sum(0)),
    }
    rows = []
    for op, fns in cases.items():
        ours, theirs, plain = (median_us(fn, iters) for fn in fns)
        rows.append({"op": op, "torchmesh_us": ours, "dtensor_us": theirs, "torch_us": plain})
    return rows


def step_bytes(mesh, versions: dict) -> dict:
    """Bytes each device sends in one step, counted the same way for both libraries."""
    import torchmesh as tm

    with tm.comm_stats() as stats:
        versions["torchmesh"]()
    with dtensor_bytes_mode() as dt:
        versions["dtensor"]()
    return {
        "torchmesh": {"bytes": stats.total_bytes, "counts": stats.counts},
        "dtensor": {"bytes": dt.bytes, "counts": dict(dt.counts)},
    }


def dtensor_bytes_mode():
    """CommDebugMode that also adds up bytes per device with torchmesh's ring formulas."""
    from collections import Counter

    from torch.distributed.tensor.debug import CommDebugMode

    from torchmesh.comm.stats import bytes_sent

    kinds = {
        "all_reduce": "all_reduce",
        "all_gather_into_tensor": "all_gather",
        "reduce_scatter_tensor": "reduce_scatter",
        "all_to_all_single": "all_to_all",
    }

    class Mode(CommDebugMode):
        def __init__(self):
            super().__init__()
            self.bytes, self.counts = 0, Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._overloadpacket.__name__
            if name in kinds and isinstance(args[0], torch.Tensor):
                k = dist.get_world_size()
                self.bytes += bytes_sent(kinds[name], k, args[0].numel() * args[0].element_size())
                self.counts[kinds[name]] += 1
            return super().__torch_dispatch__(func, types, args, kwargs)

    return Mode()


def rank_body(steps: int, op_iters: int) -> dict:
    import torchmesh as tm

    mesh = tm.Mesh(f"tp:{dist.get_world_size()}", rules="ff:tp;heads:tp", backend="dist")
    device_mesh = mesh.impl.device_mesh
    out = {}
    workloads = (  # (name, build, how many times `steps` it is timed over)
        ("mlp_small", lambda m, d: mlp_versions(m, d, SMALL_MLP), MLP_STEPS),
        ("mlp", mlp_versions, MLP_STEPS),
        ("block", block_versions, 1),
    )
    for name, build, times in workloads:
        versions = build(mesh, device_mesh)
        losses = {n: fn() for n, fn in versions.items()}
        ref = losses["raw"]
        for n, v in losses.items():
            assert abs(v - ref) <= 1e-4 * abs(ref), f"{name}: {n} loss {v} != raw {ref}"
        ms, ratios = interleaved_ms(versions, steps * times)
        out[name] = {"ms": ms, "ratio_to_raw": ratios, "bytes": step_bytes(mesh, versions), "loss": losses}
    out["ops"] = op_overhead_us(mesh, device_mesh, op_iters)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--op-iters", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "tp_mlp.json")
    add_launch_args(parser, nproc=2)
    args = parser.parse_args()
    relaunch_under_torchrun(args, default_nproc=2)
    global DEVICE
    DEVICE = init_process_group(args)
    result = rank_body(args.steps, args.op_iters)
    synchronize(DEVICE)
    if dist.get_rank() == 0:
        report(args, result)
    dist.barrier()
    dist.destroy_process_group()


def report(args: argparse.Namespace, result: dict) -> None:
    world = dist.get_world_size()
    print(
        f"fwd+bwd step, {world} {args.backend} processes, medians of {args.steps * MLP_STEPS} (MLPs) "
        f"and {args.steps} (block) interleaved steps"
    )
    print("(tm/raw: the ratio of the medians; paired: the median of each round's ratio)")
    print(
        f"{'workload':<9} {'torchmesh ms':>12} {'raw ms':>7} {'dtensor ms':>10} {'tm/raw':>6} {'paired':>6} "
        f"{'dtensor/raw':>11} {'tm/dtensor':>10}"
    )
    for name in ("mlp_small", "mlp", "block"):
        ms, paired = result[name]["ms"], result[name]["ratio_to_raw"]
        print(
            f"{name:<9} {ms['torchmesh']:>12.3f} {ms['raw']:>7.3f} {ms['dtensor']:>10.3f} "
            f"{ms['torchmesh'] / ms['raw']:>6.2f} {paired['torchmesh']:>6.2f} {ms['dtensor'] / ms['raw']:>11.2f} "
            f"{ms['torchmesh'] / ms['dtensor']:>10.2f}"
        )
    print("\neager per-op time on small tensors (no communication), microseconds")
    print(f"{'op':<11} {'torchmesh':>10} {'dtensor':>9} {'torch':>7} {'tm/dtensor':>11}")
    for r in result["ops"]:
        print(
            f"{r['op']:<11} {r['torchmesh_us']:>10.1f} {r['dtensor_us']:>9.1f} {r['torch_us']:>7.1f} "
            f"{r['torchmesh_us'] / r['dtensor_us']:>11.2f}"
        )
    print("\nbytes each device sends per step (ring formulas)")
    for name in ("mlp_small", "mlp", "block"):
        b = result[name]["bytes"]
        print(
            f"{name:<8} torchmesh {b['torchmesh']['bytes']:>9} {b['torchmesh']['counts']}   "
            f"dtensor {b['dtensor']['bytes']:>9} {b['dtensor']['counts']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "args": {**vars(args), "out": str(args.out)},
                "mlp_small_shape": SMALL_MLP,
                "mlp_shape": MLP,
                "block_shape": BLOCK,
                **result,
            },
            indent=2,
        )
    )
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
