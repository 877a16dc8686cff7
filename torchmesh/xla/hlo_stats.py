"""Communication accounting on xla: the collectives of the compiled, partitioned program.

On xla no collective runs in Python (each op's result is only annotated), so `comm_stats()`
records nothing there. The collectives are those XLA's SPMD partitioner put into the
program that computes some tensors; `compiled_comm_stats(loss, w.grad, ...)` compiles it
(torch-xla's post-optimization HLO) and reports each all-reduce, all-gather,
reduce-scatter, all-to-all and collective-permute as a `CommRecord`, in the form and with
the byte formulas of `tm.comm_stats` (a collective-permute is a `shift`), the mesh axes
read off its device groups, and `phase="compiled"` (one program holds forward and
backward).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from torchmesh.comm.stats import CommRecord, CommStats, bytes_sent
from torchmesh.errors import BackendError
from torchmesh.placement.mesh_shape import MeshShape

if TYPE_CHECKING:
    from torchmesh.tensor.mesh_tensor import MeshTensor

#: HLO opcode -> comm_stats kind. Async forms (`-start`) count once; `-done` is not counted.
KINDS = {
    "all-reduce": "all_reduce",
    "all-gather": "all_gather",
    "reduce-scatter": "reduce_scatter",
    "all-to-all": "all_to_all",
    "collective-permute": "shift",
}
_DTYPES = {
    "pred": torch.bool,
    "s8": torch.int8,
    "u8": torch.uint8,
    "s16": torch.int16,
    "u16": torch.uint16,
    "s32": torch.int32,
    "u32": torch.uint32,
    "s64": torch.int64,
    "u64": torch.uint64,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f32": torch.float32,
    "f64": torch.float64,
}  # other element types (fp8 ...): their bytes from their bit width, their dtype shown as f32
_INSTRUCTION = re.compile(
    r"=\s*(?P<result>.*?)\s(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?P<start>-start)?\((?P<operands>.*?)\)(?P<attrs>(?:,\s*\w+=.*)?)$"  # TPU layouts hold "T(8,128)"
)
_SHAPE = re.compile(r"\b(pred|[a-z]+\d+\w*)\[([\d,]*)\]")
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


def _element_size(hlo_type: str) -> int:
    """Bytes of one element of an HLO type: pred 1, f32 4, bf16 2, f8e4m3fn 1."""
    if hlo_type == "pred":
        return 1
    bits = re.match(r"[a-z]+(\d+)", hlo_type)
    assert bits is not None, hlo_type  # _SHAPE matched it: letters then digits
    return max(1, int(bits.group(1)) // 8)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_groups(attrs: str, n_devices: int) -> list[list[int]]:
    """The device groups of a collective's attributes: explicit `{{0,1},{2,3}}`, torch-xla's
    iota form `[2,2]<=[2,2]T(1,0)`, or (none given) every device in one group."""
    m = _IOTA_GROUPS.search(attrs)
    if m:  # [groups, size]<=[dims]T(perm): iota over dims, transposed by perm, cut into groups
        groups, dims = _ints(m.group(1)), _ints(m.group(2))
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose(_ints(m.group(3)))
        return ids.reshape(groups[0], -1).tolist()
    m = _EXPLICIT_GROUPS.search(attrs)
    if m and m.group(1).strip():
        return [_ints(g) for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
    return [list(range(n_devices))]


def axes_between(mesh: MeshShape, devices: Iterable[int]) -> tuple[str, ...]:
    """The mesh axes along which these devices' coordinates differ, in mesh order."""
    coords = [mesh.coords(d) for d in devices]
    return tuple(name for i, name in enumerate(mesh.names) if len({c[i] for c in coords}) > 1)


def parse_hlo(text: str, mesh: MeshShape) -> list[CommRecord]:
    """Every collective instruction of a (partitioned) HLO module's text, as records.

    >>> import torch, torchmesh as tm
    >>> from torchmesh.xla import compiled_hlo, parse_hlo
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp", backend="xla")
    >>> x = tm.distribute(torch.ones(2, 4), "batch ff", mesh)
    >>> w = tm.distribute(torch.ones(4, 3), "ff d", mesh)
    >>> parse_hlo(compiled_hlo(tm.einsum("batch ff, ff d -> batch d", x, w)), mesh.shape)
    [CommRecord(kind='all_reduce', axes=('tp',), bytes=12, shape=(1, 3), dtype=torch.float32, phase='compiled')]
    """
    records = []
    for line in text.splitlines():
        m = _INSTRUCTION.search(line)
        if not m:
            continue
        kind = KINDS[m.group("op")]
        shapes = _SHAPE.findall(m.group("operands"))
        if not shapes:
            continue
        dtype = _DTYPES.get(shapes[0][0], torch.float32)
        first = tuple(_ints(shapes[0][1]))
        size = sum(math.prod(_ints(dims)) * _element_size(t) for t, dims in shapes)  # every operand
        attrs = m.group("attrs")
        if kind == "shift":
            found = _PAIRS.search(attrs)
            pairs = re.findall(r"\{(\d+),(\d+)\}", found.group(1)) if found else []
            moved = [(int(a), int(b)) for a, b in pairs if a != b]
            if not moved:
                continue  # every device keeps its own block: nothing is sent
            axes = axes_between(mesh, {d for p in moved for d in p})
            k = 2  # (unused: a shift sends its block, whatever the group)
        else:
            groups = parse_groups(attrs, mesh.size)
            k = len(groups[0])
            if k == 1:
                continue
            axes = axes_between(mesh, groups[0])
        records.append(CommRecord(kind, axes, bytes_sent(kind, k, size), first, dtype, "compiled"))
    return records


@contextmanager
def _post_optimization_hlo():
    """Within the block torch-xla's HLO dumps are of the compiled (partitioned) module."""
    saved = os.environ.get("XLA_DUMP_POST_OPTIMIZATIONS")
    os.environ["XLA_DUMP_POST_OPTIMIZATIONS"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["XLA_DUMP_POST_OPTIMIZATIONS"]
        else:
            os.environ["XLA_DUMP_POST_OPTIMIZATIONS"] = saved


def compiled_hlo(*tensors: MeshTensor | torch.Tensor) -> str:
    """The partitioned HLO text of the program computing these MeshTensors (or XLA tensors).

    >>> import torch, torchmesh as tm
    >>> from torchmesh.xla import compiled_hlo
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp", backend="xla")
    >>> h = tm.distribute(torch.ones(2, 4), "batch ff", mesh).sum("ff")   # ff split: partial sums
    >>> "all-reduce" in compiled_hlo(h)
    True
    """
    import torch_xla

    xs = [t if isinstance(t, torch.Tensor) else t.local for t in tensors]
    with _post_optimization_hlo():
        return torch_xla._XLAC._get_xla_tensors_hlo(xs)


def compiled_comm_stats(*tensors: MeshTensor) -> CommStats:
    """The collectives XLA compiles into the program computing these MeshTensors (all on one
    xla mesh), as `tm.comm_stats` reports them.

    Pass everything a step produces (the loss and the gradients, or the updated parameters):
    tensors left out are not part of the compiled program, nor is their communication.

    >>> import torch, torchmesh as tm
    >>> from torchmesh.xla import compiled_comm_stats
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp", backend="xla")
    >>> x = tm.distribute(torch.ones(2, 4), "batch ff", mesh)
    >>> w = tm.distribute(torch.ones(4, 3), "ff d", mesh)
    >>> stats = compiled_comm_stats(tm.einsum("batch ff, ff d -> batch d", x, w))
    >>> stats.counts, stats.bytes_by("axes")
    ({'all_reduce': 1}, {('tp',): 12})
    """
    meshes = {t.mesh for t in tensors if _placed(t)}
    if len(meshes) != 1 or next(iter(meshes)).backend != "xla" or not all(_placed(t) for t in tensors):
        raise BackendError(_not_one_xla_mesh(tensors, meshes))
    mesh = next(iter(meshes))
    return CommStats(parse_hlo(compiled_hlo(*tensors), mesh.shape))


def _placed(t: object) -> bool:
    """A MeshTensor (read by what it has: this layer sits below torchmesh/tensor/)."""
    return hasattr(t, "mesh") and hasattr(t, "tensor_layout")


def _not_one_xla_mesh(tensors: tuple, meshes: set) -> str:
    others = [f"argument {i} is {type(t).__name__}" for i, t in enumerate(tensors) if not _placed(t)]
    return (
        "compiled_comm_stats counts the collectives of an xla program: pass MeshTensors of one "
        f"Mesh(..., backend='xla'); got {len(tensors)} arguments, on meshes {sorted(map(repr, meshes))}"
        + "".join(f"; {o}" for o in others)
        + " (a gradient is None before backward). On sim and dist, use `with tm.comm_stats() as stats:`."
    )
