"""Printing for eager debugging: `repr` of a MeshTensor, and a picture of its blocks.

`repr` never communicates: it shows the shards this process holds (all of them on sim,
one on dist), each with its mesh coordinates; devices holding the same block are shown
once, with `*` for the axes the block is replicated over.

A tensor with more values than torch's print threshold (`torch.set_printoptions`, 1000 by
default) is summarised the way torch summarises one: each block with its first and last
`edgeitems` per dim, the first few blocks only (about SUMMARY_LINES lines, at most
SUMMARY_BLOCKS blocks), then a line saying how to see everything:
`torch.set_printoptions(profile="full")` (every block, every value) or
`tm.show(x, full=True)` (the global value).
"""

from __future__ import annotations

import contextlib
import itertools
import math
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


#: A summarised print shows blocks while they fit in this many lines (the first one always)...
SUMMARY_LINES = 40
#: ...and at most this many blocks.
SUMMARY_BLOCKS = 4
#: What the last line of a summarised print names.
SEE_ALL = 'tm.show(x, full=True) or torch.set_printoptions(profile="full")'


def format_tensor(x: MeshTensor, max_shards: int = 8) -> str:
    """`repr(x)`: the header, then each distinct block this process holds (at most
    `max_shards`; all under `torch.set_printoptions(profile="full")`), summarised like torch
    when `x` has more values than torch's print threshold."""
    opts = torch._tensor_str.PRINT_OPTS
    values = x.mesh.impl.holds_values  # (not on abstract: shapes only)
    summarise = values and x.numel() > opts.threshold
    lines = [_header(x) + ("" if not x.requires_grad else " | requires_grad") + ")"]
    blocks = _distinct_blocks(x)
    if summarise:
        limit = SUMMARY_BLOCKS
    else:
        limit = len(blocks) if opts.threshold == math.inf else max_shards
    shown = height = 0
    for coords, t in blocks[:limit]:
        ranges = x.mesh.impl.block_slices(x.tensor_layout, coords)
        where = " ".join(f"{d.name}[{s.start}:{s.stop}]" for d, s in zip(x.shape, ranges))
        body = _compact(t, summarise) if values else " (no values: shapes only)"
        text = f"  [{_coords_text(x, coords)}] {where}".rstrip() + ":" + body
        height += 1 + text.count("\n")
        if summarise and shown and height > SUMMARY_LINES:
            break
        lines.append(text)
        shown += 1
    more = len(blocks) - shown
    if more and not summarise:
        lines.append("  ...")
    elif more:
        lines.append(f"  ... {more} more block{'s' if more > 1 else ''}")
    if summarise:
        lines.append(f"  (summarised: {x.numel():,} values > threshold {opts.threshold}; see all with {SEE_ALL})")
    return "\n".join(lines)


def _distinct_blocks(x: MeshTensor) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """(coordinates, block) for each distinct block this process holds, the first device
    holding it standing for its replicas."""
    slicer, held = x.mesh.impl.device_shards(x._data)
    seen: dict[tuple, tuple[tuple[int, ...], torch.Tensor]] = {}
    for coords, t in held:
        key = tuple(block_index(slicer, ax, coords) for ax in x.tensor_layout.axes)
        seen.setdefault(key, (coords, t))
    return list(seen.values())


def _compact(t: torch.Tensor, summarise: bool = False) -> str:
    """A block's values as torch prints them (without `tensor(...)`); `summarise`: cut to
    the first and last `edgeitems` per dim, as torch does past its threshold."""
    if not t.numel():
        return " []"
    quiet = torch._tensor_str.printoptions(threshold=0) if summarise else contextlib.nullcontext()
    with quiet:
        text = torch._tensor_str._tensor_str(t.detach().cpu(), 0)
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
        label = " ".join(rng(i, b) for i, b in zip(split, key)) or "whole tensor"
        out.append(f"  {label}: devices {holders[key]}")
    return "\n".join(out)


def show(x: MeshTensor, file=None, full: bool = False) -> None:
    """Print `x`'s global value and the picture of its blocks, once (on rank 0 under dist).

    A collective on dist (it gathers the value): call it on every rank. `repr(x)` instead
    never communicates and shows the shards this process holds. The value prints as torch
    prints a tensor (summarised past `torch.set_printoptions`' threshold); `full=True`
    prints every value.

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
        every = torch._tensor_str.printoptions(threshold=math.inf) if full else contextlib.nullcontext()
        with every:
            text = f"{_header(x)})\n{value}\n{show_layout(x)}"
        print(text, file=file)
