"""One process per device for the benchmarks: gloo on CPUs (the default) or NCCL on GPUs.

    parser = argparse.ArgumentParser(...)
    add_launch_args(parser, nproc=4)
    args = parser.parse_args()
    relaunch_under_torchrun(args)       # returns only inside a torchrun worker
    device = init_process_group(args)   # cpu, or this rank's cuda device

`--backend nccl` runs one process per GPU (`--processes` defaults to every visible GPU); the
benchmark puts its tensors and modules on the device `init_process_group` returns (not
through torch.set_default_device, whose function mode would tax every op it times), and
torchmesh's `dist` backend uses NCCL as soon as the process group does.
`--backend gloo` runs CPU processes with one thread each, as the tables in
docs/performance.md were measured.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
import torch.distributed as dist


def add_launch_args(parser: argparse.ArgumentParser, nproc: int) -> None:
    parser.add_argument(
        "--backend", choices=("gloo", "nccl"), default="gloo", help="gloo: CPU processes; nccl: one process per GPU"
    )
    parser.add_argument(
        "--processes", type=int, default=None, help=f"processes (default: {nproc} on gloo, every visible GPU on nccl)"
    )


def world_size(args: argparse.Namespace, default: int) -> int:
    if args.processes is not None:
        return args.processes
    if args.backend == "nccl":
        if not torch.cuda.is_available():
            raise SystemExit("--backend nccl needs CUDA GPUs; none is visible (torch.cuda.is_available() is False).")
        return torch.cuda.device_count()
    return default


def relaunch_under_torchrun(args: argparse.Namespace, default_nproc: int) -> None:
    """Start this script again under torchrun on `--processes` processes, unless it is one of them."""
    if "RANK" in os.environ:
        return
    n = world_size(args, default_nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *sys.argv]
    raise SystemExit(subprocess.call(cmd))


def init_process_group(args: argparse.Namespace) -> torch.device:
    """The default process group on `args.backend`; returns this rank's device."""
    if args.backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (timings on a GPU end here)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
