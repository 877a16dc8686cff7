"""A model's global size: its parameters counted once, whatever the mesh and backend.

`sum(p.numel() for p in model.parameters())` counts what this process holds: on sim every
device's shard (a replicated weight once per device), on dist and xla one rank's shard.
`num_parameters` and `parameter_bytes` count each mesh parameter once by its global size
(the size of the single-device model's tensor), and every ordinary torch parameter of the
module once. They never communicate, so any rank may call them alone.
"""

from __future__ import annotations

import torch

from torchmesh.nn.parameter import mesh_parameters
from torchmesh.tensor.mesh_tensor import MeshTensor


def _global_tensors(model: torch.nn.Module) -> list[MeshTensor | torch.Tensor]:
    """Each parameter of `model` once: its mesh parameters as MeshTensors (global sizes), then
    the torch parameters that are not a mesh parameter's shard."""
    found: list[MeshTensor | torch.Tensor] = []
    shard_ids: set[int] = set()
    for _, p in mesh_parameters(model):
        if id(p.shards[0]) not in shard_ids:  # (a mesh parameter reached under two names)
            found.append(p)
        shard_ids.update(id(t) for t in p.shards)  # the registered nn.Parameters themselves
    found.extend(p for p in model.parameters() if id(p) not in shard_ids)
    return found


def num_parameters(model: torch.nn.Module) -> int:
    """How many parameters `model` has: each mesh parameter once at its global size, plus its
    ordinary torch parameters, on any mesh and backend (the single-device model's
    `sum(p.numel() for p in model.parameters())`). Never communicates.

    >>> import torchmesh as tm
    >>> mlp = tm.nn.FeedForward(tm.Mesh("dp:2;tp:2", rules="ff:tp"), "d_model:4", "ff:8")
    >>> tm.nn.num_parameters(mlp)                       # 4*8 + 8 + 8*4 + 4
    76
    >>> sum(p.numel() for p in mlp.parameters())        # every simulated device's shard
    160
    """
    return sum(p.numel() for p in _global_tensors(model))


def parameter_bytes(model: torch.nn.Module) -> int:
    """The bytes of `model`'s parameters counted as `num_parameters` counts them (global
    sizes, each once), at each parameter's own dtype: the single-device model's size in
    memory, not what one device holds. Never communicates.

    >>> import torchmesh as tm
    >>> mlp = tm.nn.FeedForward(tm.Mesh("tp:2", rules="ff:tp"), "d_model:4", "ff:8")
    >>> tm.nn.parameter_bytes(mlp)                      # 76 float32 values
    304
    """
    return sum(p.numel() * p.dtype.itemsize for p in _global_tensors(model))
