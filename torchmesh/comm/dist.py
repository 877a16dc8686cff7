"""The `dist` backend: one process per device, torch.distributed collectives.

One code path for gloo (CPU) and NCCL (GPU); only the process-group backend and the
default device differ, chosen by whether CUDA is available. Process groups come from
torch's DeviceMesh (one per mesh axis); device index = global rank (row-major). torch's
collectives move equal-sized blocks, so uneven blocks are padded to the largest inside the
collective and cut back after it: the padding is never visible, nor counted by comm_stats.

Ranks that disagree get an error on every rank, never a silent wrong value or a long hang
(docs/reliability.md): every process group gets `timeout` (default 300 s, TORCHMESH_TIMEOUT);
the mesh's shape and rules, each new op plan and each new collective are agreed once on a
side gloo group; with the check on (`TORCHMESH_CHECK=1`), every collective is, with its op,
the user's call site and its place in the program.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from torchmesh.comm import functional, traced
from torchmesh.comm.backend import Data, Done, MeshImpl, Pending, Sizes, compiling
from torchmesh.errors import (
    BackendError,
    CollectiveMismatch,
    CollectiveTimeout,
    MeshError,
)
from torchmesh.placement.mesh_shape import MeshShape, axis_groups, block_sizes
from torchmesh.placement.op_plan import OpPlan

#: Seconds a collective waits for the other ranks before raising (`tm.Mesh(..., timeout=)`
#: or the TORCHMESH_TIMEOUT environment variable override it). gloo's own default is 30 min.
DEFAULT_TIMEOUT = 300.0
#: Seconds that making a process group (rendezvous through the store) may take, at least:
#: short collective timeouts must not fail a slow start.
_SETUP_TIMEOUT = 120.0

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
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    kwargs.update(_restart_store())
    atexit.register(_shutdown)  # we made the group, we close it (gloo aborts at exit otherwise)
    with gloo_chatter_hidden():
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local), **kwargs)
        else:
            dist.init_process_group("gloo", **kwargs)


@contextlib.contextmanager
def gloo_chatter_hidden():
    """Make process groups without gloo's "[Gloo] Rank 0 is connected to 1 peer ranks. Expected
    number of connected peer ranks is : 1" line (one per group and rank).

    gloo (torch 2.9) prints it from C++ with std::cout while the group is made, so no log level
    (TORCH_CPP_LOG_LEVEL included) controls it; it is written to file descriptor 1 before any
    Python code can look at it. So while a group is made, descriptor 1 points at a temporary
    file; afterwards the gloo lines are dropped, or written to stderr when TORCHMESH_VERBOSE=1,
    and anything else written meanwhile is passed on to stdout.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout to protect
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            held.seek(0)
            lines = held.read().splitlines(keepends=True)
            gloo = b"".join(line for line in lines if line.startswith(b"[Gloo] "))
            other = b"".join(line for line in lines if not line.startswith(b"[Gloo] "))
            if other:
                os.write(1, other)
            if gloo and os.environ.get("TORCHMESH_VERBOSE", "0") not in ("", "0"):
                sys.stderr.flush()
                os.write(2, gloo)


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
    return {
        "store": dist.PrefixStore(f"torchmesh/attempt{attempt}/", store),
        "rank": int(os.environ["RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
    }


def default_timeout() -> float:
    """The collective timeout in seconds: TORCHMESH_TIMEOUT if set, else DEFAULT_TIMEOUT."""
    text = os.environ.get("TORCHMESH_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise BackendError(
            f"TORCHMESH_TIMEOUT={text!r} is not a number of seconds. Fix: e.g. TORCHMESH_TIMEOUT=300."
        ) from None
    if value <= 0:
        raise BackendError(f"TORCHMESH_TIMEOUT={text!r} must be positive seconds.")
    return value


_TORCHMESH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_SKIPPED = (_TORCHMESH_DIR, _TORCH_DIR, os.path.dirname(os.__file__) + os.sep + "contextlib.py")


def call_site() -> tuple[str, str]:
    """(the user's call site "file.py:line", the torchmesh entry point it called): the first
    frame outside torchmesh, torch and contextlib, and the outermost torchmesh frame below it.
    The file's base name only, so that ranks running one script from different paths agree."""
    frame: FrameType | None = sys._getframe(1)
    entry = ""
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_TORCHMESH_DIR):
            entry = frame.f_code.co_qualname
        elif not name.startswith(_SKIPPED):
            return f"{os.path.basename(name)}:{frame.f_lineno}", entry
        frame = frame.f_back
    return "?", entry


def mismatch_message(fingerprints: list, what: str = "collectives") -> str:
    """Which ranks were where, one line per distinct fingerprint
    (kind, axes, shape, dtype, phase, op, site, seq)."""
    groups: dict = {}
    for rank, f in enumerate(fingerprints):
        groups.setdefault(f, []).append(rank)
    lines = []
    for (kind, axes, shape, dtype, phase, op, site, seq), ranks in groups.items():
        if kind == "op":
            lines.append(f"  ranks {ranks}: {op} ({phase}) called at {site}")
        else:
            lines.append(
                f"  ranks {ranks}: {kind} over {axes} ({phase}) of a {dtype} shard {list(shape)} "
                f"in {op or 'an op'}, called at {site} (collective #{seq})"
            )
    return (
        f"the ranks reached different {what}; every rank must run the same program (same ops, "
        "same dims, dtypes and layouts, in the same order):\n" + "\n".join(lines) + "\nFix: make the "
        "program identical on every rank (no rank-dependent branches around torchmesh ops)."
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


#: What this process has agreed with the others once (op plans, collective signatures), so
#: that default mode pays one small side collective per distinct one. Bounded: when full it is
#: emptied, on every rank at the same point (a correct program adds the same keys in order).
_SEEN: dict = {}
_SEEN_LIMIT = 4096


def _first_use(key, value=None) -> bool:
    if key in _SEEN:
        return False
    if len(_SEEN) >= _SEEN_LIMIT:
        _SEEN.clear()
    _SEEN[key] = value
    return True


# Process groups are made once per process and mesh shape: every Mesh of one shape shares them.
# (A gloo group keeps threads and sockets until the process ends; a program or test suite that
# builds many Meshes would otherwise pile them up.) Keyed by the default group, which a
# restarted program re-creates.
_GROUPS: dict[tuple, object] = {}


class _InFlight:
    """An asynchronous all-reduce of one tensor over `axes` (the first in flight)."""

    def __init__(self, impl: DistImpl, tensor: torch.Tensor, work: Any, axes: tuple[str, ...], op: str) -> None:
        self.impl, self.tensor, self.work, self.axes, self.op = impl, tensor, work, axes, op

    def wait(self) -> Data:
        try:
            self.work.wait()
            for axis in self.axes[1:]:
                dist.all_reduce(self.tensor, _OPS[self.op], group=self.impl._groups[axis])
        except RuntimeError as e:
            raise self.impl._failed("all_reduce", self.axes, e) from None
        return (self.tensor,)


class _Started:
    """An asynchronous collective (`kind`) over `axis`; its result, `out`, is complete once
    waited for."""

    def __init__(self, impl: DistImpl, work: Any, out: torch.Tensor, kind: str, axis: str) -> None:
        self.impl, self.work, self.out, self.kind, self.axis = impl, work, out, kind, axis

    def wait(self) -> Data:
        try:
            self.work.wait()
        except RuntimeError as e:
            raise self.impl._failed(self.kind, (self.axis,), e) from None
        return (self.out,)


def _device_mesh(device_type: str, shape: MeshShape):
    from torch.distributed.device_mesh import init_device_mesh

    key = ("mesh", id(dist.group.WORLD), device_type, shape)
    if key not in _GROUPS:
        with gloo_chatter_hidden():
            _GROUPS[key] = init_device_mesh(device_type, shape.sizes, mesh_dim_names=shape.names)
    return _GROUPS[key]


def _set_timeout(group, timeout: float) -> None:
    """Make `group`'s collectives give up after `timeout` seconds (gloo's default is 30 min;
    torch's DeviceMesh makes its groups with that default)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(datetime.timedelta(seconds=timeout), group)


def _check_group(timeout: float):
    """The side gloo group of agreements and checks (one per process and default group), so a
    check never waits behind (or blocks) real traffic."""
    key = ("check", id(dist.group.WORLD))
    _TIMEOUT[0] = timeout
    if key not in _GROUPS:
        with gloo_chatter_hidden():
            _GROUPS[key] = dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=max(timeout, _SETUP_TIMEOUT))
            )  # its creation waits for every rank's store entry
    _set_timeout(_GROUPS[key], timeout)
    return _GROUPS[key]


_TIMEOUT: list = [None]  # the latest mesh's timeout (what agree_call waits by default)
_SEQ = [0]  # agreements made by this process on the side group (the same on every rank)


def _gather(payload: tuple, timeout: float, waiting: str) -> list:
    """Every rank's `payload` (on the side group); a rank missing for `timeout` seconds, or
    gone, raises CollectiveTimeout naming what this rank was waiting at."""
    world = dist.get_world_size()
    group = _GROUPS[("check", id(dist.group.WORLD))]
    everyone: list = [None] * world
    try:
        # Most agreements agree: one all-gather of a 16-byte digest settles them; only when the
        # digests differ (a mismatch, or shapes that legitimately differ between groups) does
        # every rank (each sees the same digests) gather the payloads themselves.
        # (repr, not pickle: pickle's bytes depend on which equal strings are one object)
        digest = hashlib.blake2b(repr(payload).encode(), digest_size=16).digest()
        mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
        digests = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(digests, mine, group=group)
        if all(torch.equal(d, mine) for d in digests):
            return [payload] * world
        dist.all_gather_object(everyone, payload, group=group)
    except RuntimeError as e:
        raise CollectiveTimeout(
            f"rank {dist.get_rank()} waited more than {timeout:.0f}s at {waiting} for the other ranks, "
            f"or one of them left: one of them runs a different program, crashed, or is stuck. "
            f"Fix: run the same program on every rank; the timeout is tm.Mesh(..., timeout=seconds) or "
            f"TORCHMESH_TIMEOUT. ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    return everyone


def agree_call(what: str, timeout: float | None = None) -> None:
    """Every rank must be at the same torchmesh call (`what`, e.g. "tm.save('ckpt')", and the
    user's line): raise CollectiveMismatch on every rank if not, CollectiveTimeout on the ranks
    that waited `timeout` seconds for ranks that never came (a rank-0-only call). Nothing when
    no process group runs.

    >>> agree_call("tm.save('ckpt')")   # one process: nothing to agree
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    timeout = timeout or _TIMEOUT[0] or default_timeout()
    _check_group(timeout)
    site, _ = call_site()
    _SEQ[0] += 1
    everyone = _gather(("op", (), (), "", "a call every rank makes", what, site, 0), timeout, what)
    if any(f != everyone[0] for f in everyone):
        raise CollectiveMismatch(mismatch_message(everyone, "calls"))


def _shutdown() -> None:
    _GROUPS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


_AGREED = "\0agreed"  # current_op while an agreed op runs (default mode): its collectives are covered


class DistImpl(MeshImpl):
    """This process is one device of the mesh; Data holds its one local shard."""

    name = "dist"
    multi_process = True
    all_reduces_in_place = True
    checkpoint_form = "per_rank"

    def __init__(
        self, shape: MeshShape, timeout: float | None = None, check: bool | None = None, rules: str = ""
    ) -> None:
        super().__init__(shape, rules=rules)
        self.timeout = default_timeout() if timeout is None else float(timeout)
        if self.timeout <= 0:
            raise BackendError(
                f"tm.Mesh(..., timeout={timeout!r}): the collective timeout must be positive "
                f"seconds. Fix: e.g. timeout=300."
            )
        init_default_group(max(self.timeout, _SETUP_TIMEOUT))  # rendezvous; collectives: below
        world = dist.get_world_size()
        if world != shape.size:
            raise MeshError(
                f"mesh {shape} has {shape.size} devices but {world} processes are running. Fix: start "
                f"{shape.size} processes (torchrun --nproc-per-node {shape.size}) or use a mesh whose axis "
                f"sizes multiply to {world}."
            )
        self.rank = dist.get_rank()
        _check_group(self.timeout)
        self._agree_mesh(shape, rules)  # before any group of this shape is made
        cuda = dist.get_backend() == "nccl"
        self.default_device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.device_mesh = _device_mesh("cuda" if cuda else "cpu", shape)
        self._groups = {n: self.device_mesh.get_group(n) for n in shape.names}
        self._group_names = {n: g.group_name for n, g in self._groups.items()}  # (functional collectives)
        for group in {*self._groups.values(), dist.group.WORLD}:
            _set_timeout(group, self.timeout)
        self.prints = self.rank == 0
        self._coords = (shape.coords(self.rank),)
        if check is None:
            check = os.environ.get("TORCHMESH_CHECK", "0") not in ("", "0")
        self.checking = bool(check)

    def _agree_mesh(self, shape: MeshShape, rules: str) -> None:
        """Every rank must build the same mesh with the same layout rules (one small collective)."""
        site, _ = call_site()
        _SEQ[0] += 1
        mine = ("op", (), (), "", "creating the mesh", f"tm.Mesh({str(shape)!r}, rules={rules!r})", site, 0)
        everyone = _gather(mine, self.timeout, f"tm.Mesh({str(shape)!r}, rules={rules!r})")
        if any(f[5] != everyone[0][5] for f in everyone):
            by: dict = {}
            for rank, f in enumerate(everyone):
                by.setdefault(f[5], []).append(rank)
            lines = "\n".join(f"  ranks {ranks}: {what}" for what, ranks in by.items())
            raise MeshError(
                f"the ranks built different meshes or layout rules:\n{lines}\nFix: build the tm.Mesh "
                f"with the same axes and rules on every rank (rules must not depend on the rank)."
            )

    # ---- agreement: check mode (every collective) and first use (default mode) ---------------
    def enter_op(self, plan: OpPlan, dtypes: tuple, describe) -> tuple:
        """An op with this (cached) plan starts: name it (check mode), or agree on it with the
        other ranks the first time this process uses it with these dtypes (default mode), so
        that its collectives need no agreement of their own. Returns what `end_op` restores.
        (Not inside torch.compile, see `begin_op`: a compiled program is agreed on by its first
        eager run, or not at all; docs/compile.md.)"""
        saved = (self.current_op, self._naming)
        if self.checking:
            self.current_op = self._naming = describe()
            return saved
        if not plan.communicates:
            return saved
        key = (id(plan), dtypes)
        seen = _SEEN.get(key)
        if seen is None:
            name = describe()
            _first_use(key, (plan, name))  # the plan is kept, so its id is not reused while it is a key
            try:
                what = f"{name} of {', '.join(str(d).removeprefix('torch.') for d in dtypes)}"
                site, _ = call_site()
                _SEQ[0] += 1
                everyone = _gather(("op", (), (), "", "first use", what, site, 0), self.timeout, what)
                if any(f != everyone[0] for f in everyone):
                    raise CollectiveMismatch(mismatch_message(everyone, "ops"))
            except BaseException:
                _SEEN.pop(key, None)
                raise
        else:
            name = seen[1]
        self.current_op, self._naming = _AGREED, name  # its name, for a timeout's message
        return saved

    def agree_call(self, what: str) -> None:
        if not self.checking:  # checking, the collectives of the call are verified anyway
            agree_call(what, self.timeout)

    def _guard(
        self, kind: str, axes: tuple[str, ...], tensor: torch.Tensor, whole: tuple[int, int] | None = None
    ) -> None:
        """Default mode, a collective outside an agreed op (relayout, full, backward): the first
        time this process makes one like it (kind, axes, dtype, rank, call site), agree on it
        (shapes compared within each group). The key holds nothing that differs between ranks
        running the same program: blocks of an uneven split, and the gathered sizes of a nested
        one, differ between groups, so a shape in the key would make one group agree alone."""
        if self.checking or self.current_op:
            return
        site, entry = call_site()
        key = (kind, axes, tensor.dtype, tensor.ndim, site, entry)
        if _first_use(key):
            try:
                self._verify(kind, axes, tensor, "first use", whole, site, entry)
            except BaseException:
                _SEEN.pop(key, None)
                raise

    def verify(
        self, kind: str, axes: tuple[str, ...], tensor: torch.Tensor, phase: str, whole: tuple[int, int] | None = None
    ) -> None:
        """Every rank must be at the same collective: same kind, axes, dtype, op, call site and
        place in the program, and the same shape within each group (blocks of an uneven split
        differ in size between groups, and within a group along a gathered dim: there the
        gathered size is compared)."""
        site, entry = call_site()
        self._verify(kind, axes, tensor, phase, whole, site, entry)

    def _verify(self, kind, axes, tensor, phase, whole, site, entry) -> None:
        shape = list(tensor.shape)
        if whole is not None:
            shape[whole[0]] = whole[1]
        _SEQ[0] += 1
        op = self.op_name() or entry
        mine = (kind, axes, tuple(shape), str(tensor.dtype), phase, op, site, _SEQ[0])
        everyone = _gather(mine, self.timeout, f"{kind} over {axes} ({phase} of {op or 'an op'}, called at {site})")
        if not _agree(everyone, axis_groups(self.shape, axes)):
            raise CollectiveMismatch(mismatch_message(everyone))

    def _failed(self, kind: str, axes: tuple[str, ...], error: RuntimeError) -> CollectiveTimeout:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        op = self.op_name()
        return CollectiveTimeout(
            f"rank {self.rank}: {kind} over {axes}{f' in {op}' if op else ''} did not complete within {self.timeout:.0f}s, or a rank "
            f"left ({first}). One of the ranks runs a different program, crashed, or is stuck. Fix: run "
            f"the same program on every rank; TORCHMESH_CHECK=1 names the first collective where the ranks "
            f"differ; the timeout is tm.Mesh(..., timeout=seconds) or TORCHMESH_TIMEOUT."
        )

    @property
    def local_coords(self) -> tuple[tuple[int, ...], ...]:
        return self._coords

    def slicewise(self, fn: Callable[..., torch.Tensor], *datas: Data) -> Data:
        """`fn` on this rank's one local tensor of each input (written out for one and two
        inputs: the eager hot path of every op)."""
        if len(datas) == 1:
            return (fn(datas[0][0]),)
        if len(datas) == 2:
            return (fn(datas[0][0], datas[1][0]),)
        return (fn(*[d[0] for d in datas]),)

    def all_reduce(self, ts: Data, axes: tuple[str, ...], op: str) -> Data:
        t = ts[0]
        if compiling():
            return (functional.all_reduce(t, tuple(self._group_names[a] for a in axes), op),)
        self._guard("all_reduce", axes, t)
        out = t.to(torch.uint8) if t.dtype == torch.bool else t.clone(memory_format=torch.contiguous_format)
        self._reduce_where_it_lies(out, axes, op)
        return (out.to(torch.bool) if t.dtype == torch.bool else out,)

    def all_reduce_inplace(self, ts: Data, axes: tuple[str, ...]) -> Data:
        """Sum this rank's tensor over `axes` where it lies (see `MeshImpl.all_reduce_inplace`):
        on a detached alias, so autograd sees no in-place op (the gradient of a sum over
        replicas is the identity, the result's own node)."""
        self._guard("all_reduce", axes, ts[0])
        self._reduce_where_it_lies(ts[0].detach(), axes, "sum")
        return ts

    def _reduce_where_it_lies(self, t: torch.Tensor, axes: tuple[str, ...], op: str) -> None:
        try:
            for axis in axes:  # a sum over several axes is a sum over each in turn
                dist.all_reduce(t, _OPS[op], group=self._groups[axis])
        except RuntimeError as e:
            raise self._failed("all_reduce", axes, e) from None

    def all_reduce_async(self, ts: Data, axes: tuple[str, ...], op: str = "sum") -> _InFlight:
        """The first axis's all-reduce runs in the background (overlapping what the caller does
        next); further axes, rare for gradients, follow when it is waited for."""
        t = ts[0]
        self._guard("all_reduce", axes, t)
        try:
            work = dist.all_reduce(t, _OPS[op], group=self._groups[axes[0]], async_op=True)
        except RuntimeError as e:
            raise self._failed("all_reduce", axes, e) from None
        return _InFlight(self, t, work, axes, op)

    def _member(self, axis: str) -> int:
        """This rank's position in its group over `axis` (its block index there)."""
        return self.coord(self._coords[0], axis)

    def all_gather(self, ts: Data, axis: str, dim: int, sizes: Sizes = None) -> Data:
        if compiling():
            whole = None if sizes is None else sizes[0]
            return (functional.all_gather(ts[0], self._group_names[axis], self._static_size(axis), dim, whole),)
        self._guard("all_gather", (axis,), ts[0], None if sizes is None else (dim, sizes[0]))
        try:
            return self._all_gather(ts, axis, dim, sizes)
        except RuntimeError as e:
            raise self._failed("all_gather", (axis,), e) from None

    def all_gather_async(self, ts: Data, axis: str, dim: int, sizes: Sizes = None) -> Pending:
        """Even blocks gather in the background (FSDP prefetch); uneven ones, rare for
        parameters, here and now."""
        k = self.axis_size(axis)
        x = ts[0].movedim(dim, 0).contiguous()
        if sizes is not None and sizes[0] != k * x.shape[0]:
            return Done(self.all_gather(ts, axis, dim, sizes))
        self._guard("all_gather", (axis,), ts[0], None if sizes is None else (dim, sizes[0]))
        out = x.new_empty((k * x.shape[0], *x.shape[1:]))
        try:
            work = dist.all_gather_into_tensor(out, x, group=self._groups[axis], async_op=True)
        except RuntimeError as e:
            raise self._failed("all_gather", (axis,), e) from None
        return _Started(self, work, out.movedim(0, dim), "all_gather", axis)

    def _all_gather(self, ts: Data, axis: str, dim: int, sizes: Sizes = None) -> Data:
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
        if compiling():
            k, member = self._static_size(axis), traced.static(self._member(axis))
            return (functional.reduce_scatter(ts[0], self._group_names[axis], k, dim, member),)
        self._guard("reduce_scatter", (axis,), ts[0])
        try:
            return self._reduce_scatter(ts, axis, dim)
        except RuntimeError as e:
            raise self._failed("reduce_scatter", (axis,), e) from None

    def reduce_scatter_async(self, ts: Data, axis: str, dim: int) -> Pending:
        """Even blocks only (FSDP's gradient buckets)."""
        k = self.axis_size(axis)
        x = ts[0].movedim(dim, 0).contiguous()
        self._guard("reduce_scatter", (axis,), ts[0])
        out = x.new_empty((x.shape[0] // k, *x.shape[1:]))
        try:
            work = dist.reduce_scatter_tensor(out, x, group=self._groups[axis], async_op=True)
        except RuntimeError as e:
            raise self._failed("reduce_scatter", (axis,), e) from None
        return _Started(self, work, out.movedim(0, dim), "reduce_scatter", axis)

    def _reduce_scatter(self, ts: Data, axis: str, dim: int) -> Data:
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
        if compiling():
            k, member = self._static_size(axis), traced.static(self._member(axis))
            group, whole = self._group_names[axis], None if sizes is None else sizes[0]
            return (functional.all_to_all(ts[0], group, k, member, gather_dim, split_dim, whole),)
        self._guard("all_to_all", (axis,), ts[0], None if sizes is None else (gather_dim, sizes[0]))
        try:
            return self._all_to_all(ts, axis, gather_dim, split_dim, sizes)
        except RuntimeError as e:
            raise self._failed("all_to_all", (axis,), e) from None

    def _all_to_all(self, ts: Data, axis: str, gather_dim: int, split_dim: int, sizes: Sizes = None) -> Data:
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
        pieces = [recv[j].narrow(gather_dim, 0, recv_sizes[j]).narrow(split_dim, 0, send_sizes[me]) for j in range(k)]
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
        if compiling():
            return (self._shift_traced(ts[0], axes, offset, wrap),)
        self._guard("shift", axes, ts[0])
        try:
            return self._shift(ts, axes, offset, wrap)
        except RuntimeError as e:
            raise self._failed("shift", axes, e) from None

    def _shift(self, ts: Data, axes: tuple[str, ...], offset: int, wrap: bool) -> Data:
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

    def _shift_traced(self, t: torch.Tensor, axes: tuple[str, ...], offset: int, wrap: bool) -> torch.Tensor:
        """`shift` inside torch.compile: over one axis, an all-to-all in its group; over several
        (a group no single process group covers), an all-gather over each axis, then this rank's
        sender's block picked out (more bytes, but every piece traceable)."""
        if len(axes) == 1:
            axis = axes[0]
            k, member = self._static_size(axis), traced.static(self._member(axis))
            return functional.shift(t, self._group_names[axis], k, member, offset, wrap)
        rank = traced.static(self.rank)
        group = next(g for g in traced.axis_groups_traced(self.shape, axes) if rank in g)
        k, r = len(group), group.index(rank)
        src = (r - offset) % k if wrap else r - offset
        everyone = t.unsqueeze(0)
        for axis in reversed(axes):  # minor axis first: blocks end up in group order (first axis major)
            everyone = functional.all_gather(
                everyone.contiguous(), self._group_names[axis], self._static_size(axis), 0, None
            )
        return everyone[src].clone() if 0 <= src < k else torch.zeros_like(t)

    def _static_size(self, axis: str) -> int:
        """The axis' size as a constant inside torch.compile (which makes a number symbolic
        when it changed between compiles: the same function compiled for another mesh)."""
        return traced.static(self.axis_size(axis))

    def global_value(self, data: Data) -> torch.Tensor:
        return data[0]
