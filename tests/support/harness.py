"""Run a test body on N real processes over gloo on 127.0.0.1 (torch.distributed), the way
torchrun would: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set, a free port,
a timeout, every rank's failure reported, and no process left behind.

    results = run_distributed(body, nprocs=4, args=(...))   # body(*args) on every rank

`body` must be a module-level function (it is pickled by name). Its return values, one per
rank, come back in rank order.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable
from multiprocessing import reduction
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ParentFd:
    """A file descriptor of the test's process (its stdout, stderr: what pytest captures),
    handed over to a rank started from the fork server (which has the server's own)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):  # pickled while the rank starts: the fd travels with it
        return (_received, (reduction.DupFd(self.fd),))


def _received(dup: Any) -> int:
    return dup.detach()


def _entry(
    fn: Callable, rank: int, world: int, port: int, results: mp.Queue, args: tuple, environ: dict[str, str], fds: tuple
) -> None:
    os.environ.clear()  # the test's environment and output, as spawn would give them
    os.environ.update(environ)
    for fd, parents in zip((1, 2), fds):
        os.dup2(parents, fd)
        os.close(parents)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        # Pickled here by value: a queue would share tensors' storages by file descriptor,
        # which fails when this process has exited before the parent reads them.
        results.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class DistributedFailure(AssertionError):
    """One or more ranks failed or timed out; the message holds every rank's traceback."""


#: What a rank reports when another process took the free port before rank 0 listened on it.
_PORT_TAKEN = "EADDRINUSE"


def run_distributed(
    fn: Callable, nprocs: int, args: tuple = (), timeout: float = 180.0, wait_all: bool = False
) -> list[Any]:
    """`wait_all`: when a rank dies, still wait (up to `timeout`) for the others' reports (a
    crashed-rank test asserts what the survivors raise).

    The free port is free when chosen, but another process (a parallel test worker) may
    take it before rank 0 listens on it: then the ranks are stopped and started again on
    another port (at most three tries)."""
    for attempt in range(3):
        try:
            return _run_once(fn, nprocs, args, timeout, wait_all)
        except DistributedFailure as e:
            if _PORT_TAKEN not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _context() -> Any:
    """Ranks start from a fork server that has imported torch and torchmesh once (per test
    worker): a fresh process each, as with spawn, without paying ~2 s of imports every time
    (hundreds of ranks in a suite run). Nothing has run in the server, so no thread, process
    group or cache is inherited; each rank gets the test's current environment."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torchmesh"])
    return ctx


def _run_once(fn: Callable, nprocs: int, args: tuple, timeout: float, wait_all: bool) -> list[Any]:
    ctx = _context()
    results: mp.Queue = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    procs = [
        ctx.Process(
            target=_entry, args=(fn, r, nprocs, port, results, args, environ, (_ParentFd(1), _ParentFd(2))), daemon=True
        )
        for r in range(nprocs)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    outcome: dict[int, tuple[str, Any]] = {}
    port_taken = False
    try:
        while len(outcome) < nprocs:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
                outcome[rank] = (status, pickle.loads(value) if status == "ok" else value)
                if status == "error" and _PORT_TAKEN in value:
                    port_taken = True  # the others wait for a rendezvous that will not come:
                    break  # stop them now
            except queue_mod.Empty:
                if all(p.exitcode is not None for p in procs) or (
                    not wait_all and any(p.exitcode not in (None, 0) for p in procs) and results.empty()
                ):
                    time.sleep(0.5)  # let a dying rank's report arrive
                    if results.empty():
                        break
    finally:
        for p in procs:
            p.join(timeout=0 if port_taken else max(0.0, min(10.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [f"--- rank {r} ---\n{v}" for r, (s, v) in sorted(outcome.items()) if s == "error"]
    missing = [r for r in range(nprocs) if r not in outcome]
    if missing:
        errors.append(
            f"ranks {missing} did not finish within {timeout:.0f}s (exit codes {[procs[r].exitcode for r in missing]})"
        )
    if errors:
        raise DistributedFailure("\n".join(errors))
    return [outcome[r][1] for r in range(nprocs)]
