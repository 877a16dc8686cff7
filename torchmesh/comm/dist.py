"""The `dist` backend: one process per device, torch.distributed collectives.

One code path for gloo (CPU) and NCCL (GPU); only the process-group backend and the
default device differ, chosen by whether CUDA is available. Process groups come from
torch's DeviceMesh (one per mesh axis); device index = global rank (row-major). torch's
collectives move equal-sized blocks, so uneven blocks are padded to the largest inside the
collective and cut back after it: the padding is never visible, nor counted by comm_stats.
"""

from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist

from torchmesh.comm.backend import Data, MeshImpl, Sizes
from torchmesh.errors import (
    BackendError,
    CollectiveMismatch,
    CollectiveTimeout,
    MeshError,
)
from torchmesh.placement.mesh_shape import MeshShape, axis_groups, block_sizes

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def init_default_group(timeout: float | None = None) -> None:
    """Initialise the default process group from torchrun's environment (NCCL if CUDA, else gloo)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise BackendError(
            "backend='dist' runs one process per device: start the script with torchrun, e.g. "
            "torchrun --standalone --nproc-per-node 4 script.py (or call "
            "torch.distributed.init_process_group yourself). To run it in one process, use backend='sim'."
        )
    kwargs = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    kwargs.update(_restart_store())
    atexit.register(_shutdown)  # we made the group, we close it (gloo aborts at exit otherwise)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local), **kwargs)
    else:
        dist.init_process_group("gloo", **kwargs)


def _restart_store() -> dict:
    """After a torchrun restart (`--max-restarts`), a store of this attempt's own.

    torchrun (torch 2.9) shares its rendezvous TCPStore with the workers, and a restarted
    attempt's process group would read the dead attempt's addresses from it and fail to connect
    (pytorch/pytorch#135712). Prefixing the keys with the attempt number keeps attempts apart.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if not attempt or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    return {"store": dist.PrefixStore(f"torchmesh/attempt{attempt}/", store),
            "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}


def mismatch_message(fingerprints: list) -> str:
    groups: dict = {}
    for rank, f in enumerate(fingerprints):
        groups.setdefault(f, []).append(rank)
    lines = [
        f"  ranks {ranks}: {kind} over {axes} ({phase}) of a {dtype} shard {list(shape)} in {op or 'an op'}"
        for (kind, axes, shape, dtype, phase, op), ranks in groups.items()
    ]
    return (
        "the ranks reached different collectives; every rank must run the same program (same ops, "
        "same dims and layouts, in the same order):\n" + "\n".join(lines) + "\nFix: make the program "
        "identical on every rank (no rank-dependent branches around torchmesh ops)."
    )


def _agree(fingerprints: list, groups: tuple[tuple[int, ...], ...]) -> bool:
    """Whether every rank reached the same collective: all fingerprints equal but for the
    shape (index 2), which must be equal within each communicating group."""
    def without_shape(f: tuple) -> tuple:
        return f[:2] + f[3:]

    first = without_shape(fingerprints[0])
    if any(without_shape(f) != first for f in fingerprints):
        return False
    return all(len({fingerprints[r][2] for r in g}) == 1 for g in groups)


# Process groups are made once per process and mesh shape: every Mesh of one shape shares them.
# (A gloo group keeps threads and sockets until the process ends; a program or test suite that
# builds many Meshes would otherwise pile them up.) Keyed by the default group, which a
# restarted program re-creates.
_GROUPS: dict[tuple, object] = {}


def _device_mesh(device_type: str, shape: MeshShape):
    from torch.distributed.device_mesh import init_device_mesh

    key = ("mesh", id(dist.group.WORLD), device_type, shape)
    if key not in _GROUPS:
        _GROUPS[key] = init_device_mesh(device_type, shape.sizes, mesh_dim_names=shape.names)
    return _GROUPS[key]


def _check_group(timeout: float):
    key = ("check", id(dist.group.WORLD), timeout)
    if key not in _GROUPS:  # a side group, so a check never waits behind (or blocks) real traffic
        _GROUPS[key] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
    return _GROUPS[key]


def _shutdown() -> None:
    _GROUPS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


class DistImpl(MeshImpl):
    """This process is one device of the mesh; Data holds its one local shard."""

    name = "dist"

    def __init__(self, shape: MeshShape, timeout: float | None = None, check: bool | None = None) -> None:
        super().__init__(shape)
        init_default_group(timeout)
        world = dist.get_world_size()
        if world != shape.size:
            raise MeshError(
                f"mesh {shape} has {shape.size} devices but {world} processes are running. Fix: start "
                f"{shape.size} processes (torchrun --nproc-per-node {shape.size}) or use a mesh whose axis "
                f"sizes multiply to {world}."
            )
        cuda = dist.get_backend() == "nccl"
        self.default_device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.device_mesh = _device_mesh("cuda" if cuda else "cpu", shape)
        self._groups = {n: self.device_mesh.get_group(n) for n in shape.names}
        self.rank = dist.get_rank()
        self.prints = self.rank == 0
        self._coords = (shape.coords(self.rank),)
        if check is None:
            check = os.environ.get("TORCHMESH_CHECK", "0") not in ("", "0")
        self.checking = bool(check)
        self.timeout = 60.0 if timeout is None else float(timeout)
        if self.checking:  # a side group, so a check never waits behind (or blocks) real traffic
            self._check_group = _check_group(self.timeout)

    def verify(self, kind: str, axes: tuple[str, ...], tensor: torch.Tensor, phase: str,
               whole: tuple[int, int] | None = None) -> None:
        """Every rank must be at the same collective: same kind, axes, dtype and op, and the
        same shape within each group (blocks of an uneven split differ in size between groups,
        and within a group along a gathered dim: there the gathered size is compared)."""
        shape = list(tensor.shape)
        if whole is not None:
            shape[whole[0]] = whole[1]
        mine = (kind, axes, tuple(shape), str(tensor.dtype), phase, self.current_op)
        everyone: list = [None] * dist.get_world_size()
        try:
            dist.all_gather_object(everyone, mine, group=self._check_group)
        except RuntimeError as e:
            raise CollectiveTimeout(
                f"rank {self.rank} waited more than {self.timeout:.0f}s at {kind} over {axes} ({phase} of "
                f"{self.current_op or 'an op'}) for the other ranks: one of them runs a different program, "
                f"crashed, or is stuck. ({e})"
            ) from None
        if not _agree(everyone, axis_groups(self.shape, axes)):
            raise CollectiveMismatch(mismatch_message(everyone))

    @property
    def local_coords(self) -> tuple[tuple[int, ...], ...]:
        return self._coords

    def all_reduce(self, ts: Data, axes: tuple[str, ...], op: str) -> Data:
        t = ts[0]
        out = t.to(torch.uint8) if t.dtype == torch.bool else t.clone(memory_format=torch.contiguous_format)
        for axis in axes:  # a sum over several axes is a sum over each in turn
            dist.all_reduce(out, _OPS[op], group=self._groups[axis])
        return (out.to(torch.bool) if t.dtype == torch.bool else out,)

    def _member(self, axis: str) -> int:
        """This rank's position in its group over `axis` (its block index there)."""
        return self.coord(self._coords[0], axis)

    def all_gather(self, ts: Data, axis: str, dim: int, sizes: Sizes = None) -> Data:
        k = self.axis_size(axis)
        x = ts[0].movedim(dim, 0).contiguous()
        whole = sizes[0] if sizes else k * x.shape[0]
        if whole == k * x.shape[0]:
            out = x.new_empty((whole, *x.shape[1:]))
            dist.all_gather_into_tensor(out, x, group=self._groups[axis])
            return (out.movedim(0, dim),)
        # Uneven blocks: every rank sends its block padded to the largest; the padding is dropped.
        blocks = block_sizes(whole, k)
        mine = x.new_zeros((blocks[0], *x.shape[1:]))
        mine[: x.shape[0]] = x
        padded = x.new_empty((k * blocks[0], *x.shape[1:]))
        dist.all_gather_into_tensor(padded, mine, group=self._groups[axis])
        out = torch.cat([padded[j * blocks[0] : j * blocks[0] + n] for j, n in enumerate(blocks)])
        return (out.movedim(0, dim),)

    def reduce_scatter(self, ts: Data, axis: str, dim: int) -> Data:
        k = self.axis_size(axis)
        x = ts[0].movedim(dim, 0).contiguous()
        blocks = block_sizes(x.shape[0], k)
        if x.shape[0] % k:  # uneven: each block padded to the largest, the padding dropped after
            padded = x.new_zeros((k, blocks[0], *x.shape[1:]))
            for j, piece in enumerate(x.tensor_split(k)):
                padded[j, : blocks[j]] = piece
            x = padded.flatten(0, 1)
        out = x.new_empty((blocks[0], *x.shape[1:]))
        dist.reduce_scatter_tensor(out, x, group=self._groups[axis])
        return (out[: blocks[self._member(axis)]].movedim(0, dim),)

    def all_to_all(self, ts: Data, axis: str, gather_dim: int, split_dim: int, sizes: Sizes = None) -> Data:
        t, k = ts[0], self.axis_size(axis)
        whole = sizes[0] if sizes else k * t.shape[gather_dim]
        if t.shape[split_dim] % k == 0 and whole == k * t.shape[gather_dim]:
            return (self._all_to_all_even(t, axis, gather_dim, split_dim),)
        # Uneven: piece j (a balanced block of split_dim) padded to the largest piece on both
        # dims, one equal-sized exchange, then each received piece cut back to its true size.
        send_sizes, recv_sizes = block_sizes(t.shape[split_dim], k), block_sizes(whole, k)
        shape = list(t.shape)
        shape[split_dim], shape[gather_dim] = send_sizes[0], recv_sizes[0]
        send = t.new_zeros((k, *shape))
        for j, piece in enumerate(t.tensor_split(k, split_dim)):
            send[j][tuple(slice(0, n) for n in piece.shape)] = piece
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self._groups[axis])
        me = self._member(axis)
        pieces = [recv[j].narrow(gather_dim, 0, recv_sizes[j]).narrow(split_dim, 0, send_sizes[me])
                  for j in range(k)]
        return (torch.cat(pieces, gather_dim),)

    def _all_to_all_even(self, t: torch.Tensor, axis: str, gather_dim: int, split_dim: int) -> torch.Tensor:
        k = self.axis_size(axis)
        x = t.movedim(split_dim, 0).contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self._groups[axis])
        m = x.shape[0] // k
        y = out.view(k, m, *x.shape[1:]).movedim(1, split_dim + 1)  # [k, local dims with split m]
        y = y.movedim(0, gather_dim)  # k just before the gathered dim
        shape = list(y.shape)
        shape[gather_dim : gather_dim + 2] = [shape[gather_dim] * shape[gather_dim + 1]]
        return y.reshape(shape)

    def shift(self, ts: Data, axes: tuple[str, ...], offset: int, wrap: bool) -> Data:
        t = ts[0].contiguous()
        group = next(g for g in axis_groups(self.shape, axes) if self.rank in g)
        k, r = len(group), group.index(self.rank)
        dst, src = r + offset, r - offset
        if wrap:
            dst, src = dst % k, src % k
        out = torch.zeros_like(t)
        ops = []
        if 0 <= dst < k and group[dst] != self.rank:
            ops.append(dist.P2POp(dist.isend, t, group[dst]))
        if 0 <= src < k:
            if group[src] == self.rank:
                out.copy_(t)
            else:
                ops.append(dist.P2POp(dist.irecv, out, group[src]))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return (out,)

    def global_value(self, data: Data) -> torch.Tensor:
        return data[0]
