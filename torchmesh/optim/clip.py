"""Gradient clipping by the exact global norm.

A parameter's gradient is laid out like the parameter: split over some axes, replicated over
the others. Its squared norm is the sum of its local blocks' squares over the axes it is
split over (an all-reduce there), and is *not* summed over the axes it is replicated over
(every device there holds the same block). Parameters with the same split axes share one
all-reduce of their summed local squares.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from torchmesh.comm import autograd as comm
from torchmesh.optim.params import mesh_tensors
from torchmesh.tensor.mesh_tensor import MeshTensor


@torch.no_grad()
def grad_norm(params: torch.nn.Module | Iterable[MeshTensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients taken together, as if every parameter were one global tensor
    (a 0-d torch tensor, the same on every device and rank); parameters without a gradient
    are skipped.

    >>> import torch, torchmesh as tm
    >>> m = tm.nn.Module()
    >>> m.w = tm.ones("d:4 ff:4", tm.Mesh("tp:2", rules="ff:tp"), requires_grad=True)
    >>> (m.w * 2).sum().backward()   # every gradient element is 2
    >>> tm.optim.grad_norm(m)        # sqrt(16 * 2**2)
    tensor(8.)
    """
    grads = [g for g in (p.grad for p in mesh_tensors(params, "grad_norm")) if g is not None]
    if not grads:
        return torch.zeros(())
    impl = grads[0].mesh.impl
    inf = math.isinf(norm_type)
    groups: dict[tuple[str, ...], tuple[torch.Tensor, ...]] = {}
    for g in grads:
        local = tuple(_local(t, norm_type) for t in g.shards)
        axes = tuple(a for a in g.mesh.axis_names if a in g.tensor_layout.used_axes)
        have = groups.get(axes)
        groups[axes] = (
            local if have is None else tuple(torch.maximum(a, b) if inf else a + b for a, b in zip(have, local))
        )
    total = None
    for axes, local in groups.items():
        reduced = comm.all_reduce(impl, local, axes, "max" if inf else "sum")[0]
        total = reduced if total is None else (torch.maximum(total, reduced) if inf else total + reduced)
    assert total is not None  # grads is not empty, so neither is groups
    return total if inf else total ** (1.0 / norm_type)


def _local(t: torch.Tensor, norm_type: float) -> torch.Tensor:
    t = t.detach().float()
    if math.isinf(norm_type):
        return t.abs().max() if t.numel() else torch.zeros((), device=t.device)
    return t.abs().pow(norm_type).sum()


@torch.no_grad()
def clip_grad_norm_(
    params: torch.nn.Module | Iterable[MeshTensor], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """Scale every gradient in place so that their global norm is at most `max_norm`, like
    `torch.nn.utils.clip_grad_norm_` on the single-device model; returns the norm before
    clipping.

    >>> import torch, torchmesh as tm
    >>> m = tm.nn.Module()
    >>> m.w = tm.ones("d:4 ff:4", tm.Mesh("tp:2", rules="ff:tp"), requires_grad=True)
    >>> (m.w * 2).sum().backward()
    >>> tm.optim.clip_grad_norm_(m, max_norm=1.0)
    tensor(8.)
    >>> round(tm.optim.grad_norm(m).item(), 4)
    1.0
    """
    params = mesh_tensors(params, "clip_grad_norm_")
    total = grad_norm(params, norm_type)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        for t in p.shards:
            if t.grad is not None:
                t.grad.mul_(scale.to(t.grad.device, t.grad.dtype))
    return total
