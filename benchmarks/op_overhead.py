"""Eager per-op overhead of torchmesh against plain torch, on a 1-device mesh.

    python benchmarks/op_overhead.py                  # sim, CPU: prints a table, saves benchmarks/results/op_overhead.json
    python benchmarks/op_overhead.py --backend nccl   # one process on one GPU (a 1-device dist mesh)

On a mesh of one device no collective runs, so the difference from plain torch is the
cost of planning (a cached dict lookup) and of wrapping results: the eager hot path.
Both sides run interleaved in one process; medians of many iterations. On a GPU the time
of a call is its host-side cost (kernels are queued, not waited for): the eager overhead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from launch import init_process_group, relaunch_under_torchrun

import torchmesh as tm


def median_us(fn, iters: int = 2000) -> float:
    for _ in range(50):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backend", choices=("sim", "gloo", "nccl"), default="sim", help="sim: one process; gloo/nccl: a dist mesh"
    )
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "op_overhead.json")
    args = parser.parse_args()
    args.processes = 1
    device = torch.device("cpu")
    if args.backend == "sim":
        torch.set_num_threads(1)
    else:
        relaunch_under_torchrun(args, default_nproc=1)
        device = init_process_group(args)
    mesh = tm.Mesh("dp:1;tp:1", rules="batch:dp;ff:tp", backend="sim" if args.backend == "sim" else "dist")
    a, b = torch.randn(8, 16, device=device), torch.randn(16, 32, device=device)
    x, w = tm.distribute(a, "batch d", mesh), tm.distribute(b, "d ff", mesh)
    h, hh = tm.einsum("batch d, d ff -> batch ff", x, w), a @ b
    cases = {
        "einsum": (lambda: tm.einsum("batch d, d ff -> batch ff", x, w), lambda: torch.einsum("bd,df->bf", a, b)),
        # the same einsum against torch's fastest spelling of it (ours lowers to one mm)
        "einsum vs @": (lambda: tm.einsum("batch d, d ff -> batch ff", x, w), lambda: a @ b),
        "add": (lambda: h + h, lambda: hh + hh),
        "sum(ff)": (lambda: h.sum("ff"), lambda: hh.sum(1)),
        "softmax(ff)": (lambda: tm.softmax(h, "ff"), lambda: torch.softmax(hh, 1)),
    }
    rows = []
    for name, (ours, plain) in cases.items():
        t_ours, t_plain = median_us(ours, args.iters), median_us(plain, args.iters)
        rows.append(
            {
                "op": name,
                "torchmesh_us": round(t_ours, 2),
                "torch_us": round(t_plain, 2),
                "overhead_us": round(t_ours - t_plain, 2),
            }
        )
    print(f"{'op':<13} {'torchmesh us':>13} {'torch us':>9} {'overhead us':>12}")
    for r in rows:
        print(f"{r['op']:<13} {r['torchmesh_us']:>13.2f} {r['torch_us']:>9.2f} {r['overhead_us']:>12.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"backend": args.backend, "rows": rows}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
