"""Printing for eager debugging: `repr` of a MeshTensor, and a picture of its blocks.

`repr` never communicates: it shows the shards this process holds (all of them on sim,
one on dist), each with its mesh coordinates; devices holding the same block are shown
once, with `*` for the axes the block is replicated over.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from torchmesh.placement.layout import block_index, parts

if TYPE_CHECKING:
    from torchmesh.tensor.mesh_tensor import MeshTensor


def _header(x: MeshTensor) -> str:
    dims = " ".join(f"{d.name}:{d.size}" for d in x.shape) or "()"
    lay = ";".join(f"{n}:{a if isinstance(a, str) else ','.join(a)}" for n, a in x.layout.items()) or "replicated"
    return f"MeshTensor({dims} | {lay} | mesh {x.mesh.shape} {x.mesh.backend} | {str(x.dtype).replace('torch.', '')}"


def _coords_text(x: MeshTensor, coords: tuple[int, ...]) -> str:
    used = x.tensor_layout.used_axes
    return ",".join(f"{a}={c if a in used else '*'}" for a, c in zip(x.mesh.axis_names, coords))


def format_tensor(x: MeshTensor, max_shards: int = 8) -> str:
    lines = [_header(x) + ("" if not x.requires_grad else " | requires_grad") + ")"]
    slicer, held = x.mesh.impl.device_shards(x._data)
    seen: dict[tuple, None] = {}
    shown = 0
    for coords, t in held:
        key = tuple(block_index(slicer, ax, coords) for ax in x.tensor_layout.axes)
        if key in seen:
            continue
        seen[key] = None
        if shown == max_shards:
            lines.append("  ...")
            break
        shown += 1
        ranges = x.mesh.impl.block_slices(x.tensor_layout, coords)
        where = " ".join(f"{d.name}[{s.start}:{s.stop}]" for d, s in zip(x.shape, ranges))
        body = _compact(t)
        lines.append(f"  [{_coords_text(x, coords)}] {where}".rstrip() + ":" + body)
    return "\n".join(lines)


def _compact(t: torch.Tensor) -> str:
    text = torch._tensor_str._tensor_str(t.detach().cpu(), 0) if t.numel() else "[]"
    if "\n" in text:
        return "\n" + "\n".join("    " + line for line in text.splitlines())
    return " " + text


def show_layout(x: MeshTensor) -> str:
    """A picture of which devices hold which block of `x`, by global index ranges.

    For a tensor with two split dims it is a grid (rows: first split dim, columns:
    second); otherwise one line per block. Devices are listed by index (row-major).

    >>> import torchmesh as tm
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp")
    >>> print(tm.show_layout(tm.zeros("batch:4 ff:6", mesh)))
    MeshTensor(batch:4 ff:6 | batch:dp;ff:tp | mesh dp:2;tp:2 sim | float32)  devices by index on mesh dp:2;tp:2
               | ff[0:3] | ff[3:6]
    batch[0:2] | dev 0   | dev 1
    batch[2:4] | dev 2   | dev 3
    >>> print(tm.show_layout(tm.zeros("batch:4 d:2", mesh)))   # replicated over tp
    MeshTensor(batch:4 d:2 | batch:dp | mesh dp:2;tp:2 sim | float32)  devices by index on mesh dp:2;tp:2
      batch[0:2]: devices [0, 1]
      batch[2:4]: devices [2, 3]
    """
    mesh = x.mesh.shape
    lay = x.tensor_layout
    split = [i for i, ax in enumerate(lay.axes) if ax]
    holders: dict[tuple, list[int]] = {}
    ranges: dict[tuple[int, int], slice] = {}  # (dim position, block) -> its global index range
    for device in range(mesh.size):
        coords = mesh.coords(device)
        key = tuple(block_index(mesh, lay.axes[i], coords) for i in split)
        holders.setdefault(key, []).append(device)
        where = x.mesh.impl.block_slices(lay, coords)
        for i, b in zip(split, key):
            ranges[(i, b)] = where[i]

    def rng(i: int, b: int) -> str:  # blocks of an uneven split differ in size by at most one
        r = ranges[(i, b)]
        return f"{lay.dims[i].name}[{r.start}:{r.stop}]"

    title = f"{_header(x)})  devices by index on mesh {mesh}"
    if len(split) == 2:
        i, j = split
        rows = range(parts(mesh, lay.axes[i]))
        cols = range(parts(mesh, lay.axes[j]))
        cells = [[f"dev {','.join(map(str, holders[(r, c)]))}" for c in cols] for r in rows]
        width = max(max(len(c) for row in cells for c in row), *(len(rng(j, c)) for c in cols))
        left = max(len(rng(i, r)) for r in rows)
        out = [title, " " * left + " | " + " | ".join(rng(j, c).ljust(width) for c in cols)]
        for r in rows:
            out.append(rng(i, r).ljust(left) + " | " + " | ".join(cell.ljust(width) for cell in cells[r]))
        return "\n".join(line.rstrip() for line in out)
    out = [title]
    for key in itertools.product(*(range(parts(mesh, lay.axes[i])) for i in split)):
        where = " ".join(rng(i, b) for i, b in zip(split, key)) or "whole tensor"
        out.append(f"  {where}: devices {holders[key]}")
    return "\n".join(out)


def show(x: MeshTensor, file=None) -> None:
    """Print `x`'s global value and the picture of its blocks, once (on rank 0 under dist).

    A collective on dist (it gathers the value): call it on every rank. `repr(x)` instead
    never communicates and shows the shards this process holds.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="d:tp")
    >>> tm.show(tm.distribute(torch.arange(4.0), "d", mesh))
    MeshTensor(d:4 | d:tp | mesh tp:2 sim | float32)
    tensor([0., 1., 2., 3.])
    MeshTensor(d:4 | d:tp | mesh tp:2 sim | float32)  devices by index on mesh tp:2
      d[0:2]: devices [0]
      d[2:4]: devices [1]
    """
    value = x.full().detach()
    if x.mesh.impl.prints:
        print(f"{_header(x)})\n{value}\n{show_layout(x)}", file=file)
