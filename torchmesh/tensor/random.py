"""Layout-invariant randomness: the same seed gives the same values on any mesh and layout.

Values are drawn in fixed blocks of rows of the tensor's first dim (in the order the dims
are given), each block from its own generator seeded by (seed, block). A device draws only
the blocks overlapping its rows, so no device materialises more than its rows plus one
block, and where a row lands on the mesh never changes its values.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from torchmesh import arguments
from torchmesh.arguments import probability
from torchmesh.placement.dims import DimsLike, parse_dims
from torchmesh.placement.layout import TensorLayout, local_slices
from torchmesh.placement.rules import RulesLike
from torchmesh.tensor.construct import layout_for
from torchmesh.tensor.mesh_tensor import MeshTensor

if TYPE_CHECKING:
    from torchmesh.tensor.mesh import Mesh

_BLOCK_ELEMENTS = 1 << 16
_MASK = (1 << 64) - 1
_state = {"seed": 0, "counter": 0}


def manual_seed(seed: int) -> None:
    """Seed the random ops that are given no explicit seed (randn, rand, dropout).

    >>> import torchmesh as tm
    >>> mesh = tm.Mesh("dp:2", rules="batch:dp")
    >>> tm.manual_seed(0); a = tm.randn("batch:4", mesh)
    >>> tm.manual_seed(0); b = tm.randn("batch:4", mesh)
    >>> bool((a.full() == b.full()).all())
    True
    """
    _state["seed"], _state["counter"] = int(seed), 0


def mix_seed(*values: int) -> int:
    """splitmix64 over the values: a well-spread 63-bit seed."""
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z + (v & _MASK) * 0xBF58476D1CE4E5B9) & _MASK
        z ^= z >> 31
        z = (z * 0x94D049BB133111EB) & _MASK
        z ^= z >> 29
    return z & ((1 << 63) - 1)


def next_seed() -> int:
    """A fresh seed from the global stream (the same on every rank that runs the same ops)."""
    _state["counter"] += 1
    return mix_seed(_state["seed"], _state["counter"])


def stream_state() -> dict[str, int]:
    """The global stream's position (its seed and counter), as a new dict: what a checkpoint
    saves so a resumed run draws the same values."""
    return dict(_state)


def set_stream_state(state: dict[str, int]) -> None:
    """Move the global stream to a position `stream_state` returned."""
    _state.update(state)


def draw(kind: str, seed: int, layout: TensorLayout, slices: tuple[slice, ...], dtype, device) -> torch.Tensor:
    """The block `slices` of the global random tensor of this layout's dims."""
    sizes = [d.size for d in layout.dims]
    sample = torch.randn if kind == "normal" else torch.rand
    if not sizes:
        return sample((), generator=_generator(seed, 0), dtype=dtype, device=device)
    row = math.prod(sizes[1:])
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(row, 1))
    first = slices[0]
    if first.start == first.stop:  # an empty first dim: no block to draw from
        return torch.empty((0, *(s.stop - s.start for s in slices[1:])), dtype=dtype, device=device)
    lo, hi = first.start // rows_per_block, -(-first.stop // rows_per_block)
    blocks = []
    for b in range(lo, hi):
        n = min(rows_per_block, sizes[0] - b * rows_per_block)
        blocks.append(sample((n, *sizes[1:]), generator=_generator(seed, b), dtype=dtype, device=device))
    out = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
    start = first.start - lo * rows_per_block
    return out[(slice(start, start + first.stop - first.start), *slices[1:])].contiguous()


def _generator(seed: int, block: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(mix_seed(seed, block))
    return g


def _random(kind: str, dims: DimsLike, mesh: Mesh, seed, dtype, device, requires_grad, layout) -> MeshTensor:
    call = f"{'randn' if kind == 'normal' else 'rand'}({dims!r})"
    dtype = arguments.dtype(call, dtype, floating=True) or torch.get_default_dtype()
    seed = next_seed() if seed is None else arguments.integer(call, "seed", seed)
    lay = layout_for(parse_dims(dims), mesh, layout)
    target = device if device is not None else mesh.impl.default_device
    slicer = mesh.impl.slice_mesh

    def block(coords):
        slices = local_slices(lay, slicer, coords)
        if not mesh.impl.holds_values:  # abstract evaluation: shapes only, nothing drawn
            return torch.empty([s.stop - s.start for s in slices], dtype=dtype, device=target)
        return draw(kind, seed, lay, slices, dtype, "cpu").to(target)

    data = mesh.impl.make(block)
    if requires_grad:
        data = tuple(t.requires_grad_(True) for t in data)
    return MeshTensor(data, lay, mesh)


def randn(
    dims: DimsLike,
    mesh: Mesh,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device: Any = None,
    requires_grad: bool = False,
    layout: RulesLike = None,
) -> MeshTensor:
    """Standard normal values, identical for a given seed whatever the mesh and layout.

    >>> import torchmesh as tm
    >>> a = tm.randn("batch:4 d:6", tm.Mesh("dp:2", rules="batch:dp"), seed=0)
    >>> b = tm.randn("batch:4 d:6", tm.Mesh("tp:2", rules="d:tp"), seed=0)
    >>> bool((a.full() == b.full()).all())
    True
    """
    return _random("normal", dims, mesh, seed, dtype, device, requires_grad, layout)


def rand(
    dims: DimsLike,
    mesh: Mesh,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device: Any = None,
    requires_grad: bool = False,
    layout: RulesLike = None,
) -> MeshTensor:
    """Uniform values in [0, 1), identical for a given seed whatever the mesh and layout.

    >>> import torchmesh as tm
    >>> u = tm.rand("batch:4 d:8", tm.Mesh("dp:2", rules="batch:dp"), seed=3)
    >>> 0.0 <= u.min().item() and u.max().item() < 1.0
    True
    """
    return _random("uniform", dims, mesh, seed, dtype, device, requires_grad, layout)


def dropout(x: MeshTensor, p: float, training: bool = True, seed: int | None = None) -> MeshTensor:
    """Zero each element with probability `p` and scale the rest by 1/(1-p); the mask depends
    only on the seed and x's dims (in order), never on the mesh or layout.

    >>> import torchmesh as tm
    >>> x = tm.ones("batch:4 d:8", tm.Mesh("dp:2", rules="batch:dp"))
    >>> y = tm.dropout(x, p=0.5, seed=0)
    >>> sorted(set(y.full().flatten().tolist()))
    [0.0, 2.0]
    >>> z = tm.dropout(tm.ones("batch:4 d:8", tm.Mesh("tp:2", rules="d:tp")), p=0.5, seed=0)
    >>> bool((y.full() == z.full()).all())
    True
    """
    p = probability("dropout", "p", p, "dropout(x, p=0.1)")
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    keep = rand(list(x.shape), x.mesh, seed=seed, dtype=torch.float32, device=x.device) >= p
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))
