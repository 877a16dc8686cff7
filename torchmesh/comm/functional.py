"""The dist backend's collectives inside torch.compile: torch's functional collectives.

Eagerly, `DistImpl` calls torch.distributed's in-place collectives (with timeouts, agreement
and checks around them). Those cannot be traced; the functional ones
(`torch.distributed._functional_collectives`) can: each returns a new tensor, and the
compiler (inductor) may reorder them to overlap with compute. The same padding of uneven
blocks as eagerly, so the values are the same; groups are named by their process group's
name (a string dynamo keeps as a constant). Block sizes are Python numbers here (`static`):
a tensor whose sizes changed between two compiles has symbolic sizes, which the padding
arithmetic cannot take.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from torchmesh.comm.traced import static
from torchmesh.placement.mesh_shape import block_sizes


def all_reduce(t: torch.Tensor, groups: tuple[str, ...], op: str) -> torch.Tensor:
    """Sum (max, min) over each group in turn: a reduction over several axes."""
    out = t.to(torch.uint8) if t.dtype == torch.bool else t
    for group in groups:
        out = funcol.all_reduce(out, op, group)
    return out.to(torch.bool) if t.dtype == torch.bool else out


def all_gather(t: torch.Tensor, group: str, k: int, dim: int, whole: int | None) -> torch.Tensor:
    """The group's blocks along `dim`, in group order; `whole`: the gathered size where the
    blocks may be uneven (each is then padded to the largest and cut back after)."""
    x = t.movedim(dim, 0).contiguous()
    n = static(x.shape[0])
    whole = k * n if whole is None else static(whole)
    if whole == k * n:
        return funcol.all_gather_tensor(x, 0, group).movedim(0, dim)
    blocks = block_sizes(whole, k)
    padded = torch.cat([x, x.new_zeros((blocks[0] - n, *x.shape[1:]))]) if blocks[0] > n else x
    gathered = funcol.all_gather_tensor(padded.contiguous(), 0, group)
    pieces = [gathered[j * blocks[0] : j * blocks[0] + size] for j, size in enumerate(blocks)]
    return torch.cat(pieces).movedim(0, dim)


def reduce_scatter(t: torch.Tensor, group: str, k: int, dim: int, member: int) -> torch.Tensor:
    """Sum over the group, keep block `member` (this rank's) of the balanced split of `dim`."""
    x = t.movedim(dim, 0).contiguous()
    n = static(x.shape[0])
    blocks = block_sizes(n, k)
    if n % k:  # uneven: each block padded to the largest, the padding dropped after
        pieces = [
            torch.cat([p, p.new_zeros((blocks[0] - size, *p.shape[1:]))]) if size < blocks[0] else p
            for p, size in zip(x.tensor_split(k), blocks)
        ]
        x = torch.cat(pieces)
    out = funcol.reduce_scatter_tensor(x, "sum", 0, group)
    return out[: blocks[member]].movedim(0, dim)


def all_to_all(
    t: torch.Tensor, group: str, k: int, member: int, gather_dim: int, split_dim: int, whole: int | None
) -> torch.Tensor:
    """Block j of `split_dim` to member j; what arrives concatenated along `gather_dim`."""
    shape = [static(n) for n in t.shape]
    whole = k * shape[gather_dim] if whole is None else static(whole)
    send_sizes, recv_sizes = block_sizes(shape[split_dim], k), block_sizes(whole, k)
    have = list(shape)
    shape[split_dim], shape[gather_dim] = send_sizes[0], recv_sizes[0]
    # Piece j padded to the largest piece on both dims, stacked: one equal-sized exchange.
    pieces = []
    for piece, size in zip(t.tensor_split(k, split_dim), send_sizes):
        have[split_dim] = size
        pad = []
        for i in reversed(range(t.dim())):
            pad += [0, shape[i] - have[i]]
        pieces.append(torch.nn.functional.pad(piece, pad) if any(pad) else piece)
    send = torch.stack(pieces).contiguous()
    recv = funcol.all_to_all_single(send, None, None, group)
    out = [recv[j].narrow(gather_dim, 0, recv_sizes[j]).narrow(split_dim, 0, send_sizes[member]) for j in range(k)]
    return torch.cat(out, gather_dim)


def shift(t: torch.Tensor, group: str, k: int, member: int, offset: int, wrap: bool) -> torch.Tensor:
    """Receive the tensor of the member `offset` places before (zeros where there is none
    and not `wrap`): one all-to-all whose only non-empty piece goes to the receiver."""
    dst, src = member + offset, member - offset
    if wrap:
        dst, src = dst % k, src % k
    n = static(t.numel())
    send_sizes = [n if j == dst else 0 for j in range(k)]
    recv_sizes = [n if j == src else 0 for j in range(k)]
    flat = t.contiguous().reshape(-1)
    if not any(send_sizes):
        flat = flat[:0]
    recv = funcol.all_to_all_single(flat, recv_sizes, send_sizes, group)
    return recv.reshape(t.shape) if 0 <= src < k else torch.zeros_like(t)
